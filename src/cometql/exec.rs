//! From a parsed statement to a [`Plan`]: every check that needs no shard
//! state happens here (table, columns, WHERE key, value rules), and answers
//! that need none are computed here too (SHOW, SELECT @@var, ...). What needs
//! the shards (publishing, counts, history) is returned as a plan for the
//! shard glue to carry out.

use super::charset::Charset;
use super::like::like_match;
use super::packet::{ResultSet, SERVER_VERSION};
use super::parser::{Condition, Expr, Statement, Value};
use super::rows::TextRow;
use super::tables::{self, TABLES, Table};
use crate::domain::{self, ChannelError, ChannelKind, clip, is_name_char};
use crate::users::UserQuery;

/// The outcome of one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StmtResult {
    Ok { affected: u64, last_insert_id: u64 },
    Rows(ResultSet),
    Err(u16, String),
}

impl StmtResult {
    pub fn err(code: u16, msg: impl Into<String>) -> StmtResult {
        StmtResult::Err(code, msg.into())
    }

    /// Bytes this result holds until it is encoded and sent: its texts,
    /// plus a small constant per row and per cell.
    pub fn weight(&self) -> usize {
        match self {
            StmtResult::Ok { .. } => 16,
            StmtResult::Err(_, m) => 16 + m.len(),
            StmtResult::Rows(rs) => {
                64 + rs.columns.iter().map(|c| c.len() + 24).sum::<usize>()
                    + rs.rows
                        .iter()
                        .map(|r| 24 + r.iter().map(|c| 24 + c.as_ref().map_or(0, String::len)).sum::<usize>())
                        .sum::<usize>()
            }
        }
    }
}

/// Which columns of a full row a SELECT returns, and its LIMIT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Projection {
    pub table: &'static str,
    pub columns: Vec<usize>,
    pub limit: Option<(u64, u64)>,
}

impl Projection {
    /// Applies column choice and LIMIT to full rows (as [`super::rows`]
    /// renders them, every column of the table in order).
    pub fn apply(&self, rows: Vec<TextRow>) -> ResultSet {
        let table = tables::find(self.table).map_or(&[][..], |t| t.columns);
        let (offset, count) = self.limit.unwrap_or((0, u64::MAX));
        let rows = rows
            .into_iter()
            .skip(offset as usize)
            .take(count.min(usize::MAX as u64) as usize)
            .map(|r| self.columns.iter().map(|&i| r.get(i).cloned().flatten()).collect())
            .collect();
        ResultSet {
            table: self.table.to_string(),
            columns: self.columns.iter().map(|&i| table.get(i).copied().unwrap_or("?").to_string()).collect(),
            rows,
        }
    }
}

/// A message to publish: (channel, event, message text).
pub type Outgoing = (String, String, String);

/// What the shard glue must do for one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Done(StmtResult),
    /// Publish; affected rows = connections written on all shards.
    Publish(Vec<Outgoing>),
    /// `pipes`: subscriber counts per channel.
    PipeCounts {
        names: Vec<String>,
        proj: Projection,
    },
    /// `users_in_pipes`: one row per subscribed connection.
    Subscribers {
        names: Vec<String>,
        proj: Projection,
    },
    /// `pipes_messages` history of these channels.
    HistorySelect {
        names: Vec<String>,
        proj: Projection,
    },
    /// Clear these channels' history, or remove entries by id.
    HistoryDelete {
        names: Vec<String>,
        ids: Vec<u64>,
    },
    /// `pipes_settings` INSERT: (channel, history length).
    SettingsSet(Vec<(String, u32)>),
    /// `pipes_settings` SELECT, all channels when `names` is `None`.
    SettingsSelect {
        names: Option<Vec<String>>,
        proj: Projection,
    },
    /// `pipes_settings` DELETE: remove settings and history.
    SettingsDelete(Vec<String>),
    /// Switch the session to this dev_id and database name.
    UseDb {
        dev_id: u32,
        name: String,
    },
    /// An operation on the user tables, carried out on the users' home
    /// shards; rows are projected with `proj`, OKs carry `last_insert_id`.
    User {
        query: UserQuery,
        proj: Option<Projection>,
        last_insert_id: u64,
    },
}

impl Plan {
    /// Whether the plan gathers rows from the shards: its answer grows
    /// with the server's state (a channel's history, its subscribers, a
    /// whole table), not with the statement.
    pub fn gathers_rows(&self) -> bool {
        matches!(
            self,
            Plan::PipeCounts { .. }
                | Plan::Subscribers { .. }
                | Plan::HistorySelect { .. }
                | Plan::SettingsSelect { .. }
                | Plan::User { proj: Some(_), .. }
        )
    }
}

/// What planning needs to know about the session and server.
pub struct Ctx<'a> {
    pub dev_id: u32,
    pub database: &'a str,
    pub connection_id: u32,
    /// May the session's login use dev_id N (same password)?
    pub may_use_dev: &'a dyn Fn(u32) -> bool,
    /// Rows for SHOW STATUS.
    pub status: &'a dyn Fn() -> Vec<(String, String)>,
    pub max_query_size: usize,
    /// The session's client and result character sets, for `@@character_set_*`.
    pub charsets: (Charset, Charset),
}

impl Ctx<'static> {
    /// A context outside any session (dev_id 0, every dev_id allowed, no
    /// status rows): for benchmarks and tests of the planner alone.
    pub fn standalone(max_query_size: usize) -> Ctx<'static> {
        fn any_dev(_: u32) -> bool {
            true
        }
        fn no_status() -> Vec<(String, String)> {
            Vec::new()
        }
        Ctx {
            dev_id: 0,
            database: "CometQL_v1",
            connection_id: 1,
            may_use_dev: &any_dev,
            status: &no_status,
            max_query_size,
            charsets: (Charset::Utf8mb4, Charset::Utf8mb4),
        }
    }
}

/// Longest history a channel may keep.
pub const MAX_HISTORY: u32 = 1000;

/// Resolves a database name to a dev_id for `login_dev`.
pub fn database_dev(name: &str, login_dev: u32) -> Option<u32> {
    if name.eq_ignore_ascii_case("CometQL_v1") {
        return Some(login_dev);
    }
    name.strip_prefix("db_").and_then(|n| n.parse().ok())
}

/// Plans one statement.
pub fn plan(st: Statement, ctx: &Ctx<'_>) -> Plan {
    match plan_inner(st, ctx) {
        Ok(p) => p,
        Err(r) => Plan::Done(r),
    }
}

fn plan_inner(st: Statement, ctx: &Ctx<'_>) -> Result<Plan, StmtResult> {
    match st {
        Statement::Set(_) => Ok(Plan::Done(StmtResult::Ok { affected: 0, last_insert_id: 0 })),
        Statement::Failed(e) => Err(StmtResult::Err(e.code, e.message)),
        Statement::Use(db) => use_db(&db, ctx),
        Statement::ShowDatabases => Ok(rows("SCHEMATA", &["Database"], vec![vec![Some("CometQL_v1".into())]])),
        Statement::ShowTables => Ok(rows(
            "TABLES",
            &["Tables_in_CometQL_v1"],
            TABLES.iter().map(|t| vec![Some(t.name.to_string())]).collect(),
        )),
        Statement::ShowColumns { table } => {
            let t = table_named(&table)?;
            Ok(rows(
                "COLUMNS",
                &["Field", "Type", "Null", "Key", "Default", "Extra"],
                t.columns
                    .iter()
                    .map(|c| {
                        vec![
                            Some(c.to_string()),
                            Some("varchar(255)".into()),
                            Some(if *c == t.key { "NO" } else { "YES" }.into()),
                            Some(if *c == t.key { "PRI" } else { "" }.into()),
                            None,
                            Some(String::new()),
                        ]
                    })
                    .collect(),
            ))
        }
        Statement::ShowStatus { like } => Ok(rows(
            "STATUS",
            &["Variable_name", "Value"],
            (ctx.status)()
                .into_iter()
                .filter(|(k, _)| like.as_deref().is_none_or(|p| like_match(p, k)))
                .map(|(k, v)| vec![Some(k), Some(v)])
                .collect(),
        )),
        Statement::ShowVariables { like } => Ok(rows(
            "VARIABLES",
            &["Variable_name", "Value"],
            variables(ctx)
                .into_iter()
                .filter(|(k, _)| like.as_deref().is_none_or(|p| like_match(p, k)))
                .map(|(k, v)| vec![Some(k.to_string()), Some(v)])
                .collect(),
        )),
        Statement::SelectExprs(items) => {
            let vars = variables(ctx);
            let mut row = Vec::with_capacity(items.len());
            let mut cols = Vec::with_capacity(items.len());
            for (e, label) in items {
                row.push(match e {
                    Expr::SysVar(name) => vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.clone()),
                    Expr::Lit(Value::Null) => None,
                    Expr::Lit(v) => Some(v.text().to_string()),
                    Expr::Func(f) => match f.as_str() {
                        "DATABASE" | "SCHEMA" => Some(ctx.database.to_string()),
                        "VERSION" => Some(SERVER_VERSION.to_string()),
                        "USER" | "CURRENT_USER" | "SESSION_USER" | "SYSTEM_USER" => {
                            Some(format!("{}@localhost", ctx.dev_id))
                        }
                        "CONNECTION_ID" => Some(ctx.connection_id.to_string()),
                        _ => return Err(StmtResult::err(2, format!("function {}() is not supported", clip(&f)))),
                    },
                });
                cols.push(label);
            }
            Ok(Plan::Done(StmtResult::Rows(ResultSet { table: String::new(), columns: cols, rows: vec![row] })))
        }
        Statement::Insert { table, columns, rows } => insert(&table, columns, rows),
        Statement::Select { table, columns, conditions, limit } => select(&table, columns, conditions, limit),
        Statement::Delete { table, conditions } => delete(&table, conditions),
    }
}

fn rows(table: &str, columns: &[&str], rows: Vec<Vec<Option<String>>>) -> Plan {
    Plan::Done(StmtResult::Rows(ResultSet {
        table: table.to_string(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        rows,
    }))
}

fn use_db(db: &str, ctx: &Ctx<'_>) -> Result<Plan, StmtResult> {
    match database_dev(db, ctx.dev_id) {
        Some(dev) if (ctx.may_use_dev)(dev) => Ok(Plan::UseDb { dev_id: dev, name: db.to_string() }),
        Some(_) => Err(StmtResult::err(403, format!("Access denied to database {} with this login", clip(db)))),
        None => Err(StmtResult::err(15, format!("Unknown database {}: use CometQL_v1 or db_N", clip(db)))),
    }
}

/// Server variables answered to drivers and GUI clients.
fn variables(ctx: &Ctx<'_>) -> Vec<(&'static str, String)> {
    let s = |v: &str| v.to_string();
    vec![
        ("version", s(SERVER_VERSION)),
        ("version_comment", s("comet push server (CometQL)")),
        ("version_compile_os", s("Linux")),
        ("max_allowed_packet", ctx.max_query_size.to_string()),
        ("autocommit", s("1")),
        ("auto_increment_increment", s("1")),
        ("character_set_client", s(ctx.charsets.0.name())),
        ("character_set_connection", s(ctx.charsets.0.name())),
        ("character_set_results", s(ctx.charsets.1.name())),
        ("character_set_server", s("utf8mb4")),
        ("collation_connection", s("utf8mb4_general_ci")),
        ("collation_server", s("utf8mb4_general_ci")),
        ("init_connect", s("")),
        ("interactive_timeout", s("28800")),
        ("license", s("MIT")),
        ("lower_case_table_names", s("0")),
        ("net_buffer_length", s("16384")),
        ("net_write_timeout", s("60")),
        ("performance_schema", s("0")),
        ("query_cache_size", s("0")),
        ("query_cache_type", s("OFF")),
        // No unix socket: drivers that prefer one stay on TCP.
        ("socket", s("")),
        ("sql_mode", s("")),
        ("system_time_zone", s("UTC")),
        ("time_zone", s("SYSTEM")),
        ("transaction_isolation", s("REPEATABLE-READ")),
        ("tx_isolation", s("REPEATABLE-READ")),
        ("wait_timeout", s("28800")),
    ]
}

fn table_named(name: &str) -> Result<&'static Table, StmtResult> {
    tables::find(name).ok_or_else(|| StmtResult::err(15, format!("Table {} doesn't exist", clip(name))))
}

/// Shortest channel name CometQL accepts (the frontend accepts 2).
pub const MIN_CHANNEL_LEN: usize = 3;

/// Checks a channel name given through CometQL (3..64 of `[A-Za-z0-9_-]`,
/// not `msg`, `sys` or `_answer*`) and returns its kind.
pub fn check_channel(name: &str) -> Result<ChannelKind, StmtResult> {
    let kind = domain::check_channel(name).map_err(|e| {
        let code = match e {
            ChannelError::TooLong(_) => 11,
            ChannelError::TooShort(_) => 17,
            ChannelError::BadChar(_) => 12,
        };
        StmtResult::err(code, e.to_string())
    })?;
    if name.len() < MIN_CHANNEL_LEN {
        return Err(StmtResult::err(
            17,
            format!("Channel name {} is shorter than {MIN_CHANNEL_LEN} characters", clip(name)),
        ));
    }
    if kind.is_reserved() {
        return Err(StmtResult::err(12, format!("Channel name {} is reserved", clip(name))));
    }
    Ok(kind)
}

fn check_event(event: &str) -> Result<(), StmtResult> {
    if event.is_empty() {
        return Err(StmtResult::err(17, "Event name is empty"));
    }
    if event.len() > 64 {
        return Err(StmtResult::err(11, format!("Event name {} is longer than 64 characters", clip(event))));
    }
    if !event.bytes().all(is_name_char) {
        return Err(StmtResult::err(12, format!("Event name {} may contain only A-Za-z0-9_-", clip(event))));
    }
    Ok(())
}

/// Maps a row of an INSERT to the table's insert columns.
fn insert_rows(t: &Table, columns: Option<Vec<String>>, rows: Vec<Vec<Value>>) -> Result<Vec<Vec<Value>>, StmtResult> {
    let Some(wanted) = t.insert else {
        return Err(StmtResult::err(10, format!("Table '{}' is read-only", t.name)));
    };
    let order: Vec<usize> = match columns {
        None => (0..wanted.len()).collect(),
        Some(cols) => {
            let mut order = vec![usize::MAX; wanted.len()];
            for (i, c) in cols.iter().enumerate() {
                match wanted.iter().position(|w| w == c) {
                    Some(k) if order[k] == usize::MAX => order[k] = i,
                    Some(_) => return Err(StmtResult::err(14, format!("Column {} is listed twice", clip(c)))),
                    None if t.column_index(c).is_some() => {
                        return Err(StmtResult::err(14, format!("Column '{c}' of '{}' cannot be set", t.name)));
                    }
                    None => {
                        return Err(StmtResult::err(14, format!("Unknown column {} in '{}'", clip(c), t.name)));
                    }
                }
            }
            if let Some(k) = order.iter().position(|&o| o == usize::MAX) {
                return Err(StmtResult::err(12, format!("Missing column '{}' for '{}'", wanted[k], t.name)));
            }
            if cols.len() != wanted.len() {
                return Err(StmtResult::err(14, format!("Expected columns ({})", wanted.join(", "))));
            }
            order
        }
    };
    rows.into_iter()
        .map(|r| {
            if r.len() != order.len() {
                return Err(StmtResult::err(
                    14,
                    format!("Expected {} values ({}), got {}", wanted.len(), wanted.join(", "), r.len()),
                ));
            }
            Ok(order.iter().map(|&i| r[i].clone()).collect())
        })
        .collect()
}

fn insert(table: &str, columns: Option<Vec<String>>, rows: Vec<Vec<Value>>) -> Result<Plan, StmtResult> {
    let t = table_named(table)?;
    let rows = insert_rows(t, columns, rows)?;
    match t.name {
        "pipes_messages" => {
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let (name, event, message) = (r[0].text(), r[1].text(), r[2].text());
                check_channel(name)?;
                check_event(event)?;
                out.push((name.to_string(), event.to_string(), message.to_string()));
            }
            Ok(Plan::Publish(out))
        }
        "pipes_settings" => {
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let name = r[0].text();
                check_channel(name)?;
                let len: u32 = r[1].text().trim().parse().ok().filter(|&n| n <= MAX_HISTORY).ok_or_else(|| {
                    StmtResult::err(12, format!("History length {} must be 0..{MAX_HISTORY}", clip(r[1].text())))
                })?;
                out.push((name.to_string(), len));
            }
            Ok(Plan::SettingsSet(out))
        }
        "users_auth" => {
            let mut v = Vec::with_capacity(rows.len());
            for r in rows {
                let id = user_id(&r[0])?;
                let hash = r[1].text();
                check_hash(hash)?;
                v.push((id, hash.to_string()));
            }
            let last = v.last().map_or(0, |x| x.0);
            Ok(Plan::User { query: UserQuery::AuthSet(v), proj: None, last_insert_id: last })
        }
        "users_messages" => {
            let mut v = Vec::with_capacity(rows.len());
            for r in rows {
                let id = user_id(&r[0])?;
                check_event(r[1].text())?;
                v.push((id, r[1].text().to_string(), r[2].text().to_string()));
            }
            let last = v.last().map_or(0, |x| x.0);
            Ok(Plan::User { query: UserQuery::Send(v), proj: None, last_insert_id: last })
        }
        "users_data" => {
            let mut v = Vec::with_capacity(rows.len());
            for r in rows {
                let id = user_id(&r[0])?;
                if r[1].text().len() > MAX_USER_DATA {
                    return Err(StmtResult::err(
                        11,
                        format!("User data for {id} is longer than {MAX_USER_DATA} bytes"),
                    ));
                }
                v.push((id, r[1].text().to_string()));
            }
            let last = v.last().map_or(0, |x| x.0);
            Ok(Plan::User { query: UserQuery::DataSet(v), proj: None, last_insert_id: last })
        }
        "revoked_tokens" => {
            let mut v = Vec::with_capacity(rows.len());
            for r in rows {
                let t = r[0].text();
                if t.is_empty() {
                    return Err(StmtResult::err(17, "Token is empty"));
                }
                if t.len() > 8192 {
                    return Err(StmtResult::err(11, "Token is longer than 8192 bytes"));
                }
                v.push(t.to_string());
            }
            Ok(Plan::User { query: UserQuery::Revoke(v), proj: None, last_insert_id: 0 })
        }
        other => Err(StmtResult::err(10, format!("Table '{other}' is read-only"))),
    }
}

/// Longest `users_data` text.
pub const MAX_USER_DATA: usize = 64 * 1024;

/// A user id from a value: a positive integer (code 12 otherwise).
fn user_id(v: &Value) -> Result<u64, StmtResult> {
    v.text()
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| StmtResult::err(12, format!("User id {} must be a positive integer", clip(v.text()))))
}

/// A `users_auth` hash: 1..128 characters of `[0-9A-Za-z=+/_.-]`.
fn check_hash(h: &str) -> Result<(), StmtResult> {
    if h.is_empty() {
        return Err(StmtResult::err(17, "Hash is empty"));
    }
    if h.len() > 128 {
        return Err(StmtResult::err(11, format!("Hash {} is longer than 128 characters", clip(h))));
    }
    if !h.bytes().all(|b| b.is_ascii_alphanumeric() || b"=+/_.-".contains(&b)) {
        return Err(StmtResult::err(12, format!("Hash {} may contain only 0-9A-Za-z=+/_.-", clip(h))));
    }
    Ok(())
}

/// The user ids of a WHERE on a user table's key.
fn ids_for(t: &Table, conds: &[Condition]) -> Result<Vec<u64>, StmtResult> {
    let kv = key_values(t, conds, &[t.key])?;
    let Some((_, vals)) = kv.into_iter().next() else {
        return Err(StmtResult::err(
            13,
            format!("WHERE must give primary-key values: {} = ... or {} IN (...)", t.key, t.key),
        ));
    };
    vals.iter().map(|v| user_id(&Value::Str(v.clone()))).collect()
}

fn user_plan(query: UserQuery, proj: Option<Projection>) -> Plan {
    Plan::User { query, proj, last_insert_id: 0 }
}

/// Checks WHERE conditions: every one on `allowed` columns. Returns values per column.
fn key_values(t: &Table, conds: &[Condition], allowed: &[&str]) -> Result<Vec<(String, Vec<String>)>, StmtResult> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for c in conds {
        if t.column_index(&c.column).is_none() {
            return Err(StmtResult::err(14, format!("Unknown column {} in '{}'", clip(&c.column), t.name)));
        }
        if !allowed.contains(&c.column.as_str()) {
            return Err(StmtResult::err(
                13,
                format!(
                    "WHERE must give primary-key values: {} is not the key of '{}' (use {})",
                    clip(&c.column),
                    t.name,
                    allowed.join(" or ")
                ),
            ));
        }
        let vals: Vec<String> = c.values.iter().map(|v| v.text().to_string()).collect();
        match out.iter_mut().find(|(k, _)| *k == c.column) {
            // `a IN (..) AND a = x`: the intersection.
            Some((_, prev)) => prev.retain(|v| vals.contains(v)),
            None => out.push((c.column.clone(), vals)),
        }
    }
    Ok(out)
}

fn projection(
    t: &'static Table,
    columns: Option<Vec<String>>,
    limit: Option<(u64, u64)>,
) -> Result<Projection, StmtResult> {
    let columns = match columns {
        None => (0..t.columns.len()).collect(),
        Some(cs) => cs
            .iter()
            .map(|c| {
                t.column_index(c)
                    .ok_or_else(|| StmtResult::err(14, format!("Unknown column {} in '{}'", clip(c), t.name)))
            })
            .collect::<Result<_, _>>()?,
    };
    Ok(Projection { table: t.name, columns, limit })
}

fn names_for(t: &Table, conds: &[Condition]) -> Result<Vec<String>, StmtResult> {
    let kv = key_values(t, conds, &[t.key])?;
    let Some((_, names)) = kv.into_iter().next() else {
        return Err(StmtResult::err(
            13,
            format!("WHERE must give primary-key values: {} = ... or {} IN (...)", t.key, t.key),
        ));
    };
    for n in &names {
        check_channel(n)?;
    }
    Ok(names)
}

fn select(
    table: &str,
    columns: Option<Vec<String>>,
    conds: Vec<Condition>,
    limit: Option<(u64, u64)>,
) -> Result<Plan, StmtResult> {
    let t = table_named(table)?;
    let proj = projection(t, columns, limit)?;
    match t.name {
        "pipes" => Ok(Plan::PipeCounts { names: names_for(t, &conds)?, proj }),
        "users_in_pipes" => Ok(Plan::Subscribers { names: names_for(t, &conds)?, proj }),
        "pipes_messages" => Ok(Plan::HistorySelect { names: names_for(t, &conds)?, proj }),
        "pipes_settings" => {
            let names = if conds.is_empty() { None } else { Some(names_for(t, &conds)?) };
            Ok(Plan::SettingsSelect { names, proj })
        }
        "users_auth" => Ok(user_plan(UserQuery::AuthSelect(ids_for(t, &conds)?), Some(proj))),
        "users_messages" => Ok(user_plan(UserQuery::QueueSelect(ids_for(t, &conds)?), Some(proj))),
        "users_time" => Ok(user_plan(UserQuery::Time(ids_for(t, &conds)?), Some(proj))),
        "users_data" => Ok(user_plan(UserQuery::DataSelect(ids_for(t, &conds)?), Some(proj))),
        "revoked_tokens" => {
            let kv = key_values(t, &conds, &[t.key])?;
            let tokens = kv.into_iter().next().map(|(_, v)| v);
            Ok(user_plan(UserQuery::RevokedSelect(tokens), Some(proj)))
        }
        other => Err(StmtResult::err(15, format!("Table '{other}' doesn't exist"))),
    }
}

fn delete(table: &str, conds: Vec<Condition>) -> Result<Plan, StmtResult> {
    let t = table_named(table)?;
    if !t.delete {
        return Err(StmtResult::err(10, format!("Table '{}' is read-only", t.name)));
    }
    match t.name {
        "pipes_messages" => {
            let kv = key_values(t, &conds, &["name", "id"])?;
            if kv.is_empty() {
                return Err(StmtResult::err(13, "WHERE must give primary-key values: name = ... or id = ..."));
            }
            let mut names = Vec::new();
            let mut ids = Vec::new();
            for (col, vals) in kv {
                if col == "name" {
                    for n in &vals {
                        check_channel(n)?;
                    }
                    names = vals;
                } else {
                    ids = vals
                        .iter()
                        .map(|v| {
                            v.parse()
                                .map_err(|_| StmtResult::err(12, format!("Message id {} is not a number", clip(v))))
                        })
                        .collect::<Result<_, _>>()?;
                }
            }
            Ok(Plan::HistoryDelete { names, ids })
        }
        "pipes_settings" => Ok(Plan::SettingsDelete(names_for(t, &conds)?)),
        "users_auth" => Ok(user_plan(UserQuery::AuthDelete(ids_for(t, &conds)?), None)),
        "users_messages" => Ok(user_plan(UserQuery::QueueDelete(ids_for(t, &conds)?), None)),
        "users_data" => Ok(user_plan(UserQuery::DataDelete(ids_for(t, &conds)?), None)),
        "revoked_tokens" => {
            let kv = key_values(t, &conds, &[t.key])?;
            let Some((_, tokens)) = kv.into_iter().next() else {
                return Err(StmtResult::err(13, "WHERE must give primary-key values: token = ..."));
            };
            Ok(user_plan(UserQuery::Unrevoke(tokens), None))
        }
        other => Err(StmtResult::err(10, format!("Table '{other}' is read-only"))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::parser::parse;
    use super::*;

    fn run(sql: &str) -> Plan {
        let ctx = Ctx {
            dev_id: 0,
            database: "CometQL_v1",
            connection_id: 1,
            may_use_dev: &|d| d < 10,
            status: &|| vec![("Uptime".into(), "5".into())],
            max_query_size: 1 << 20,
            charsets: (Charset::Latin1, Charset::Utf8mb4),
        };
        plan(parse(sql).unwrap().pop().unwrap(), &ctx)
    }

    fn err(sql: &str) -> (u16, String) {
        match run(sql) {
            Plan::Done(StmtResult::Err(c, m)) => (c, m),
            other => panic!("{sql}: expected an error, got {other:?}"),
        }
    }

    #[test]
    fn publish_plans_and_channel_errors_name_the_value() {
        assert_eq!(
            run("INSERT INTO pipes_messages (message, name, event) VALUES ('m', 'web_x', 'ev')"),
            Plan::Publish(vec![("web_x".into(), "ev".into(), "m".into())])
        );
        assert_eq!(
            err("INSERT INTO pipes_messages VALUES ('a b', 'e', 'm')"),
            (12, "Channel name 'a b' may contain only A-Za-z0-9_-".into())
        );
        assert_eq!(err("INSERT INTO pipes_messages VALUES ('ab', 'e', 'm')").0, 17);
        assert_eq!(err(&format!("INSERT INTO pipes_messages VALUES ('{}', 'e', 'm')", "a".repeat(65))).0, 11);
        assert_eq!(err("INSERT INTO pipes_messages VALUES ('abc', 'e')").0, 14);
        assert_eq!(err("INSERT INTO pipes_messages (name, id, message) VALUES ('abc', 1, 'm')").0, 14);
        assert_eq!(err("INSERT INTO pipes VALUES ('abc', 1)").0, 10);
        assert_eq!(err("INSERT INTO nope VALUES (1)"), (15, "Table 'nope' doesn't exist".into()));
    }

    #[test]
    fn a_4_mib_channel_name_gives_a_short_error_naming_its_start() {
        let long = "x".repeat(4 << 20);
        let (code, msg) = err(&format!("INSERT INTO pipes_messages VALUES ('{long}', 'e', 'm')"));
        assert_eq!(code, 11);
        assert!(msg.len() < 400, "{} bytes", msg.len());
        assert!(msg.starts_with(&format!("Channel name '{}...' (4194304 bytes)", "x".repeat(256))), "{msg}");
        let bad = format!("bad name{long}");
        let (code, msg) = err(&format!("INSERT INTO pipes_messages VALUES ('{bad}', 'e', 'm')"));
        assert_eq!(code, 12);
        assert!(msg.len() < 400 && msg.starts_with("Channel name 'bad namexxx"), "{}", &msg[..80]);
        assert!(msg.contains(&format!("({} bytes)", bad.len())));
    }

    #[test]
    fn every_error_quoting_a_huge_value_stays_short() {
        let v = "v".repeat(4 << 20);
        let digits = "9".repeat(4 << 20);
        let queries = [
            format!("INSERT INTO pipes_messages VALUES ('abc', '{v}', 'm')"),
            format!("INSERT INTO pipes_settings VALUES ('abc', '{v}')"),
            format!("INSERT INTO users_auth VALUES ('{v}', 'h')"),
            format!("INSERT INTO users_auth VALUES (1, '{v}')"),
            format!("INSERT INTO {v} VALUES (1)"),
            format!("INSERT INTO pipes_messages ({v}, event, message) VALUES ('a', 'b', 'c')"),
            format!("SELECT {v} FROM pipes WHERE name = 'abc'"),
            format!("SELECT * FROM pipes WHERE {v} = 'abc'"),
            format!("SELECT * FROM pipes WHERE name IN ('abc', '{v}')"),
            format!("SELECT * FROM users_time WHERE id = '{v}'"),
            format!("DELETE FROM pipes_messages WHERE id = '{v}'"),
            format!("SELECT {v}()"),
            format!("USE {v}"),
            format!("USE db_9{digits}"),
            format!("SELECT * FROM pipes WHERE name = 'abc' '{v}'"),
            format!("SELECT * FROM pipes WHERE name = 'abc' {v}"),
            format!("SELECT * FROM pipes WHERE name = 'abc' {digits}"),
            format!("SELECT * FROM pipes WHERE name = 'abc' @@{v}"),
            format!("SELECT * FROM pipes WHERE name = 'abc' @{v}"),
            format!("SELECT * FROM pipes WHERE {v} LIKE 'x'"),
            format!("SELECT * FROM pipes LIMIT {digits}"),
            format!("{v} 1"),
            format!("SELECT '{v}"),
            format!("SELECT `{v}"),
            format!("SELECT 1 /* {v}"),
        ];
        for q in &queries {
            let (code, msg) = match parse(q) {
                Ok(mut st) => err_of(plan(st.remove(0), &Ctx::standalone(1 << 20)), q),
                Err(e) => (e.code, e.message),
            };
            assert!(msg.len() < 700, "{}: {code} {} bytes: {}", &q[..60], msg.len(), &msg[..100]);
            assert!(msg.contains(" bytes)"), "{}: {msg}", &q[..60]);
        }
    }

    fn err_of(p: Plan, q: &str) -> (u16, String) {
        match p {
            Plan::Done(StmtResult::Err(c, m)) => (c, m),
            other => panic!("{}: expected an error, got {:?}", &q[..60], std::mem::discriminant(&other)),
        }
    }

    #[test]
    fn where_must_use_the_key() {
        assert_eq!(err("SELECT * FROM pipes").0, 13);
        assert_eq!(err("SELECT * FROM pipes WHERE users = 1").0, 13);
        assert_eq!(err("SELECT nope FROM pipes WHERE name = 'abc'").0, 14);
        assert_eq!(err("DELETE FROM pipes WHERE name = 'abc'").0, 10);
        assert_eq!(err("SELECT * FROM users_auth WHERE hash = 'x'").0, 13);
        assert!(matches!(run("SELECT users FROM pipes WHERE name IN ('abc', 'web_d')"), Plan::PipeCounts { .. }));
        assert_eq!(run("DELETE FROM pipes_messages WHERE id = 7"), Plan::HistoryDelete { names: vec![], ids: vec![7] });
    }

    #[test]
    fn settings_length_is_bounded() {
        assert_eq!(
            run("INSERT INTO pipes_settings VALUES ('web_h', 10)"),
            Plan::SettingsSet(vec![("web_h".into(), 10)])
        );
        assert_eq!(err("INSERT INTO pipes_settings VALUES ('web_h', 1001)").0, 12);
        assert_eq!(err("INSERT INTO pipes_settings VALUES ('web_h', -1)").0, 12);
    }

    #[test]
    fn projection_and_limit() {
        let Plan::HistorySelect { proj, .. } =
            run("SELECT message, id FROM pipes_messages WHERE name = 'abc' LIMIT 1, 1")
        else {
            panic!()
        };
        let row = |i: &str| (0..7).map(|k| Some(format!("{i}{k}"))).collect::<Vec<_>>();
        let rs = proj.apply(vec![row("a"), row("b"), row("c")]);
        assert_eq!(rs.columns, ["message", "id"]);
        assert_eq!(rs.rows, vec![vec![Some("b5".into()), Some("b0".into())]]);
    }

    #[test]
    fn connect_time_queries() {
        let Plan::Done(StmtResult::Rows(rs)) = run("SELECT @@version_comment LIMIT 1") else { panic!() };
        assert_eq!(rs.rows[0][0].as_deref(), Some("comet push server (CometQL)"));
        // The session's character sets (the test context: latin1 in, utf8mb4 out).
        let Plan::Done(StmtResult::Rows(rs)) = run("SELECT @@character_set_client, @@character_set_results") else {
            panic!()
        };
        assert_eq!(rs.rows[0], [Some("latin1".to_string()), Some("utf8mb4".to_string())]);
        let Plan::Done(StmtResult::Rows(rs)) = run("SHOW VARIABLES LIKE 'max_allowed_packet'") else { panic!() };
        assert_eq!(rs.rows, vec![vec![Some("max_allowed_packet".into()), Some("1048576".into())]]);
        let Plan::Done(StmtResult::Rows(rs)) = run("SHOW VARIABLES LIKE '%VERSION\\_c%'") else { panic!() };
        assert_eq!(rs.rows.len(), 2, "version_comment and version_compile_os");
        // The pattern that froze a shard for 41 s, with 64 `%`: no rows, at once.
        let Plan::Done(StmtResult::Rows(rs)) = run(&format!("SHOW VARIABLES LIKE '{}q'", "%".repeat(64))) else {
            panic!()
        };
        assert!(rs.rows.is_empty());
        let Plan::Done(StmtResult::Rows(rs)) = run("SHOW TABLES") else { panic!() };
        assert_eq!(rs.rows.len(), TABLES.len());
        assert_eq!(run("USE db_3"), Plan::UseDb { dev_id: 3, name: "db_3".into() });
        assert_eq!(err("USE db_30").0, 403);
        assert_eq!(err("USE mysql").0, 15);
        assert_eq!(err("SELECT NOW()").0, 2);
    }
}
