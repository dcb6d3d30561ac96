//! The CometQL dialect: a hand-written recursive-descent parser over
//! [`lexer`](super::lexer) tokens (docs/cometql.md, "Statements").
//!
//! It knows statement shapes only; which tables and columns exist, and what
//! a WHERE may name, is checked by [`tables`](super::tables) and the
//! executor, so every error can name the offending value.

use super::lexer::{Tok, lex};
use crate::domain::clip;

/// A literal value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Str(String),
    /// A number as written (`42`, `-7`, `1.5`).
    Num(String),
    Null,
}

impl Value {
    /// The value as text (numbers as written, NULL as empty).
    pub fn text(&self) -> &str {
        match self {
            Value::Str(s) | Value::Num(s) => s,
            Value::Null => "",
        }
    }
}

/// `col = v` or `col IN (v, ...)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub column: String,
    pub values: Vec<Value>,
}

/// One item of a table-less `SELECT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    SysVar(String),
    /// `DATABASE()`, `VERSION()`, ... (name upper-cased).
    Func(String),
    Lit(Value),
}

/// One statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    Insert {
        table: String,
        columns: Option<Vec<String>>,
        rows: Vec<Vec<Value>>,
    },
    Select {
        table: String,
        columns: Option<Vec<String>>,
        conditions: Vec<Condition>,
        limit: Option<(u64, u64)>,
    },
    Delete {
        table: String,
        conditions: Vec<Condition>,
    },
    /// `SELECT @@x, DATABASE(), 1 [LIMIT n]`: (expression, column label).
    SelectExprs(Vec<(Expr, String)>),
    ShowDatabases,
    ShowTables,
    ShowColumns {
        table: String,
    },
    ShowStatus {
        like: Option<String>,
    },
    ShowVariables {
        like: Option<String>,
    },
    /// `SET ...`: accepted; of its assignments only the connection's
    /// character sets have an effect, which the session applies.
    Set(Vec<CharsetSet>),
    Use(String),
    /// A statement of a multi-statement query that did not parse: it fails
    /// when its turn comes.
    Failed(ParseError),
}

/// Which character set variable a `SET` assigns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CharsetVar {
    /// `SET NAMES x`: client, connection and results.
    Names,
    /// `SET CHARACTER SET x` (or `CHARSET x`): client and results.
    CharacterSet,
    /// `character_set_client = x`.
    Client,
    /// `character_set_results = x` (`NULL`: results are not converted).
    Results,
    /// `character_set_connection = x`: checked, no effect (comet converts to
    /// UTF-8 at the edge).
    Connection,
}

/// One character set assignment of a `SET`; `None` is `NULL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharsetSet {
    pub var: CharsetVar,
    pub name: Option<String>,
}

/// A parse error: code from docs/cometql.md ("Errors") and a message naming the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub code: u16,
    pub message: String,
}

/// Limits that keep one statement's work bounded (error codes 18..21).
pub const MAX_CONDITIONS: usize = 8;
pub const MAX_VALUES: usize = 1000;
pub const MAX_COLUMNS: usize = 16;
pub const MAX_ROWS: usize = 1000;

fn syntax(msg: impl Into<String>) -> ParseError {
    ParseError { code: 3, message: msg.into() }
}

/// Parses a query text into statements (split on `;`, empty ones dropped).
pub fn parse(sql: &str) -> Result<Vec<Statement>, ParseError> {
    parse_each(sql)?.into_iter().collect()
}

/// Parses each `;`-separated statement on its own, as MySQL runs them one
/// by one: statements before a bad one still run. Only a lexing error
/// (an unterminated string, say) fails the whole text.
pub fn parse_each(sql: &str) -> Result<Vec<Result<Statement, ParseError>>, ParseError> {
    let toks = lex(sql).map_err(|e| syntax(e.0))?;
    Ok(toks
        .split(|t| *t == Tok::Sym(';'))
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut p = Parser { t: part, i: 0 };
            let st = p.statement()?;
            if p.i < p.t.len() {
                return Err(syntax(format!("unexpected {} after the statement", p.describe())));
            }
            Ok(st)
        })
        .collect())
}

/// A cursor over one statement's tokens (statements never span a `;`).
struct Parser<'a> {
    t: &'a [Tok],
    i: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i)
    }

    /// The token at the cursor for an error message; client text is
    /// clipped, so a 16 MiB literal in the wrong place gives a short error.
    fn describe(&self) -> String {
        match self.peek() {
            None => "end of query".into(),
            Some(Tok::Word(w)) | Some(Tok::Quoted(w)) => clip(w).to_string(),
            Some(Tok::Str(s)) => format!("string {}", clip(s)),
            Some(Tok::Num(n)) => format!("number {}", clip(n)),
            Some(Tok::SysVar(v)) => format!("@@{}", clip(v)),
            Some(Tok::UserVar(v)) => format!("@{}", clip(v)),
            Some(Tok::Sym(c)) => format!("'{c}'"),
        }
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        if self.is_kw(kw) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect_kw(&mut self, kw: &str) -> Result<(), ParseError> {
        if self.eat_kw(kw) { Ok(()) } else { Err(syntax(format!("expected {kw}, found {}", self.describe()))) }
    }

    fn eat_sym(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Sym(c)) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect_sym(&mut self, c: char) -> Result<(), ParseError> {
        if self.eat_sym(c) { Ok(()) } else { Err(syntax(format!("expected '{c}', found {}", self.describe()))) }
    }

    /// A table or column name (bare or backquoted), lower-cased.
    fn ident(&mut self) -> Result<String, ParseError> {
        match self.peek() {
            Some(Tok::Word(w)) | Some(Tok::Quoted(w)) => {
                let w = w.to_ascii_lowercase();
                self.i += 1;
                // `db.table`: the database part is ignored here.
                if self.eat_sym('.') {
                    return self.ident();
                }
                Ok(w)
            }
            _ => Err(syntax(format!("expected a name, found {}", self.describe()))),
        }
    }

    fn value(&mut self) -> Result<Value, ParseError> {
        let v = match self.peek() {
            Some(Tok::Str(s)) => Value::Str(s.clone()),
            Some(Tok::Num(n)) => Value::Num(n.clone()),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("null") => Value::Null,
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("true") => Value::Num("1".into()),
            Some(Tok::Word(w)) if w.eq_ignore_ascii_case("false") => Value::Num("0".into()),
            Some(Tok::Sym('-')) => {
                self.i += 1;
                return match self.peek() {
                    Some(Tok::Num(n)) => {
                        let v = Value::Num(format!("-{n}"));
                        self.i += 1;
                        Ok(v)
                    }
                    _ => Err(syntax(format!("expected a number after '-', found {}", self.describe()))),
                };
            }
            _ => return Err(syntax(format!("expected a value, found {}", self.describe()))),
        };
        self.i += 1;
        Ok(v)
    }

    fn value_list(&mut self) -> Result<Vec<Value>, ParseError> {
        self.expect_sym('(')?;
        let mut v = vec![self.value()?];
        while self.eat_sym(',') {
            v.push(self.value()?);
            if v.len() > MAX_VALUES {
                return Err(ParseError { code: 19, message: format!("too many values: at most {MAX_VALUES}") });
            }
        }
        self.expect_sym(')')?;
        Ok(v)
    }

    fn statement(&mut self) -> Result<Statement, ParseError> {
        if self.eat_kw("insert") {
            return self.insert();
        }
        if self.eat_kw("select") {
            return self.select();
        }
        if self.eat_kw("delete") {
            self.expect_kw("from")?;
            let table = self.ident()?;
            let conditions = self.where_clause()?;
            return Ok(Statement::Delete { table, conditions });
        }
        if self.eat_kw("show") {
            return self.show();
        }
        if self.eat_kw("describe") || self.eat_kw("desc") {
            let table = self.ident()?;
            return Ok(Statement::ShowColumns { table });
        }
        if self.eat_kw("set") {
            return Ok(Statement::Set(self.set_items()));
        }
        if self.eat_kw("use") {
            let db = self.ident_raw()?;
            return Ok(Statement::Use(db));
        }
        Err(syntax(format!("unknown statement starting with {}", self.describe())))
    }

    /// The assignments of a `SET`, comma-separated. Only character set
    /// assignments are kept; any other (`autocommit=1`, `SESSION
    /// sql_mode=...`) is skipped to the next comma outside parentheses, as
    /// comet has no such settings.
    fn set_items(&mut self) -> Vec<CharsetSet> {
        let mut out = Vec::new();
        while self.i < self.t.len() {
            for scope in ["session", "local", "global", "persist"] {
                self.eat_kw(scope);
            }
            let var = if self.eat_kw("names") {
                Some(CharsetVar::Names)
            } else if self.eat_kw("charset") || (self.is_kw("character") && self.next_is_kw("set")) {
                if self.eat_kw("character") {
                    self.i += 1;
                }
                Some(CharsetVar::CharacterSet)
            } else {
                let name = match self.peek() {
                    Some(Tok::Word(w)) | Some(Tok::Quoted(w)) => Some(w.to_ascii_lowercase()),
                    Some(Tok::SysVar(v)) => {
                        let v = v.to_ascii_lowercase();
                        let v = ["session.", "local.", "global."].iter().fold(v, |v, p| match v.strip_prefix(p) {
                            Some(rest) => rest.to_string(),
                            None => v,
                        });
                        Some(v)
                    }
                    _ => None,
                };
                let var = match name.as_deref() {
                    Some("character_set_client") => Some(CharsetVar::Client),
                    Some("character_set_results") => Some(CharsetVar::Results),
                    Some("character_set_connection") => Some(CharsetVar::Connection),
                    _ => None,
                };
                if var.is_some() {
                    self.i += 1;
                    self.eat_sym(':');
                    self.eat_sym('=');
                }
                var
            };
            if let Some(var) = var {
                let name = match self.peek() {
                    Some(Tok::Word(w)) if w.eq_ignore_ascii_case("null") => None,
                    Some(Tok::Word(w)) | Some(Tok::Quoted(w)) | Some(Tok::Str(w)) => Some(w.clone()),
                    // `SET NAMES` with nothing (or a number) after it: a name
                    // MySQL does not know either.
                    _ => Some(self.describe()),
                };
                out.push(CharsetSet { var, name });
            }
            let mut depth = 0usize;
            while let Some(t) = self.peek() {
                match t {
                    Tok::Sym('(') => depth += 1,
                    Tok::Sym(')') => depth = depth.saturating_sub(1),
                    Tok::Sym(',') if depth == 0 => break,
                    _ => {}
                }
                self.i += 1;
            }
            self.eat_sym(',');
        }
        out
    }

    fn next_is_kw(&self, kw: &str) -> bool {
        matches!(self.t.get(self.i + 1), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
    }

    /// A name with its case kept (database names).
    fn ident_raw(&mut self) -> Result<String, ParseError> {
        match self.peek() {
            Some(Tok::Word(w)) | Some(Tok::Quoted(w)) => {
                let w = w.clone();
                self.i += 1;
                Ok(w)
            }
            _ => Err(syntax(format!("expected a name, found {}", self.describe()))),
        }
    }

    fn insert(&mut self) -> Result<Statement, ParseError> {
        self.eat_kw("into");
        let table = self.ident()?;
        let columns = if self.eat_sym('(') {
            let mut c = vec![self.ident()?];
            while self.eat_sym(',') {
                c.push(self.ident()?);
                if c.len() > MAX_COLUMNS {
                    return Err(ParseError { code: 20, message: format!("too many columns: at most {MAX_COLUMNS}") });
                }
            }
            self.expect_sym(')')?;
            Some(c)
        } else {
            None
        };
        if !(self.eat_kw("values") || self.eat_kw("value")) {
            return Err(syntax(format!("expected VALUES, found {}", self.describe())));
        }
        let mut rows = vec![self.value_list()?];
        while self.eat_sym(',') {
            rows.push(self.value_list()?);
            if rows.len() > MAX_ROWS {
                return Err(ParseError { code: 19, message: format!("too many rows: at most {MAX_ROWS}") });
            }
        }
        Ok(Statement::Insert { table, columns, rows })
    }

    fn select(&mut self) -> Result<Statement, ParseError> {
        // Table-less SELECT: @@vars, functions, literals.
        let literal_word = ["null", "true", "false"].iter().any(|w| self.is_kw(w));
        let table_select = matches!(self.peek(), Some(Tok::Sym('*')))
            || (matches!(self.peek(), Some(Tok::Word(_)) | Some(Tok::Quoted(_)))
                && !literal_word
                && !matches!(self.t.get(self.i + 1), Some(Tok::Sym('('))));
        if !table_select {
            return self.select_exprs();
        }
        let columns = if self.eat_sym('*') {
            None
        } else {
            let mut c = vec![self.ident()?];
            while self.eat_sym(',') {
                c.push(self.ident()?);
                if c.len() > MAX_COLUMNS {
                    return Err(ParseError { code: 20, message: format!("too many columns: at most {MAX_COLUMNS}") });
                }
            }
            Some(c)
        };
        self.expect_kw("from")?;
        let table = self.ident()?;
        let conditions = if self.is_kw("where") { self.where_clause()? } else { Vec::new() };
        let limit = self.limit()?;
        Ok(Statement::Select { table, columns, conditions, limit })
    }

    fn limit(&mut self) -> Result<Option<(u64, u64)>, ParseError> {
        if !self.eat_kw("limit") {
            return Ok(None);
        }
        let a = self.number()?;
        if self.eat_sym(',') {
            let b = self.number()?;
            return Ok(Some((a, b)));
        }
        if self.eat_kw("offset") {
            let off = self.number()?;
            return Ok(Some((off, a)));
        }
        Ok(Some((0, a)))
    }

    fn number(&mut self) -> Result<u64, ParseError> {
        match self.peek() {
            Some(Tok::Num(n)) => {
                let v = n
                    .parse()
                    .map_err(|_| ParseError { code: 12, message: format!("{} is not a whole number", clip(n)) })?;
                self.i += 1;
                Ok(v)
            }
            _ => Err(syntax(format!("expected a number, found {}", self.describe()))),
        }
    }

    fn select_exprs(&mut self) -> Result<Statement, ParseError> {
        let mut items = Vec::new();
        loop {
            let (expr, label) = match self.peek().cloned() {
                Some(Tok::SysVar(v)) => {
                    self.i += 1;
                    let name = v.rsplit('.').next().unwrap_or(&v).to_ascii_lowercase();
                    (Expr::SysVar(name), format!("@@{v}"))
                }
                Some(Tok::Word(w)) if self.t.get(self.i + 1) == Some(&Tok::Sym('(')) => {
                    self.i += 2;
                    self.expect_sym(')')?;
                    (Expr::Func(w.to_ascii_uppercase()), format!("{w}()"))
                }
                Some(Tok::Word(w)) if ["null", "true", "false"].iter().any(|k| w.eq_ignore_ascii_case(k)) => {
                    let v = self.value()?;
                    (Expr::Lit(v), w.to_ascii_uppercase())
                }
                Some(Tok::Str(_)) | Some(Tok::Num(_)) | Some(Tok::Sym('-')) => {
                    let v = self.value()?;
                    // MySQL names a literal's column after the literal, cut
                    // short: a 17 MiB string must not become the column name.
                    let label: String = v.text().chars().take(64).collect();
                    (Expr::Lit(v), label)
                }
                _ => return Err(syntax(format!("cannot select {}", self.describe()))),
            };
            let label = if self.eat_kw("as") {
                match self.peek().cloned() {
                    Some(Tok::Word(w)) | Some(Tok::Quoted(w)) | Some(Tok::Str(w)) => {
                        self.i += 1;
                        w
                    }
                    _ => return Err(syntax(format!("expected an alias, found {}", self.describe()))),
                }
            } else {
                label
            };
            items.push((expr, label));
            if !self.eat_sym(',') {
                break;
            }
            if items.len() >= MAX_COLUMNS * 4 {
                return Err(ParseError { code: 20, message: "too many columns".into() });
            }
        }
        if self.eat_kw("from") {
            // `SELECT 1 FROM DUAL`
            self.expect_kw("dual")?;
        }
        self.limit()?;
        Ok(Statement::SelectExprs(items))
    }

    fn where_clause(&mut self) -> Result<Vec<Condition>, ParseError> {
        if !self.eat_kw("where") {
            return Ok(Vec::new());
        }
        let mut conds = Vec::new();
        loop {
            let column = self.ident()?;
            let values = if self.eat_sym('=') {
                vec![self.value()?]
            } else if self.eat_kw("in") {
                self.value_list()?
            } else {
                return Err(syntax(format!("expected '=' or IN after {}, found {}", clip(&column), self.describe())));
            };
            conds.push(Condition { column, values });
            if conds.len() > MAX_CONDITIONS {
                return Err(ParseError { code: 18, message: format!("too many conditions: at most {MAX_CONDITIONS}") });
            }
            if !self.eat_kw("and") {
                break;
            }
        }
        Ok(conds)
    }

    fn show(&mut self) -> Result<Statement, ParseError> {
        let _ = self.eat_kw("global") || self.eat_kw("session");
        let full = self.eat_kw("full");
        if self.eat_kw("databases") || self.eat_kw("schemas") {
            return Ok(Statement::ShowDatabases);
        }
        if self.eat_kw("tables") {
            if self.eat_kw("from") || self.eat_kw("in") {
                self.ident_raw()?;
            }
            self.like()?;
            return Ok(Statement::ShowTables);
        }
        if self.eat_kw("columns") || self.eat_kw("fields") {
            if !(self.eat_kw("from") || self.eat_kw("in")) {
                return Err(syntax(format!("expected FROM, found {}", self.describe())));
            }
            let table = self.ident()?;
            if self.eat_kw("from") || self.eat_kw("in") {
                self.ident_raw()?;
            }
            let _ = full;
            return Ok(Statement::ShowColumns { table });
        }
        if self.eat_kw("status") {
            return Ok(Statement::ShowStatus { like: self.like()? });
        }
        if self.eat_kw("variables") {
            return Ok(Statement::ShowVariables { like: self.like()? });
        }
        Err(syntax(format!("unknown SHOW {}", self.describe())))
    }

    fn like(&mut self) -> Result<Option<String>, ParseError> {
        if self.eat_kw("like") {
            match self.peek().cloned() {
                Some(Tok::Str(s)) => {
                    self.i += 1;
                    Ok(Some(s))
                }
                _ => Err(syntax(format!("expected a pattern after LIKE, found {}", self.describe()))),
            }
        } else if self.is_kw("where") {
            // SHOW VARIABLES WHERE ...: answer with everything.
            self.i = self.t.len();
            Ok(None)
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Statement {
        let mut v = parse(sql).unwrap();
        assert_eq!(v.len(), 1, "{sql}");
        v.pop().unwrap()
    }

    #[test]
    fn insert_with_columns_and_multiple_rows() {
        assert_eq!(
            one(
                r#"insert INTO pipes_messages (name, event, message) VALUES ('web_a', "e1", '{\"x\":1}'), ('b2', 'e2', 'it''s')"#
            ),
            Statement::Insert {
                table: "pipes_messages".into(),
                columns: Some(vec!["name".into(), "event".into(), "message".into()]),
                rows: vec![
                    vec![Value::Str("web_a".into()), Value::Str("e1".into()), Value::Str(r#"{"x":1}"#.into())],
                    vec![Value::Str("b2".into()), Value::Str("e2".into()), Value::Str("it's".into())],
                ],
            }
        );
    }

    #[test]
    fn index_is_a_column_name_and_integers_may_be_quoted() {
        assert_eq!(
            one("SELECT id, index, `event` FROM users_messages WHERE id IN (1, '2', -3) AND index = 0 LIMIT 5, 10"),
            Statement::Select {
                table: "users_messages".into(),
                columns: Some(vec!["id".into(), "index".into(), "event".into()]),
                conditions: vec![
                    Condition {
                        column: "id".into(),
                        values: vec![Value::Num("1".into()), Value::Str("2".into()), Value::Num("-3".into())]
                    },
                    Condition { column: "index".into(), values: vec![Value::Num("0".into())] },
                ],
                limit: Some((5, 10)),
            }
        );
    }

    #[test]
    fn driver_connect_statements() {
        assert_eq!(
            one("SELECT @@version_comment LIMIT 1"),
            Statement::SelectExprs(vec![(Expr::SysVar("version_comment".into()), "@@version_comment".into())])
        );
        assert_eq!(
            one("select DATABASE(), version(), 1"),
            Statement::SelectExprs(vec![
                (Expr::Func("DATABASE".into()), "DATABASE()".into()),
                (Expr::Func("VERSION".into()), "version()".into()),
                (Expr::Lit(Value::Num("1".into())), "1".into()),
            ])
        );
        assert_eq!(
            one("SELECT @@session.auto_increment_increment AS auto_increment_increment"),
            Statement::SelectExprs(vec![(
                Expr::SysVar("auto_increment_increment".into()),
                "auto_increment_increment".into()
            )])
        );
        let cs = |var, name: Option<&str>| CharsetSet { var, name: name.map(str::to_string) };
        assert_eq!(one("SET NAMES utf8mb4"), Statement::Set(vec![cs(CharsetVar::Names, Some("utf8mb4"))]));
        assert_eq!(one("set autocommit=1"), Statement::Set(vec![]));
        assert_eq!(
            one("SET autocommit=1, NAMES 'latin1' COLLATE latin1_swedish_ci, sql_mode=CONCAT(@@sql_mode, ',X')"),
            Statement::Set(vec![cs(CharsetVar::Names, Some("latin1"))])
        );
        assert_eq!(
            one("SET CHARACTER SET latin1, @@session.character_set_results = NULL, SESSION character_set_client=utf8"),
            Statement::Set(vec![
                cs(CharsetVar::CharacterSet, Some("latin1")),
                cs(CharsetVar::Results, None),
                cs(CharsetVar::Client, Some("utf8")),
            ])
        );
        assert_eq!(one("SET CHARSET gbk"), Statement::Set(vec![cs(CharsetVar::CharacterSet, Some("gbk"))]));
        assert_eq!(one("SET NAMES"), Statement::Set(vec![cs(CharsetVar::Names, Some("end of query"))]));
        assert_eq!(
            one("SHOW VARIABLES LIKE 'max_allowed%'"),
            Statement::ShowVariables { like: Some("max_allowed%".into()) }
        );
        assert_eq!(one("SHOW FULL COLUMNS FROM pipes"), Statement::ShowColumns { table: "pipes".into() });
        assert_eq!(one("describe `pipes_settings`"), Statement::ShowColumns { table: "pipes_settings".into() });
        assert_eq!(one("SHOW GLOBAL STATUS"), Statement::ShowStatus { like: None });
        assert_eq!(one("USE db_3"), Statement::Use("db_3".into()));
    }

    #[test]
    fn several_statements_split_on_semicolons() {
        assert_eq!(parse("SELECT 1; ; SHOW TABLES;").unwrap().len(), 2);
        assert_eq!(parse("   ").unwrap().len(), 0);
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let e = parse("SELEKT * FROM pipes").unwrap_err();
        assert_eq!(e.code, 3);
        assert!(e.message.contains("'SELEKT'"), "{}", e.message);
        let e = parse("DELETE FROM pipes WHERE name LIKE 'x'").unwrap_err();
        assert!(e.message.contains("'LIKE'"), "{}", e.message);
        let e = parse("INSERT INTO t VALUES ('a'").unwrap_err();
        assert!(e.message.contains("end of query"), "{}", e.message);
        let many = format!("SELECT * FROM pipes WHERE {}", ["name = 'a'"; 9].join(" AND "));
        assert_eq!(parse(&many).unwrap_err().code, 18);
        assert_eq!(parse("SELECT * FROM pipes LIMIT 1.5").unwrap_err().code, 12);
    }
}
