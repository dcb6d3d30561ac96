//! CometQL tokens, with MySQL's rules for string literals.
//!
//! Strings take `'...'` or `"..."`; a doubled quote stands for itself and the
//! backslash escapes `\0 \' \" \b \n \r \t \Z \\ \% \_` are unescaped, so a
//! PHP backend's `'{\"a\":1}'` arrives as `{"a":1}` (CppComet kept the
//! backslashes). Identifiers may be backquoted. Comments (`-- `, `#`,
//! `/* */`) are skipped, as drivers put them in front of their queries.

use crate::domain::clip;

/// One token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tok {
    /// A bare word: keyword or identifier, as written.
    Word(String),
    /// A backquoted identifier.
    Quoted(String),
    /// A string literal, unescaped.
    Str(String),
    /// A number as written (digits, maybe a fraction).
    Num(String),
    /// `@@name` or `@@scope.name`.
    SysVar(String),
    /// `@name`.
    UserVar(String),
    /// Punctuation: `( ) , ; = * . -` and other single characters.
    Sym(char),
}

/// A lexing error: the message names the offending text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LexError(pub String);

/// Splits `sql` into tokens.
pub fn lex(sql: &str) -> Result<Vec<Tok>, LexError> {
    let b = sql.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\t' | b'\r' | b'\n' | 0x0B | 0x0C => i += 1,
            b'#' => i = skip_line(b, i),
            b'-' if b.get(i + 1) == Some(&b'-') && b.get(i + 2).is_none_or(|c| c.is_ascii_whitespace()) => {
                i = skip_line(b, i)
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = sql[i + 2..]
                    .find("*/")
                    .ok_or_else(|| LexError(format!("unterminated comment near {}", clip(&sql[i..]))))?;
                i = i + 2 + end + 2;
            }
            b'\'' | b'"' => {
                let (s, next) = string(sql, i)?;
                out.push(Tok::Str(s));
                i = next;
            }
            b'`' => {
                let mut s = String::new();
                let mut j = i + 1;
                loop {
                    match sql[j..].find('`') {
                        Some(k) => {
                            s.push_str(&sql[j..j + k]);
                            j += k + 1;
                            if b.get(j) == Some(&b'`') {
                                s.push('`');
                                j += 1;
                            } else {
                                break;
                            }
                        }
                        None => return Err(LexError(format!("unterminated identifier near {}", clip(&sql[i..])))),
                    }
                }
                out.push(Tok::Quoted(s));
                i = j;
            }
            b'@' => {
                let sys = b.get(i + 1) == Some(&b'@');
                let start = if sys { i + 2 } else { i + 1 };
                let mut j = start;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'.' || b[j] == b'$') {
                    j += 1;
                }
                let name = sql[start..j].to_string();
                out.push(if sys { Tok::SysVar(name) } else { Tok::UserVar(name) });
                i = j;
            }
            b'0'..=b'9' => {
                let mut j = i;
                while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.') {
                    j += 1;
                }
                if j < b.len() && (b[j].is_ascii_alphabetic() || b[j] == b'_') {
                    // `1abc` is an identifier in MySQL.
                    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'$') {
                        j += 1;
                    }
                    out.push(Tok::Word(sql[i..j].to_string()));
                } else {
                    out.push(Tok::Num(sql[i..j].to_string()));
                }
                i = j;
            }
            c if c.is_ascii_alphabetic() || c == b'_' || c == b'$' || c >= 0x80 => {
                let mut j = i;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'$' || b[j] >= 0x80) {
                    j += 1;
                }
                out.push(Tok::Word(sql[i..j].to_string()));
                i = j;
            }
            _ => {
                let ch = sql[i..].chars().next().unwrap_or('?');
                out.push(Tok::Sym(ch));
                i += ch.len_utf8();
            }
        }
    }
    Ok(out)
}

fn skip_line(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i] != b'\n' {
        i += 1;
    }
    i
}

/// Reads a quoted string starting at `start`; returns it and the next index.
fn string(sql: &str, start: usize) -> Result<(String, usize), LexError> {
    let b = sql.as_bytes();
    let q = b[start];
    let mut out: Vec<u8> = Vec::new();
    let mut i = start + 1;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' && i + 1 < b.len() {
            let e = b[i + 1];
            match e {
                b'0' => out.push(0),
                b'b' => out.push(8),
                b'n' => out.push(b'\n'),
                b'r' => out.push(b'\r'),
                b't' => out.push(b'\t'),
                b'Z' => out.push(0x1A),
                // MySQL keeps the backslash before % and _ (LIKE patterns).
                b'%' | b'_' => {
                    out.push(b'\\');
                    out.push(e);
                }
                _ => out.push(e),
            }
            i += 2;
            continue;
        }
        if c == q {
            if b.get(i + 1) == Some(&q) {
                out.push(q);
                i += 2;
                continue;
            }
            let s = String::from_utf8(out).map_err(|_| LexError("string literal is not valid UTF-8".into()))?;
            return Ok((s, i + 1));
        }
        out.push(c);
        i += 1;
    }
    Err(LexError(format!("unterminated string literal near {}", clip(&sql[start..]))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(sql: &str) -> Vec<String> {
        lex(sql).unwrap().into_iter().filter_map(|t| if let Tok::Str(s) = t { Some(s) } else { None }).collect()
    }

    #[test]
    fn php_escaped_json_is_unescaped() {
        assert_eq!(strs(r#"'{\"a\":1}'"#), [r#"{"a":1}"#]);
    }

    #[test]
    fn both_quotes_doubled_quotes_and_escapes() {
        assert_eq!(strs(r#"'it''s' "say ""hi""" 'a\'b' "c\"d""#), ["it's", r#"say "hi""#, "a'b", "c\"d"]);
        assert_eq!(strs(r"'l1\nl2\tx\\y\0z\Zw\r'"), ["l1\nl2\tx\\y\0z\u{1a}w\r"]);
        assert_eq!(strs(r"'100\% \_ \q'"), [r"100\% \_ q"]);
        assert_eq!(strs("'мир ✓'"), ["мир ✓"]);
    }

    #[test]
    fn unterminated_literals_are_errors() {
        assert!(lex("SELECT 'abc").unwrap_err().0.contains("'abc"));
        assert!(lex("SELECT `abc").is_err());
        assert!(lex("SELECT /* x").is_err());
    }

    #[test]
    fn words_numbers_vars_and_comments() {
        let t =
            lex("/* c */ SELECT @@version_comment, @@session.x, `in``dex` -- tail\n FROM t # more\n LIMIT 10").unwrap();
        assert_eq!(
            t,
            vec![
                Tok::Word("SELECT".into()),
                Tok::SysVar("version_comment".into()),
                Tok::Sym(','),
                Tok::SysVar("session.x".into()),
                Tok::Sym(','),
                Tok::Quoted("in`dex".into()),
                Tok::Word("FROM".into()),
                Tok::Word("t".into()),
                Tok::Word("LIMIT".into()),
                Tok::Num("10".into()),
            ]
        );
    }
}
