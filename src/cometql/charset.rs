//! The client's character set, converted at the protocol edge.
//!
//! Everything inside comet is UTF-8. A MySQL client may speak another
//! character set: it names one with the collation id of its handshake, or
//! later with `SET NAMES x`, `SET CHARACTER SET x` or
//! `SET character_set_client = x`. comet converts what that client sends
//! (query text, prepared-statement text, string parameters) to UTF-8 before
//! it is lexed, and what it answers (result text, error messages) back into
//! the client's character set, as a MySQL server does.
//!
//! Supported: `utf8mb4` and `utf8` (`utf8mb3`), taken as UTF-8; `latin1`,
//! which MySQL defines as Windows-1252 (0x80 is '€'), converted both ways
//! with '?' for characters it cannot hold; `ascii` (bytes above 0x7F are
//! refused, unrepresentable answers become '?'); and `binary`, which passes
//! bytes through (they must still be UTF-8 text). Any other character set is
//! refused, naming it, wherever it is asked for.

use std::borrow::Cow;

/// A character set a client may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Charset {
    /// UTF-8 with 4-byte characters: comet's own.
    #[default]
    Utf8mb4,
    /// MySQL's 3-byte `utf8`: UTF-8 on the wire (4-byte characters pass).
    Utf8mb3,
    /// MySQL's `latin1`, which is Windows-1252.
    Latin1,
    /// 7-bit US-ASCII.
    Ascii,
    /// Bytes as they are (comet's text is UTF-8).
    Binary,
}

/// Error code for an unknown or unsupported character set (ER_UNKNOWN_CHARACTER_SET).
pub const UNKNOWN_CHARSET: u16 = 1115;
/// Error code for text that is not valid in the client's character set
/// (ER_INVALID_CHARACTER_STRING).
pub const INVALID_STRING: u16 = 1300;

/// Windows-1252 at 0x80..=0x9F; MySQL maps the five unassigned bytes
/// (0x81, 0x8D, 0x8F, 0x90, 0x9D) to the C1 control of the same number.
const CP1252_HIGH: [char; 32] = [
    '\u{20AC}', '\u{0081}', '\u{201A}', '\u{0192}', '\u{201E}', '\u{2026}', '\u{2020}', '\u{2021}', '\u{02C6}',
    '\u{2030}', '\u{0160}', '\u{2039}', '\u{0152}', '\u{008D}', '\u{017D}', '\u{008F}', '\u{0090}', '\u{2018}',
    '\u{2019}', '\u{201C}', '\u{201D}', '\u{2022}', '\u{2013}', '\u{2014}', '\u{02DC}', '\u{2122}', '\u{0161}',
    '\u{203A}', '\u{0153}', '\u{009D}', '\u{017E}', '\u{0178}',
];

/// Character sets MySQL knows and comet refuses, by collation id, so a
/// refusal can name what the client asked for.
const REFUSED: &[(&str, &[u8])] = &[
    ("big5", &[1, 84]),
    ("dec8", &[3, 69]),
    ("cp850", &[4, 80]),
    ("hp8", &[6, 72]),
    ("koi8r", &[7, 74]),
    ("latin2", &[2, 9, 21, 27, 77]),
    ("swe7", &[10, 82]),
    ("ujis", &[12, 91]),
    ("sjis", &[13, 88]),
    ("cp1251", &[14, 23, 50, 51, 52]),
    ("hebrew", &[16, 71]),
    ("tis620", &[18, 89]),
    ("euckr", &[19, 85]),
    ("koi8u", &[22, 75]),
    ("gb2312", &[24, 86]),
    ("greek", &[25, 70]),
    ("cp1250", &[26, 34, 44, 66, 99]),
    ("gbk", &[28, 87]),
    ("latin5", &[30, 78]),
    ("armscii8", &[32, 64]),
    ("ucs2", &[35, 90]),
    ("cp866", &[36, 68]),
    ("keybcs2", &[37, 73]),
    ("macce", &[38, 43]),
    ("macroman", &[39, 53]),
    ("cp852", &[40, 81]),
    ("latin7", &[20, 41, 42, 79]),
    ("utf16", &[54, 55]),
    ("utf16le", &[56, 62]),
    ("cp1256", &[57, 67]),
    ("cp1257", &[29, 58, 59]),
    ("utf32", &[60, 61]),
    ("geostd8", &[92, 93]),
    ("cp932", &[95, 96]),
    ("eucjpms", &[97, 98]),
    ("gb18030", &[248, 249, 250]),
];

impl Charset {
    /// The character set of a handshake's collation id (0: the server default).
    pub fn from_collation(id: u8) -> Result<Charset, String> {
        Ok(match id {
            0 | 45 | 46 | 224..=247 | 255 => Charset::Utf8mb4,
            33 | 76 | 83 | 192..=215 | 223 => Charset::Utf8mb3,
            5 | 8 | 15 | 31 | 47 | 48 | 49 | 94 => Charset::Latin1,
            11 | 65 => Charset::Ascii,
            63 => Charset::Binary,
            _ => {
                let name = REFUSED.iter().find(|(_, ids)| ids.contains(&id)).map_or("unknown", |(n, _)| n);
                return Err(format!(
                    "Character set '{name}' (collation {id}) is not supported: connect with utf8mb4, utf8, latin1, ascii or binary"
                ));
            }
        })
    }

    /// The character set named in `SET NAMES` and the like (any case;
    /// `DEFAULT` is utf8mb4).
    pub fn from_name(name: &str) -> Result<Charset, String> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "utf8mb4" | "default" => Charset::Utf8mb4,
            "utf8" | "utf8mb3" => Charset::Utf8mb3,
            "latin1" => Charset::Latin1,
            "ascii" => Charset::Ascii,
            "binary" => Charset::Binary,
            other if REFUSED.iter().any(|(n, _)| *n == other) => {
                return Err(format!(
                    "Character set '{other}' is not supported: use utf8mb4, utf8, latin1, ascii or binary"
                ));
            }
            _ => return Err(format!("Unknown character set: {}", crate::domain::clip(name))),
        })
    }

    /// The name MySQL uses.
    pub fn name(self) -> &'static str {
        match self {
            Charset::Utf8mb4 => "utf8mb4",
            Charset::Utf8mb3 => "utf8mb3",
            Charset::Latin1 => "latin1",
            Charset::Ascii => "ascii",
            Charset::Binary => "binary",
        }
    }

    /// The default collation id, sent in column definitions.
    pub fn collation(self) -> u16 {
        match self {
            Charset::Utf8mb4 => 45,
            Charset::Utf8mb3 => 33,
            Charset::Latin1 => 8,
            Charset::Ascii => 11,
            Charset::Binary => 63,
        }
    }

    /// Text the client sent, as UTF-8. `Err` names the first byte that
    /// is not valid in this character set and its offset.
    pub fn decode(self, bytes: &[u8]) -> Result<Cow<'_, str>, String> {
        match self {
            Charset::Utf8mb4 | Charset::Utf8mb3 | Charset::Binary => match std::str::from_utf8(bytes) {
                Ok(s) => Ok(Cow::Borrowed(s)),
                Err(e) => {
                    let at = e.valid_up_to();
                    Err(format!(
                        "is not valid {} (byte 0x{:02X} at offset {at}): send UTF-8 or name the client's character set with SET NAMES, e.g. SET NAMES latin1",
                        self.name(),
                        bytes[at]
                    ))
                }
            },
            Charset::Ascii => match bytes.iter().position(|b| !b.is_ascii()) {
                None => Ok(Cow::Borrowed(std::str::from_utf8(bytes).map_err(|e| e.to_string())?)),
                Some(at) => Err(format!(
                    "is not valid ascii (byte 0x{:02X} at offset {at}): use SET NAMES latin1 or utf8mb4",
                    bytes[at]
                )),
            },
            Charset::Latin1 => {
                if bytes.is_ascii() {
                    return Ok(Cow::Borrowed(std::str::from_utf8(bytes).map_err(|e| e.to_string())?));
                }
                Ok(Cow::Owned(
                    bytes
                        .iter()
                        .map(|&b| match b {
                            0x80..=0x9F => CP1252_HIGH[(b - 0x80) as usize],
                            _ => b as char,
                        })
                        .collect(),
                ))
            }
        }
    }

    /// UTF-8 text in this character set, '?' for what it cannot hold.
    pub fn encode(self, s: &str) -> Cow<'_, [u8]> {
        match self {
            Charset::Utf8mb4 | Charset::Utf8mb3 | Charset::Binary => Cow::Borrowed(s.as_bytes()),
            _ if s.is_ascii() => Cow::Borrowed(s.as_bytes()),
            Charset::Ascii => Cow::Owned(s.chars().map(|c| if c.is_ascii() { c as u8 } else { b'?' }).collect()),
            Charset::Latin1 => Cow::Owned(s.chars().map(latin1_byte).collect()),
        }
    }
}

/// One character in MySQL's latin1 (Windows-1252), '?' when it has none.
fn latin1_byte(c: char) -> u8 {
    match c as u32 {
        n @ (0..=0x7F | 0xA0..=0xFF) => n as u8,
        _ => match CP1252_HIGH.iter().position(|&h| h == c) {
            Some(i) => 0x80 + i as u8,
            None => b'?',
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latin1_bytes_become_utf8_and_back() {
        // "café €1" in latin1 (Windows-1252): é = 0xE9, € = 0x80.
        let wire = b"caf\xE9 \x801";
        let text = Charset::Latin1.decode(wire).unwrap();
        assert_eq!(text, "café €1");
        assert_eq!(text.as_bytes(), b"caf\xC3\xA9 \xE2\x82\xAC1");
        assert_eq!(&*Charset::Latin1.encode(&text), wire);
    }

    #[test]
    fn every_latin1_byte_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        let text = Charset::Latin1.decode(&all).unwrap();
        assert_eq!(&*Charset::Latin1.encode(&text), &all[..]);
    }

    #[test]
    fn unrepresentable_characters_are_sent_as_question_marks() {
        assert_eq!(&*Charset::Latin1.encode("a\u{4E2D}b😀é"), b"a?b?\xE9");
        assert_eq!(&*Charset::Ascii.encode("é!"), b"?!");
        assert_eq!(&*Charset::Utf8mb4.encode("é"), "é".as_bytes());
    }

    #[test]
    fn bad_bytes_are_named_with_their_offset() {
        let e = Charset::Utf8mb4.decode(b"ab\xE9cd").unwrap_err();
        assert!(e.contains("not valid utf8mb4 (byte 0xE9 at offset 2)"), "{e}");
        let e = Charset::Ascii.decode(b"x\xFF").unwrap_err();
        assert!(e.contains("byte 0xFF at offset 1"), "{e}");
    }

    #[test]
    fn collations_and_names() {
        assert_eq!(Charset::from_collation(8), Ok(Charset::Latin1));
        assert_eq!(Charset::from_collation(255), Ok(Charset::Utf8mb4));
        assert_eq!(Charset::from_collation(33), Ok(Charset::Utf8mb3));
        let e = Charset::from_collation(28).unwrap_err();
        assert!(e.contains("'gbk' (collation 28)"), "{e}");
        assert_eq!(Charset::from_name("LATIN1"), Ok(Charset::Latin1));
        assert_eq!(Charset::from_name("utf8"), Ok(Charset::Utf8mb3));
        assert!(Charset::from_name("cp1251").unwrap_err().contains("'cp1251' is not supported"));
        assert_eq!(Charset::from_name("klingon").unwrap_err(), "Unknown character set: 'klingon'");
        for c in [Charset::Utf8mb4, Charset::Utf8mb3, Charset::Latin1, Charset::Ascii, Charset::Binary] {
            assert_eq!(Charset::from_name(c.name()), Ok(c));
            assert_eq!(Charset::from_collation(c.collation() as u8), Ok(c));
        }
    }
}
