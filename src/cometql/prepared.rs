//! Server-side prepared statements (COM_STMT_PREPARE / EXECUTE / CLOSE /
//! RESET), sans-IO, for drivers that use the binary protocol by default
//! (Node mysql2 `execute`, PHP mysqli `prepare`, the Rust `mysql` crate's
//! `exec`, JDBC with server-side prepares).
//!
//! A statement is kept as its text with the byte offsets of its `?`
//! placeholders. EXECUTE decodes the binary parameter values and splices
//! them in as MySQL literals, and the result runs through the same parser and
//! executor as a text query; its rows go back in the binary row format,
//! which `packet` encodes (this module depends on `packet`, never the
//! other way round).

use super::charset::{Charset, INVALID_STRING};
use super::packet::{self, take_lenenc_int};

/// One prepared statement.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub sql: String,
    /// Byte offsets of the `?` placeholders in `sql`.
    pub marks: Vec<usize>,
    /// Parameter types from the last EXECUTE that sent them.
    pub types: Vec<(u8, bool)>,
    /// Values sent with COM_STMT_SEND_LONG_DATA since the last EXECUTE or
    /// RESET, by parameter; they replace the parameter in the next EXECUTE.
    pub long: std::collections::BTreeMap<u16, Vec<u8>>,
    /// Bytes held in `long`, bounded by `--max-query-size`.
    pub long_bytes: usize,
    /// Why the long data cannot be used (too large, an unknown parameter):
    /// COM_STMT_SEND_LONG_DATA has no answer, so the next EXECUTE reports it.
    pub long_error: Option<(u16, String)>,
}

impl Prepared {
    /// A statement as COM_STMT_PREPARE left it.
    pub fn new(sql: String) -> Prepared {
        let marks = placeholders(&sql);
        Prepared { sql, marks, ..Prepared::default() }
    }

    /// Appends COM_STMT_SEND_LONG_DATA's `data` to parameter `param`; past
    /// `max` bytes in all (what the connection's `--max-query-size` leaves
    /// this statement), the data is dropped and the next EXECUTE fails.
    pub fn long_data(&mut self, param: u16, data: &[u8], max: usize) {
        if self.long_error.is_some() {
            return;
        }
        if param as usize >= self.marks.len() {
            self.long_error =
                Some((3, format!("Long data for parameter {param}, but the statement has {}", self.marks.len())));
        } else if self.long_bytes + data.len() > max {
            self.long_error =
                Some((11, "Long data held by this connection would pass --max-query-size: send less".to_string()));
        }
        if self.long_error.is_some() {
            self.reset();
            return;
        }
        self.long_bytes += data.len();
        self.long.entry(param).or_default().extend_from_slice(data);
    }

    /// Forgets long data (after EXECUTE, on COM_STMT_RESET).
    pub fn reset(&mut self) {
        self.long.clear();
        self.long_bytes = 0;
    }
}

/// Byte offsets of `?` outside string literals, quoted names and comments.
pub fn placeholders(sql: &str) -> Vec<usize> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"' | b'`') => {
                i += 1;
                while i < b.len() {
                    if b[i] == b'\\' && q != b'`' {
                        i += 2;
                        continue;
                    }
                    if b[i] == q {
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            // As the lexer reads it (and MySQL): `--` opens a comment only
            // before white space or the end; `1--?` is a minus and a mark.
            b'-' if b.get(i + 1) == Some(&b'-') && b.get(i + 2).is_none_or(|c| c.is_ascii_whitespace()) => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'?' => out.push(i),
            _ => {}
        }
        i += 1;
    }
    out
}

/// The STMT_PREPARE_OK answer (and parameter definitions), from `seq`.
pub fn prepare_ok(stmt_id: u32, params: usize, deprecate_eof: bool, seq: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let mut p = vec![0x00];
    p.extend_from_slice(&stmt_id.to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes()); // columns: sent with each result
    p.extend_from_slice(&(params as u16).to_le_bytes());
    p.push(0);
    p.extend_from_slice(&0u16.to_le_bytes());
    let mut seq = packet::write_packet(&mut out, seq, &p);
    if params > 0 {
        for _ in 0..params {
            let mut d = Vec::with_capacity(32);
            for s in [&b"def"[..], b"", b"", b"", b"?", b""] {
                packet::put_lenenc_str(&mut d, s);
            }
            d.push(0x0C);
            d.extend_from_slice(&63u16.to_le_bytes());
            d.extend_from_slice(&0u32.to_le_bytes());
            d.push(packet::TYPE_VAR_STRING);
            d.extend_from_slice(&0u16.to_le_bytes());
            d.push(0);
            d.extend_from_slice(&[0, 0]);
            seq = packet::write_packet(&mut out, seq, &d);
        }
        if !deprecate_eof {
            packet::write_packet(&mut out, seq, &packet::eof(packet::SERVER_STATUS_AUTOCOMMIT));
        }
    }
    out
}

/// Quotes text as a MySQL string literal.
fn quote(s: &str, out: &mut String) {
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
}

/// The error for a COM_STMT_EXECUTE that ends inside `what`.
fn bad(what: &str) -> (u16, String) {
    (3, format!("truncated COM_STMT_EXECUTE ({what})"))
}

fn take<'a>(p: &mut &'a [u8], n: usize) -> Result<&'a [u8], (u16, String)> {
    if p.len() < n {
        return Err(bad("value"));
    }
    let (a, b) = p.split_at(n);
    *p = b;
    Ok(a)
}

/// A string parameter in the client's character set, quoted as UTF-8.
fn text(bytes: &[u8], charset: Charset, out: &mut String) -> Result<(), (u16, String)> {
    let s = charset.decode(bytes).map_err(|e| (INVALID_STRING, format!("String parameter {e}")))?;
    quote(&s, out);
    Ok(())
}

/// One binary parameter value as a MySQL literal.
fn literal(ty: u8, unsigned: bool, p: &mut &[u8], out: &mut String, charset: Charset) -> Result<(), (u16, String)> {
    use std::fmt::Write as _;
    let int = |b: &[u8]| -> i128 {
        let mut v: u64 = 0;
        for (i, x) in b.iter().enumerate() {
            v |= (*x as u64) << (8 * i);
        }
        if unsigned {
            v as i128
        } else {
            let shift = 64 - 8 * b.len() as u32;
            (((v << shift) as i64) >> shift) as i128
        }
    };
    match ty {
        0x06 => out.push_str("NULL"),
        0x01 => write!(out, "{}", int(take(p, 1)?)).unwrap_or(()),
        0x02 | 0x0d => write!(out, "{}", int(take(p, 2)?)).unwrap_or(()),
        0x03 | 0x09 => write!(out, "{}", int(take(p, 4)?)).unwrap_or(()),
        0x08 => write!(out, "{}", int(take(p, 8)?)).unwrap_or(()),
        0x04 => write!(out, "{}", f32::from_le_bytes(take(p, 4)?.try_into().map_err(|_| bad("float"))?)).unwrap_or(()),
        0x05 => write!(out, "{}", f64::from_le_bytes(take(p, 8)?.try_into().map_err(|_| bad("double"))?)).unwrap_or(()),
        0x07 | 0x0a | 0x0c => {
            let n = take(p, 1)?[0] as usize;
            let f = take(p, n)?;
            let g = |i: usize| f.get(i).copied().unwrap_or(0) as u32;
            let year = u16::from_le_bytes([f.first().copied().unwrap_or(0), f.get(1).copied().unwrap_or(0)]);
            let mut s = format!("{year:04}-{:02}-{:02}", g(2), g(3));
            if n >= 7 {
                let _ = write!(s, " {:02}:{:02}:{:02}", g(4), g(5), g(6));
            }
            quote(&s, out);
        }
        0x0b => {
            let n = take(p, 1)?[0] as usize;
            let f = take(p, n)?;
            let g = |i: usize| f.get(i).copied().unwrap_or(0) as u32;
            let days = if n >= 5 { u32::from_le_bytes([f[1], f[2], f[3], f[4]]) } else { 0 };
            let sign = if g(0) == 1 { "-" } else { "" };
            // u64: a client may send 2^32-1 days, which times 24 overflows u32.
            let hours = days as u64 * 24 + g(5) as u64;
            quote(&format!("{sign}{hours:02}:{:02}:{:02}", g(6), g(7)), out);
        }
        0x00 | 0x0f | 0x10 | 0xf5..=0xfe => {
            let n = take_lenenc_int(p).ok_or_else(|| bad("string parameter"))? as usize;
            let s = take(p, n)?;
            text(s, charset, out)?;
        }
        other => return Err((3, format!("parameter type {other:#04x} is not supported"))),
    }
    Ok(())
}

/// Decodes a COM_STMT_EXECUTE body (after the command byte) against the
/// statement, returning the SQL with the parameters spliced in. String
/// parameters (and long data) are in the client's `charset`. The error is
/// a MySQL error code and message.
pub fn execute_sql(body: &[u8], stmt: &mut Prepared, charset: Charset) -> Result<String, (u16, String)> {
    if let Some(e) = stmt.long_error.take() {
        stmt.reset();
        return Err(e);
    }
    let long = std::mem::take(&mut stmt.long);
    stmt.long_bytes = 0;
    let mut p = body;
    take(&mut p, 4 + 1 + 4)?; // statement id, flags, iteration count
    let n = stmt.marks.len();
    let mut values: Vec<String> = Vec::with_capacity(n);
    if n > 0 {
        let bitmap = take(&mut p, n.div_ceil(8))?.to_vec();
        let bound = take(&mut p, 1)?[0];
        if bound == 1 {
            let t = take(&mut p, 2 * n)?;
            stmt.types = t.chunks(2).map(|c| (c[0], c[1] & 0x80 != 0)).collect();
        }
        if stmt.types.len() != n {
            return Err((3, "parameter types were never sent".into()));
        }
        for i in 0..n {
            let mut lit = String::new();
            if let Some(data) = long.get(&(i as u16)) {
                // Sent with COM_STMT_SEND_LONG_DATA: not in this packet.
                text(data, charset, &mut lit)?;
            } else if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                lit.push_str("NULL");
            } else {
                let (ty, unsigned) = stmt.types[i];
                literal(ty, unsigned, &mut p, &mut lit, charset)?;
            }
            values.push(lit);
        }
    }
    let mut sql = String::with_capacity(stmt.sql.len() + values.iter().map(String::len).sum::<usize>());
    let mut last = 0;
    for (mark, v) in stmt.marks.iter().zip(&values) {
        sql.push_str(&stmt.sql[last..*mark]);
        sql.push_str(v);
        last = mark + 1;
    }
    sql.push_str(&stmt.sql[last..]);
    Ok(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_read_double_dash_as_the_lexer_does() {
        // Found by fuzzing: `--` without a space is two minus signs, so the
        // mark after it is a parameter; inside what the lexer reads as a
        // string it is not, and a parameter can never become SQL.
        assert_eq!(placeholders("SELECT 1--?").len(), 1);
        assert_eq!(placeholders("SELECT --'\n?'"), Vec::<usize>::new());
        assert_eq!(placeholders("SELECT 1 -- ?\n, ?").len(), 1);
    }

    #[test]
    fn a_time_parameter_of_the_largest_day_count_does_not_overflow() {
        let mut out = String::new();
        let body = [0x08u8, 0, 0xff, 0xff, 0xff, 0xff, 23, 59, 59];
        let mut p = &body[..];
        assert!(literal(0x0b, false, &mut p, &mut out, Charset::Utf8mb4).is_ok());
        assert_eq!(out, "'103079215103:59:59'");
    }

    #[test]
    fn placeholders_skip_literals_and_comments() {
        let sql = "INSERT INTO t VALUES (?, '?', \"a\\\"?\", `?`, ?) -- ?\n/* ? */ #?";
        let marks = placeholders(sql);
        assert_eq!(marks.len(), 2);
        assert!(marks.iter().all(|&m| &sql[m..m + 1] == "?"));
    }

    #[test]
    fn execute_splices_typed_values_as_literals() {
        let sql = "INSERT INTO pipes_messages VALUES (?, ?, ?)".to_string();
        let mut st = Prepared::new(sql);
        let mut body = vec![1, 0, 0, 0, 0, 1, 0, 0, 0];
        body.push(0b0000_0100); // third parameter NULL
        body.push(1);
        body.extend_from_slice(&[0xfd, 0, 0x08, 0, 0xfd, 0]);
        body.extend_from_slice(&[4, b'a', b'\'', b'\\', b'b']);
        body.extend_from_slice(&(-5i64).to_le_bytes());
        assert_eq!(
            execute_sql(&body, &mut st, Charset::Utf8mb4).unwrap(),
            r"INSERT INTO pipes_messages VALUES ('a\'\\b', -5, NULL)"
        );
        // Types are remembered when the next EXECUTE does not resend them.
        let mut again = vec![1, 0, 0, 0, 0, 1, 0, 0, 0, 0b110, 0];
        again.extend_from_slice(&[1, b'z']);
        assert_eq!(
            execute_sql(&again, &mut st, Charset::Utf8mb4).unwrap(),
            "INSERT INTO pipes_messages VALUES ('z', NULL, NULL)"
        );
        assert!(execute_sql(&[1, 0, 0], &mut st, Charset::Utf8mb4).is_err());
    }

    /// EXECUTE of `SELECT ?` with one VAR_STRING parameter of `value`.
    fn execute_one_string(value: &[u8]) -> Vec<u8> {
        let mut body = vec![1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0xfd, 0];
        packet::put_lenenc_str(&mut body, value);
        body
    }

    #[test]
    fn string_parameters_are_read_in_the_clients_charset() {
        let mut st = Prepared::new("SELECT ?".into());
        let body = execute_one_string(b"caf\xE9");
        assert_eq!(execute_sql(&body, &mut st, Charset::Latin1).unwrap(), "SELECT 'café'");
        // The same bytes on a utf8mb4 connection are refused, not turned
        // into U+FFFD.
        let (code, msg) = execute_sql(&body, &mut st, Charset::Utf8mb4).unwrap_err();
        assert_eq!(code, INVALID_STRING);
        assert!(msg.contains("not valid utf8mb4 (byte 0xE9 at offset 3)"), "{msg}");
    }

    #[test]
    fn long_data_replaces_the_parameter_and_is_bounded() {
        let mut st = Prepared::new("SELECT ?, ?".into());
        st.long_data(1, b"d\xE9", 10);
        st.long_data(1, b"j\xE0", 10);
        // Parameter 0 in the packet, parameter 1 from long data.
        let mut body = vec![1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0xfd, 0, 0xfc, 0];
        packet::put_lenenc_str(&mut body, b"x");
        assert_eq!(execute_sql(&body, &mut st, Charset::Latin1).unwrap(), "SELECT 'x', 'déjà'");
        assert!(st.long.is_empty(), "long data is used once");
        st.long_data(0, &[b'a'; 8], 10);
        st.long_data(0, &[b'a'; 8], 10);
        assert_eq!(execute_sql(&body, &mut st, Charset::Latin1).unwrap_err().0, 11);
        st.long_data(5, b"x", 10);
        assert!(execute_sql(&body, &mut st, Charset::Latin1).unwrap_err().1.contains("parameter 5"));
        // The error is reported once; without long data the second
        // parameter is missing from this packet.
        assert!(execute_sql(&body, &mut st, Charset::Latin1).unwrap_err().1.contains("truncated"));
    }
}
