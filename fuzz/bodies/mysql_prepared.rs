//! Fuzz body for prepared-statement bodies (`comet::cometql::prepared`):
//! the `?` marks of a statement text and the binary parameters of
//! COM_STMT_EXECUTE spliced into it as SQL literals.
//!
//! Input layout: one mode byte, then data. The data is first used as a
//! statement text, whose marks must all point at a `?`. Then, with mode bit
//! 0 clear, it is a raw EXECUTE body for a statement with `mode >> 1 & 7`
//! marks; set, it describes typed parameter values from which the body
//! builds a well-formed EXECUTE. Either way the spliced text must lex with
//! one value per mark, never more (a parameter must not become SQL); built
//! bodies must also give back exactly the values they encoded.

use comet::cometql::charset::Charset;
use comet::cometql::lexer::{Tok, lex};
use comet::cometql::packet;
use comet::cometql::prepared::{self, Prepared};

pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    check_marks(&String::from_utf8_lossy(rest));
    if mode & 1 == 0 {
        let n = (mode >> 1 & 7) as usize;
        let mut st = statement(n);
        if let Ok(sql) = prepared::execute_sql(rest, &mut st, Charset::Utf8mb4) {
            assert_eq!(st.types.len(), n, "types are kept for the next EXECUTE");
            values(&sql, n);
        }
    } else {
        let (body, want) = build(rest);
        let mut st = statement(want.len());
        let sql = prepared::execute_sql(&body, &mut st, Charset::Latin1)
            .unwrap_or_else(|e| panic!("well-formed EXECUTE {body:?} refused: {e:?}"));
        let got = values(&sql, want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            match w {
                Want::Null => assert_eq!(g, &[Tok::Word("NULL".into())], "parameter {i}"),
                Want::Str(s) => assert_eq!(g, &[Tok::Str(s.clone())], "parameter {i}"),
                Want::Int(v) => assert_eq!(int_value(g), Some(*v), "parameter {i}: {g:?}"),
            }
        }
        // Without types, the next EXECUTE reuses the ones just sent.
        let mut again = body[..9].to_vec();
        if !want.is_empty() {
            again.extend(std::iter::repeat_n(0xFF, want.len().div_ceil(8)));
            again.push(0);
            let sql = prepared::execute_sql(&again, &mut st, Charset::Utf8mb4)
                .expect("all-NULL EXECUTE with remembered types");
            assert!(values(&sql, want.len()).iter().all(|g| g == &[Tok::Word("NULL".into())]));
        }
    }
}

/// Every mark is a `?` byte, in order; a text without marks is executed
/// unchanged.
fn check_marks(sql: &str) {
    let marks = prepared::placeholders(sql);
    assert!(marks.windows(2).all(|w| w[0] < w[1]));
    assert!(marks.iter().all(|&m| sql.as_bytes()[m] == b'?'));
    if marks.is_empty() {
        assert_eq!(marks.len(), 0);
        let mut st = Prepared::new(sql.to_string());
        assert_eq!(prepared::execute_sql(&[1, 0, 0, 0, 0, 1, 0, 0, 0], &mut st, Charset::Utf8mb4).as_deref(), Ok(sql));
    }
}

/// `SELECT (?, ?, ...)` with `n` marks.
fn statement(n: usize) -> Prepared {
    let sql = format!("SELECT ({})", vec!["?"; n].join(", "));
    let marks = prepared::placeholders(&sql);
    assert_eq!(marks.len(), n);
    Prepared::new(sql)
}

/// Lexes a spliced statement made by [`statement`] and returns the tokens of
/// each parameter: exactly `n` groups, none empty.
fn values(sql: &str, n: usize) -> Vec<Vec<Tok>> {
    let toks = lex(sql).unwrap_or_else(|e| panic!("spliced statement does not lex ({}): {sql:?}", e.0));
    assert_eq!(toks.first(), Some(&Tok::Word("SELECT".into())));
    assert_eq!(toks.get(1), Some(&Tok::Sym('(')), "{sql:?}");
    assert_eq!(toks.last(), Some(&Tok::Sym(')')), "{sql:?}");
    let inner = &toks[2..toks.len() - 1];
    if n == 0 {
        assert!(inner.is_empty());
        return Vec::new();
    }
    let groups: Vec<Vec<Tok>> = inner.split(|t| *t == Tok::Sym(',')).map(<[Tok]>::to_vec).collect();
    assert_eq!(groups.len(), n, "one value per mark in {sql:?}");
    for g in &groups {
        assert!(!g.is_empty(), "an empty value in {sql:?}");
        if matches!(g[0], Tok::Str(_)) {
            assert_eq!(g.len(), 1, "text after a string parameter in {sql:?}");
        }
    }
    groups
}

/// An integer parameter as lexed: `Num` or `-` `Num`.
fn int_value(g: &[Tok]) -> Option<i128> {
    match g {
        [Tok::Num(n)] => n.parse().ok(),
        [Tok::Sym('-'), Tok::Num(n)] => n.parse::<i128>().ok().map(|v| -v),
        _ => None,
    }
}

/// A parameter value a built EXECUTE carries.
#[derive(Debug)]
enum Want {
    Null,
    Str(String),
    Int(i128),
}

/// Builds a well-formed EXECUTE body from the fuzz data: per parameter one
/// kind byte, then the value's bytes.
fn build(mut d: &[u8]) -> (Vec<u8>, Vec<Want>) {
    let mut next = |n: usize| {
        let (a, b) = d.split_at(n.min(d.len()));
        d = b;
        let mut v = a.to_vec();
        v.resize(n, 0);
        v
    };
    let n = (next(1)[0] % 9) as usize;
    let mut types = Vec::new();
    let mut vals = Vec::new();
    let mut want = Vec::new();
    let mut nulls = vec![0u8; n.div_ceil(8)];
    for i in 0..n {
        let kind = next(1)[0];
        let unsigned = kind & 0x80 != 0;
        let (ty, w) = match kind % 7 {
            0 => {
                nulls[i / 8] |= 1 << (i % 8);
                (0xFD, Want::Null)
            }
            1 => (0x06, Want::Null),
            k @ 2..=5 => {
                let (ty, size) = [(0x01, 1), (0x02, 2), (0x03, 4), (0x08, 8)][k as usize - 2];
                let b = next(size);
                vals.extend_from_slice(&b);
                let mut raw = [0u8; 8];
                raw[..size].copy_from_slice(&b);
                let u = u64::from_le_bytes(raw);
                let v = if unsigned {
                    u as i128
                } else {
                    let shift = 64 - 8 * size as u32;
                    (((u << shift) as i64) >> shift) as i128
                };
                (ty, Want::Int(v))
            }
            _ => {
                let len = next(1)[0] as usize;
                let b = next(len);
                packet::put_lenenc_int(&mut vals, len as u64);
                vals.extend_from_slice(&b);
                // Any bytes are latin1 text: the well-formed EXECUTE is run on
                // a latin1 connection.
                (0xFD, Want::Str(Charset::Latin1.decode(&b).expect("latin1 decodes any byte").into_owned()))
            }
        };
        types.extend_from_slice(&[ty, if unsigned { 0x80 } else { 0 }]);
        want.push(w);
    }
    let mut body = vec![1, 0, 0, 0, 0, 1, 0, 0, 0];
    if n > 0 {
        body.extend_from_slice(&nulls);
        body.push(1);
        body.extend_from_slice(&types);
        body.extend_from_slice(&vals);
    }
    (body, want)
}
