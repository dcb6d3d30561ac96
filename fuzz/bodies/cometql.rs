//! Fuzz body for the CometQL lexer, parser and planner
//! (`comet::cometql::{lexer, parser, exec}`, docs/cometql.md).
//!
//! The input is a query text. Only a lexing error may fail the whole text;
//! every statement that parses is written back as canonical SQL (quoted
//! names, escaped strings, `IN` lists) and must parse to itself, which pins
//! string unescaping, name folding and each statement shape. Every plan is
//! checked for what the shard glue relies on: error codes from docs/cometql.md, rows as
//! wide as their columns, channel names valid before anything is published.

use comet::cometql::exec::{self, Ctx, Plan, StmtResult};
use comet::cometql::lexer::lex;
use comet::cometql::parser::{CharsetSet, CharsetVar, Condition, Expr, Statement, Value, parse, parse_each};
use comet::cometql::tables;
use comet::users::UserQuery;

pub fn run(data: &[u8]) {
    let sql = String::from_utf8_lossy(data);
    let each = parse_each(&sql);
    assert_eq!(each.is_err(), lex(&sql).is_err(), "only a lexing error fails the whole text");
    let Ok(each) = each else {
        return;
    };
    assert_eq!(parse(&sql).ok(), each.iter().cloned().collect::<Result<Vec<_>, _>>().ok());
    let ctx = Ctx::standalone(1 << 20);
    for st in each {
        let st = match st {
            Ok(st) => st,
            Err(e) => {
                assert!(known_code(e.code) && !e.message.is_empty(), "parse error {e:?}");
                continue;
            }
        };
        let text = sql_of(&st);
        assert_eq!(parse(&text), Ok(vec![st.clone()]), "written back as {text:?}");
        check_plan(exec::plan(st, &ctx));
    }
}

/// The error codes of docs/cometql.md ("Errors").
fn known_code(code: u16) -> bool {
    matches!(code, 1..=3 | 10..=21 | 403 | 500)
}

fn check_plan(plan: Plan) {
    let proj_ok = |p: &exec::Projection| {
        let t = tables::find(p.table).expect("projection on a known table");
        assert!(!p.columns.is_empty() && p.columns.iter().all(|&c| c < t.columns.len()), "{p:?}");
    };
    match plan {
        Plan::Done(StmtResult::Err(code, msg)) => assert!(known_code(code) && !msg.is_empty(), "{code}: {msg}"),
        Plan::Done(StmtResult::Rows(rs)) => {
            assert!(!rs.columns.is_empty());
            assert!(rs.rows.iter().all(|r| r.len() == rs.columns.len()), "{rs:?}");
        }
        Plan::Done(StmtResult::Ok { .. }) | Plan::UseDb { .. } => {}
        Plan::Publish(msgs) => {
            assert!(!msgs.is_empty());
            for (pipe, event, _) in &msgs {
                assert!(exec::check_channel(pipe).is_ok(), "publish to {pipe:?}");
                assert!(!event.is_empty() && event.len() <= 64 && event.bytes().all(comet::frontend::is_name_char));
            }
        }
        Plan::PipeCounts { names, proj } | Plan::Subscribers { names, proj } | Plan::HistorySelect { names, proj } => {
            assert!(names.iter().all(|n| exec::check_channel(n).is_ok()), "{names:?}");
            proj_ok(&proj);
        }
        Plan::SettingsSelect { names, proj } => {
            assert!(names.unwrap_or_default().iter().all(|n| exec::check_channel(n).is_ok()));
            proj_ok(&proj);
        }
        Plan::HistoryDelete { names, .. } | Plan::SettingsDelete(names) => {
            assert!(names.iter().all(|n| exec::check_channel(n).is_ok()), "{names:?}");
        }
        Plan::SettingsSet(items) => {
            assert!(items.iter().all(|(n, len)| exec::check_channel(n).is_ok() && *len <= exec::MAX_HISTORY));
        }
        Plan::User { query, proj, .. } => {
            // Tokens route by the user they claim (0 when none); every
            // other user query names positive ids only.
            let by_token = matches!(query, UserQuery::Revoke(_) | UserQuery::Unrevoke(_));
            if let Some(ids) = query.user_ids().filter(|_| !by_token) {
                assert!(ids.iter().all(|&id| id > 0), "user ids are positive: {ids:?}");
            }
            if let Some(p) = &proj {
                proj_ok(p);
            }
        }
    }
}

/// One statement as canonical CometQL.
fn sql_of(st: &Statement) -> String {
    let names = |v: &[String]| v.iter().map(|c| name(c)).collect::<Vec<_>>().join(", ");
    let like = |l: &Option<String>| l.as_ref().map(|p| format!(" LIKE {}", string(p))).unwrap_or_default();
    match st {
        Statement::Insert { table, columns, rows } => {
            let cols = columns.as_ref().map(|c| format!(" ({})", names(c))).unwrap_or_default();
            let rows: Vec<String> = rows.iter().map(|r| format!("({})", values(r))).collect();
            format!("INSERT INTO {}{cols} VALUES {}", name(table), rows.join(", "))
        }
        Statement::Select { table, columns, conditions, limit } => {
            let cols = columns.as_ref().map_or("*".to_string(), |c| names(c));
            let limit = limit.map(|(o, n)| format!(" LIMIT {o}, {n}")).unwrap_or_default();
            format!("SELECT {cols} FROM {}{}{limit}", name(table), where_clause(conditions))
        }
        Statement::Delete { table, conditions } => format!("DELETE FROM {}{}", name(table), where_clause(conditions)),
        Statement::SelectExprs(items) => {
            let items: Vec<String> = items
                .iter()
                .map(|(e, label)| {
                    let e = match e {
                        Expr::SysVar(v) => format!("@@{v}"),
                        Expr::Func(f) => format!("{f}()"),
                        Expr::Lit(v) => value(v),
                    };
                    format!("{e} AS {}", string(label))
                })
                .collect();
            format!("SELECT {}", items.join(", "))
        }
        Statement::ShowDatabases => "SHOW DATABASES".into(),
        Statement::ShowTables => "SHOW TABLES".into(),
        Statement::ShowColumns { table } => format!("SHOW COLUMNS FROM {}", name(table)),
        Statement::ShowStatus { like: l } => format!("SHOW STATUS{}", like(l)),
        Statement::ShowVariables { like: l } => format!("SHOW VARIABLES{}", like(l)),
        Statement::Set(items) if items.is_empty() => "SET autocommit = 1".into(),
        Statement::Set(items) => {
            let items: Vec<String> = items
                .iter()
                .map(|CharsetSet { var, name }| {
                    let v = name.as_deref().map_or("NULL".to_string(), string);
                    match var {
                        CharsetVar::Names => format!("NAMES {v}"),
                        CharsetVar::CharacterSet => format!("CHARACTER SET {v}"),
                        CharsetVar::Client => format!("character_set_client = {v}"),
                        CharsetVar::Results => format!("@@session.character_set_results = {v}"),
                        CharsetVar::Connection => format!("SESSION character_set_connection := {v}"),
                    }
                })
                .collect();
            format!("SET {}", items.join(", "))
        }
        Statement::Use(db) => format!("USE {}", name(db)),
        Statement::Failed(e) => panic!("the parser never returns Failed: {e:?}"),
    }
}

fn where_clause(conds: &[Condition]) -> String {
    if conds.is_empty() {
        return String::new();
    }
    let c: Vec<String> = conds.iter().map(|c| format!("{} IN ({})", name(&c.column), values(&c.values))).collect();
    format!(" WHERE {}", c.join(" AND "))
}

fn values(v: &[Value]) -> String {
    v.iter().map(value).collect::<Vec<_>>().join(", ")
}

fn value(v: &Value) -> String {
    match v {
        Value::Str(s) => string(s),
        Value::Num(n) => n.clone(),
        Value::Null => "NULL".into(),
    }
}

/// A backquoted name.
fn name(n: &str) -> String {
    format!("`{}`", n.replace('`', "``"))
}

/// A string literal with MySQL escapes.
fn string(s: &str) -> String {
    let mut out = String::from("'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}
