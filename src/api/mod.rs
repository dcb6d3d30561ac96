//! The HTTP API for backends: the CometQL tables over HTTP/1.1 and JSON,
//! sans-IO. One model, two transports: a request becomes the same
//! [`Statement`] a CometQL query would parse to, and the shard runs it
//! through the same planner ([`crate::cometql::exec::plan`]) and executor;
//! only the edges differ.
//!
//! - `POST /api/<table>`: INSERT; the body is a JSON object or an array of
//!   objects keyed by column names.
//! - `GET /api/<table>?col=v&col=w`: SELECT; a repeated column means IN,
//!   `limit` and `offset` page.
//! - `DELETE /api/<table>?col=v`: DELETE.
//! - `?dev_id=N` picks the tenant; the key (`Authorization: Bearer ...` or
//!   `X-API-Key`) must be that dev_id's backend password.
//!
//! What lives here: framing ([`http1`]), the request → statement mapping
//! ([`route`]) and the answer encoding ([`answer`], [`error_answer`]). What
//! does not: key checks and the failed-login throttle (process state, in
//! `shard::api`), and the tables' rules (`cometql::exec`).

pub mod http1;

use crate::cometql::exec::StmtResult;
use crate::cometql::packet::ResultSet;
use crate::cometql::parser::{Condition, MAX_COLUMNS, MAX_CONDITIONS, MAX_ROWS, MAX_VALUES, Statement, Value};
use crate::cometql::tables::{self, Table};
use crate::domain::clip;

/// Where the tables live.
pub const PREFIX: &str = "/api/";

/// An answer that is not a statement's result: HTTP status, CometQL error
/// code (PROTOCOL §4.4, or 1129 for a throttled address) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: u16,
    pub message: String,
    /// Seconds for `Retry-After` (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: u16, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), retry_after: None }
    }
}

/// A request target split into its table name and decoded query pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub table: String,
    pub params: Vec<(String, String)>,
    /// The tenant (`dev_id`, 0 when absent).
    pub dev_id: u32,
}

/// Splits `/api/<table>?query`, decoding the query and its `dev_id`.
pub fn target(raw: &str) -> Result<Target, ApiError> {
    let (path, query) = raw.split_once('?').unwrap_or((raw, ""));
    let Some(table) = path.strip_prefix(PREFIX).filter(|t| !t.is_empty() && !t.contains('/')) else {
        return Err(ApiError::new(
            404,
            15,
            format!("No such endpoint {}: the tables are at {PREFIX}<table>", clip(path)),
        ));
    };
    let mut params = Vec::new();
    let mut dev_id = 0;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k)?, decode(v)?);
        if k == "dev_id" {
            dev_id = v.parse().map_err(|_| ApiError::new(400, 12, format!("dev_id {} is not a number", clip(&v))))?;
        } else {
            params.push((k, v));
        }
    }
    Ok(Target { table: decode(table)?, params, dev_id })
}

/// Percent-decodes a query component (`+` is a space), as UTF-8.
fn decode(s: &str) -> Result<String, ApiError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                    return Err(ApiError::new(400, 3, format!("Bad percent-escape in {}", clip(s))));
                };
                out.push(v);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| ApiError::new(400, 12, format!("{} is not UTF-8 once decoded", clip(s))))
}

/// The table a target names (404 with code 15 when there is none).
pub fn table(t: &Target) -> Result<&'static Table, ApiError> {
    tables::find(&t.table).ok_or_else(|| ApiError::new(404, 15, format!("Table {} doesn't exist", clip(&t.table))))
}

/// The statement a request means: what CometQL would parse from the
/// equivalent INSERT, SELECT or DELETE. The tables' rules (which columns,
/// which WHERE, which values) are left to the planner, as for CometQL.
pub fn route(method: &str, t: &Target, body: &[u8]) -> Result<Statement, ApiError> {
    let table = self::table(t)?;
    match method {
        "POST" => {
            if let Some((k, _)) = t.params.first() {
                return Err(ApiError::new(
                    422,
                    14,
                    format!("POST takes its columns from the JSON body, not the query string (got {})", clip(k)),
                ));
            }
            let (columns, rows) = insert_rows(body)?;
            Ok(Statement::Insert { table: table.name.to_string(), columns: Some(columns), rows })
        }
        "GET" => {
            let mut limit = None;
            let mut offset = None;
            let mut conds = Vec::new();
            for (k, v) in &t.params {
                match k.as_str() {
                    "limit" => limit = Some(number(k, v)?),
                    "offset" => offset = Some(number(k, v)?),
                    _ => conds.push((k, v)),
                }
            }
            let limit = match (offset, limit) {
                (None, None) => None,
                (o, l) => Some((o.unwrap_or(0), l.unwrap_or(u64::MAX))),
            };
            Ok(Statement::Select {
                table: table.name.to_string(),
                columns: None,
                conditions: conditions(conds)?,
                limit,
            })
        }
        "DELETE" => Ok(Statement::Delete {
            table: table.name.to_string(),
            conditions: conditions(t.params.iter().map(|(k, v)| (k, v)).collect())?,
        }),
        other => Err(ApiError::new(
            405,
            2,
            format!("Method {} is not allowed: use GET (SELECT), POST (INSERT) or DELETE", clip(other)),
        )),
    }
}

fn number(k: &str, v: &str) -> Result<u64, ApiError> {
    v.parse().map_err(|_| ApiError::new(422, 12, format!("{k} {} is not a whole number", clip(v))))
}

/// `col=v` pairs grouped by column, in first-seen order: a repeated
/// column is `col IN (...)`, different columns are ANDed, as in CometQL.
fn conditions(pairs: Vec<(&String, &String)>) -> Result<Vec<Condition>, ApiError> {
    let mut conds: Vec<Condition> = Vec::new();
    for (k, v) in pairs {
        match conds.iter_mut().find(|c| c.column == *k) {
            Some(c) => {
                if c.values.len() >= MAX_VALUES {
                    return Err(ApiError::new(422, 19, format!("too many values: at most {MAX_VALUES}")));
                }
                c.values.push(Value::Str(v.clone()));
            }
            None => {
                if conds.len() >= MAX_CONDITIONS {
                    return Err(ApiError::new(422, 18, format!("too many conditions: at most {MAX_CONDITIONS}")));
                }
                conds.push(Condition { column: k.clone(), values: vec![Value::Str(v.clone())] });
            }
        }
    }
    Ok(conds)
}

/// The columns and rows of a POST body. Every object must have the keys of
/// the first one. A string value is the text itself; a number is its text
/// as written; `null` is NULL; anything else (an object, an array, a
/// boolean) is its compact JSON text, so `{"message": {"a": 1}}` publishes
/// the text `{"a":1}`, exactly what CometQL publishes for
/// `VALUES (..., '{"a":1}')`.
fn insert_rows(body: &[u8]) -> Result<(Vec<String>, Vec<Vec<Value>>), ApiError> {
    let objects = body_objects(body)?;
    if objects.is_empty() {
        return Err(ApiError::new(422, 17, "The array holds no objects"));
    }
    let columns: Vec<String> = objects[0].keys().cloned().collect();
    if columns.len() > MAX_COLUMNS {
        return Err(ApiError::new(422, 20, format!("too many columns: at most {MAX_COLUMNS}")));
    }
    let mut rows = Vec::with_capacity(objects.len());
    for (i, mut o) in objects.into_iter().enumerate() {
        if o.len() != columns.len() || !columns.iter().all(|c| o.contains_key(c)) {
            let keys: Vec<&str> = o.keys().map(String::as_str).collect();
            return Err(ApiError::new(
                422,
                14,
                format!(
                    "Object {i} has the keys ({}); the first object has ({})",
                    clip(&keys.join(", ")),
                    columns.join(", ")
                ),
            ));
        }
        rows.push(columns.iter().map(|c| value(o.remove(c).unwrap_or_default())).collect());
    }
    Ok((columns, rows))
}

type Object = serde_json::Map<String, serde_json::Value>;

/// The objects of a POST body (one object, or an array of them), counted
/// while they are read: past [`MAX_ROWS`] objects or [`MAX_COLUMNS`] keys
/// in one, reading stops there, so a body of a hundred thousand `{}` never
/// becomes a hundred thousand maps.
fn body_objects(body: &[u8]) -> Result<Vec<Object>, ApiError> {
    let read = BodyRead::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    let r = serde::de::DeserializeSeed::deserialize(&read, &mut de).and_then(|v| de.end().map(|()| v));
    r.map_err(|e| match (read.over.take(), e.classify(), read.element.get()) {
        (Some(over), _, _) => over,
        (None, serde_json::error::Category::Data, Some(i)) => {
            ApiError::new(400, 3, format!("Element {i} of the array is not a JSON object"))
        }
        (None, serde_json::error::Category::Data, None) => {
            ApiError::new(400, 3, "The body must be a JSON object or an array of objects")
        }
        _ => ApiError::new(400, 3, format!("The body is not valid JSON: {e}")),
    })
}

/// What [`body_objects`] learns while it reads: the bound that stopped it,
/// and the array element being read.
#[derive(Default)]
struct BodyRead {
    over: std::cell::Cell<Option<ApiError>>,
    element: std::cell::Cell<Option<usize>>,
}

impl BodyRead {
    fn stop<E: serde::de::Error>(&self, e: ApiError) -> E {
        let m = e.message.clone();
        self.over.set(Some(e));
        E::custom(m)
    }

    fn object<'de, A: serde::de::MapAccess<'de>>(&self, mut map: A) -> Result<Object, A::Error> {
        let mut o = Object::new();
        while let Some(k) = map.next_key::<String>()? {
            if o.len() == MAX_COLUMNS && !o.contains_key(&k) {
                return Err(self.stop(ApiError::new(422, 20, format!("too many columns: at most {MAX_COLUMNS}"))));
            }
            let v: serde_json::Value = map.next_value()?;
            o.insert(k, v);
        }
        Ok(o)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for &BodyRead {
    type Value = Vec<Object>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Vec<Object>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &BodyRead {
    type Value = Vec<Object>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object or an array of objects")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Vec<Object>, A::Error> {
        self.object(map).map(|o| vec![o])
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Object>, A::Error> {
        if self.element.get().is_some() {
            // An array inside the array: not an object.
            return Err(serde::de::Error::invalid_type(serde::de::Unexpected::Seq, &self));
        }
        let mut rows = Vec::new();
        loop {
            self.element.set(Some(rows.len()));
            let Some(mut one) = seq.next_element_seed(self)? else { break };
            if rows.len() == MAX_ROWS {
                return Err(self.stop(ApiError::new(422, 19, format!("too many rows: at most {MAX_ROWS}"))));
            }
            rows.append(&mut one);
        }
        Ok(rows)
    }
}

fn value(v: serde_json::Value) -> Value {
    match v {
        serde_json::Value::String(s) => Value::Str(s),
        serde_json::Value::Number(n) => Value::Num(n.to_string()),
        serde_json::Value::Null => Value::Null,
        other => Value::Str(other.to_string()),
    }
}

/// Columns whose values are whole numbers: rendered as JSON numbers.
const NUMERIC: &[&str] = &["id", "time", "index", "user_id", "users", "length"];

/// The HTTP answer to one statement's result: 200 with `{"affected":N}`
/// (and `"last_insert_id"` when CometQL gives one) or `{"rows":[...]}`; a
/// CometQL error is 422 (404 for an unknown table, 503 while the cluster's
/// Redis is down).
pub fn answer(r: &StmtResult, close: bool) -> Vec<u8> {
    match r {
        StmtResult::Ok { affected, last_insert_id } => {
            let body = if *last_insert_id > 0 {
                format!("{{\"affected\":{affected},\"last_insert_id\":{last_insert_id}}}")
            } else {
                format!("{{\"affected\":{affected}}}")
            };
            http1::response(200, "", body.as_bytes(), close)
        }
        StmtResult::Rows(rs) => http1::response(200, "", &rows_json(rs), close),
        StmtResult::Err(code, msg) => {
            let (status, retry_after) = match *code {
                15 => (404, None),
                503 => (503, None),
                // The server's answer memory is full for now
                // (--answer-memory-limit): the request may be retried.
                1037 => (503, Some(1)),
                _ => (422, None),
            };
            error_answer(&ApiError { retry_after, ..ApiError::new(status, *code, msg.clone()) }, close)
        }
    }
}

/// `{"rows":[{col: value, ...}, ...]}`; NULL is `null`, whole-number
/// columns are numbers, everything else a string.
fn rows_json(rs: &ResultSet) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + rs.rows.len() * 64);
    out.extend_from_slice(b"{\"rows\":[");
    for (i, row) in rs.rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'{');
        for (k, (col, v)) in rs.columns.iter().zip(row).enumerate() {
            if k > 0 {
                out.push(b',');
            }
            json_str(&mut out, col);
            out.push(b':');
            match v {
                None => out.extend_from_slice(b"null"),
                Some(v) if NUMERIC.contains(&col.as_str()) && v.parse::<i64>().is_ok() => {
                    out.extend_from_slice(v.as_bytes())
                }
                Some(v) => json_str(&mut out, v),
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// `{"error":{"code":N,"message":"..."}}` with its status and the headers
/// that status calls for.
pub fn error_answer(e: &ApiError, close: bool) -> Vec<u8> {
    let mut body = Vec::with_capacity(48 + e.message.len());
    body.extend_from_slice(format!("{{\"error\":{{\"code\":{},\"message\":", e.code).as_bytes());
    json_str(&mut body, &e.message);
    body.extend_from_slice(b"}}");
    let extra = match (e.status, e.retry_after) {
        (401, _) => "WWW-Authenticate: Bearer realm=\"comet\"\r\n".to_string(),
        (405, _) => "Allow: GET, POST, DELETE\r\n".to_string(),
        (_, Some(s)) => format!("Retry-After: {s}\r\n"),
        _ => String::new(),
    };
    http1::response(e.status, &extra, &body, close)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cometql::parser::parse;

    fn stmt(method: &str, target_: &str, body: &str) -> Result<Statement, ApiError> {
        route(method, &target(target_)?, body.as_bytes())
    }

    fn sql(q: &str) -> Statement {
        parse(q).unwrap().pop().unwrap()
    }

    #[test]
    fn a_post_is_the_insert_cometql_would_parse() {
        let st = stmt("POST", "/api/pipes_messages", r#"{"name":"news","event":"e","message":{"a":1}}"#).unwrap();
        assert_eq!(st, sql(r#"INSERT INTO pipes_messages (event, message, name) VALUES ('e', '{"a":1}', 'news')"#));
        let st = stmt(
            "POST",
            "/api/users_messages",
            r#"[{"id":5,"event":"e","message":"hi"},{"id":6,"event":"e","message":null}]"#,
        )
        .unwrap();
        assert_eq!(st, sql("INSERT INTO users_messages (event, id, message) VALUES ('e', 5, 'hi'), ('e', 6, NULL)"));
    }

    #[test]
    fn a_get_is_the_select_with_repeated_columns_as_in() {
        let t = target("/api/pipes?name=a%20b&dev_id=3&name=web_x+y").unwrap();
        assert_eq!(t.dev_id, 3);
        assert_eq!(route("GET", &t, b"").unwrap(), sql("SELECT * FROM pipes WHERE name IN ('a b', 'web_x y')"));
        assert_eq!(
            stmt("GET", "/api/pipes_messages?name=abc&limit=2&offset=1", "").unwrap(),
            sql("SELECT * FROM pipes_messages WHERE name = 'abc' LIMIT 1, 2")
        );
        assert_eq!(stmt("DELETE", "/api/users_auth?id=7", "").unwrap(), sql("DELETE FROM users_auth WHERE id = '7'"));
    }

    #[test]
    fn bad_requests_get_their_status_and_code() {
        let e = |m: &str, t: &str, b: &str| {
            let e = stmt(m, t, b).unwrap_err();
            (e.status, e.code)
        };
        assert_eq!(e("GET", "/api/nope?name=x", ""), (404, 15));
        assert_eq!(e("GET", "/other", ""), (404, 15));
        assert_eq!(e("PUT", "/api/pipes", ""), (405, 2));
        assert_eq!(e("POST", "/api/pipes_messages", "{"), (400, 3));
        assert_eq!(e("POST", "/api/pipes_messages", "[1]"), (400, 3));
        assert_eq!(e("POST", "/api/pipes_messages", "\"x\""), (400, 3));
        assert_eq!(e("POST", "/api/pipes_messages", "[]"), (422, 17));
        assert_eq!(e("POST", "/api/pipes_messages", r#"[{"a":1},{"b":1}]"#), (422, 14));
        assert_eq!(e("POST", "/api/pipes_messages?name=x", "{}"), (422, 14));
        assert_eq!(e("GET", "/api/pipes?dev_id=x", ""), (400, 12));
        assert_eq!(e("GET", "/api/pipes?name=%zz", ""), (400, 3));
        assert_eq!(e("GET", "/api/pipes?name=%ff", ""), (400, 12));
        assert_eq!(e("GET", "/api/pipes?limit=-1", ""), (422, 12));
        let many: String = (0..=MAX_VALUES).map(|i| format!("name=a{i}&")).collect();
        assert_eq!(e("GET", &format!("/api/pipes?{many}"), ""), (422, 19));
        let cols: String = (0..=MAX_CONDITIONS).map(|i| format!("c{i}=a&")).collect();
        assert_eq!(e("GET", &format!("/api/pipes?{cols}"), ""), (422, 18));
    }

    #[test]
    fn a_post_body_is_counted_while_it_is_read_and_named_when_it_is_wrong() {
        let msg = |b: &str| stmt("POST", "/api/pipes_messages", b).unwrap_err().message;
        // Past MAX_ROWS objects the read stops: the rest (here not even
        // JSON) is never looked at, let alone built into maps.
        let rows = format!("[{}{{}}, this is never read", "{},".repeat(MAX_ROWS));
        assert_eq!(msg(&rows), format!("too many rows: at most {MAX_ROWS}"));
        let keys: Vec<String> = (0..=MAX_COLUMNS).map(|i| format!("\"c{i}\":1")).collect();
        assert_eq!(msg(&format!("[{{{}}}, nope", keys.join(","))), format!("too many columns: at most {MAX_COLUMNS}"));
        assert_eq!(msg(&format!("{{{}}}", keys.join(","))), format!("too many columns: at most {MAX_COLUMNS}"));
        assert_eq!(msg(r#"[{"name":"a"}, 7]"#), "Element 1 of the array is not a JSON object");
        assert_eq!(msg(r#"[[{"name":"a"}]]"#), "Element 0 of the array is not a JSON object");
        assert_eq!(msg("true"), "The body must be a JSON object or an array of objects");
        assert!(msg(r#"{"name":"a"} x"#).starts_with("The body is not valid JSON"), "trailing bytes");
        // Exactly MAX_ROWS objects, and a repeated key, are fine.
        let ok = format!("[{}]", vec![r#"{"name":"web_a","event":"e","message":"m"}"#; MAX_ROWS].join(","));
        assert!(stmt("POST", "/api/pipes_messages", &ok).is_ok());
        assert!(
            stmt("POST", "/api/pipes_messages", r#"{"name":"web_a","name":"web_b","event":"e","message":"m"}"#).is_ok()
        );
    }

    #[test]
    fn answers_are_json_with_numbers_for_whole_number_columns() {
        let ok = answer(&StmtResult::Ok { affected: 2, last_insert_id: 0 }, false);
        assert!(ok.ends_with(b"\r\n\r\n{\"affected\":2}"), "{}", String::from_utf8_lossy(&ok));
        let ok = answer(&StmtResult::Ok { affected: 1, last_insert_id: 9 }, false);
        assert!(ok.ends_with(b"{\"affected\":1,\"last_insert_id\":9}"));
        let rs = ResultSet {
            table: "pipes".into(),
            columns: vec!["name".into(), "users".into(), "message".into()],
            rows: vec![vec![Some("web_a".into()), Some("3".into()), None]],
        };
        let r = answer(&StmtResult::Rows(rs), false);
        assert!(
            r.ends_with(br#"{"rows":[{"name":"web_a","users":3,"message":null}]}"#),
            "{}",
            String::from_utf8_lossy(&r)
        );
        let e = answer(&StmtResult::err(12, "Channel name 'a\"b' is bad"), true);
        let text = String::from_utf8_lossy(&e);
        assert!(text.starts_with("HTTP/1.1 422 Unprocessable Content\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.ends_with(r#"{"error":{"code":12,"message":"Channel name 'a\"b' is bad"}}"#), "{text}");
        let throttled = ApiError { retry_after: Some(7), ..ApiError::new(429, 1129, "blocked") };
        assert!(String::from_utf8_lossy(&error_answer(&throttled, false)).contains("Retry-After: 7\r\n"));
        // The answer memory is full for now: worth a retry.
        let full = answer(&StmtResult::err(1037, "Not built"), false);
        let text = String::from_utf8_lossy(&full);
        assert!(text.starts_with("HTTP/1.1 503 ") && text.contains("Retry-After: 1\r\n"), "{text}");
    }
}
