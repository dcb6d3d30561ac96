//! The CometQL tables (docs/cometql.md, "Tables"): their columns, keys and what each
//! statement may do with them. The executor checks every statement against
//! this list before anything runs, so column and WHERE errors are uniform.

/// One table's shape.
#[derive(Debug)]
pub struct Table {
    pub name: &'static str,
    pub columns: &'static [&'static str],
    /// The column a WHERE must name.
    pub key: &'static str,
    /// Columns an INSERT takes, in the order used when none are listed;
    /// `None`: read-only (error 10).
    pub insert: Option<&'static [&'static str]>,
    /// Whether DELETE is allowed.
    pub delete: bool,
}

pub const TABLES: &[Table] = &[
    Table {
        name: "pipes_messages",
        columns: &["id", "time", "name", "index", "event", "message", "user_id"],
        key: "name",
        insert: Some(&["name", "event", "message"]),
        delete: true,
    },
    Table { name: "pipes", columns: &["name", "users"], key: "name", insert: None, delete: false },
    Table {
        name: "users_in_pipes",
        columns: &["name", "user_id", "user_uuid", "user_agent", "ip", "origin", "language"],
        key: "name",
        insert: None,
        delete: false,
    },
    Table {
        name: "pipes_settings",
        columns: &["name", "length"],
        key: "name",
        insert: Some(&["name", "length"]),
        delete: true,
    },
    Table {
        name: "users_messages",
        columns: &["id", "index", "event", "message"],
        key: "id",
        insert: Some(&["id", "event", "message"]),
        delete: true,
    },
    Table { name: "users_auth", columns: &["id", "hash"], key: "id", insert: Some(&["id", "hash"]), delete: true },
    Table { name: "users_time", columns: &["id", "time"], key: "id", insert: None, delete: false },
    Table { name: "users_data", columns: &["id", "data"], key: "id", insert: Some(&["id", "data"]), delete: true },
    Table { name: "revoked_tokens", columns: &["token"], key: "token", insert: Some(&["token"]), delete: true },
];

/// Looks a table up by its (lower-case) name.
pub fn find(name: &str) -> Option<&'static Table> {
    TABLES.iter().find(|t| t.name == name)
}

impl Table {
    pub fn column_index(&self, c: &str) -> Option<usize> {
        self.columns.iter().position(|x| *x == c)
    }
}
