//! Fuzz body for the client character sets (`comet::cometql::charset`):
//! what a client sends is converted to UTF-8, answers are converted back.
//!
//! Input layout: one selector byte (character set, and a collation id for
//! `from_collation`), then data. Decoding never panics; what decodes
//! encodes back to exactly the bytes sent (no character set loses a byte it
//! accepted); encoding any text gives, read back, the same text with '?' for
//! each character the set cannot hold, never more or fewer characters.

use comet::cometql::charset::Charset;

const SETS: [Charset; 5] = [Charset::Utf8mb4, Charset::Utf8mb3, Charset::Latin1, Charset::Ascii, Charset::Binary];

pub fn run(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    if let Ok(c) = Charset::from_collation(sel) {
        assert_eq!(Charset::from_collation(c.collation() as u8), Ok(c), "collation {sel}");
        assert_eq!(Charset::from_name(c.name()), Ok(c));
    }
    let name = String::from_utf8_lossy(rest);
    if let Err(e) = Charset::from_name(&name) {
        // The name is clipped to 256 characters, whatever it is made of.
        assert!(e.chars().count() < 330, "a refusal quotes the name clipped: {} characters", e.chars().count());
    }
    let cs = SETS[sel as usize % SETS.len()];
    if let Ok(text) = cs.decode(rest) {
        assert_eq!(&*cs.encode(&text), rest, "{cs:?}: decoded then encoded");
    }
    let text = String::from_utf8_lossy(rest);
    let wire = cs.encode(&text);
    let back = cs.decode(&wire).expect("what comet encodes, it decodes");
    assert_eq!(back.chars().count(), text.chars().count(), "{cs:?}: one character for each");
    for (b, t) in back.chars().zip(text.chars()) {
        assert!(b == t || b == '?', "{cs:?}: {t:?} came back as {b:?}");
    }
}
