//! Fuzz body for JWT user keys (`comet::users::jwt`, docs/protocol.md "JWT keys").
//!
//! Input layout: one control byte, then text. The text is tried as a token:
//! one that verifies must be HS256, for the user it claims, not expired, and
//! the only spelling of its signature (revocation matches tokens as strings,
//! so a second spelling of a revoked token would get in). The text also goes
//! into the claims of a freshly signed token, which must verify exactly when
//! it has not expired and stop verifying after any one-character edit.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use comet::users::jwt::{self, JwtError};

/// Password `pw` of dev_id 0: the secret is the password and the dev_id.
const SECRET: &[u8] = b"pw0";
const NOW: i64 = 1_700_000_000;

pub fn run(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let uid = u64::from(ctl & 0x0F);
    check_any_token(&text, uid);
    check_signed(&text, uid, ctl);
}

/// Whatever `token` is, a successful verification means what it says.
fn check_any_token(token: &str, uid: u64) {
    let _ = jwt::looks_like_jwt(token);
    let _ = jwt::claimed_exp(token);
    if jwt::verify(token, SECRET, uid, NOW).is_err() {
        return;
    }
    assert_eq!(jwt::claimed_user(token), Some(uid), "verified for {uid}: {token:?}");
    if let Some(exp) = jwt::claimed_exp(token) {
        assert!(exp > NOW, "verified with exp {exp}");
    }
    let parts: Vec<&str> = token.split('.').collect();
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0].trim_end_matches('=')).expect("header")).expect("json");
    assert_eq!(header["alg"], "HS256");
    let sig = URL_SAFE_NO_PAD.decode(parts[2].trim_end_matches('=')).expect("verified signature decodes");
    assert_eq!(
        parts[2],
        URL_SAFE_NO_PAD.encode(&sig),
        "a verified token must be the one spelling of its signature: {token:?}"
    );
}

/// A token comet's own signer makes, with `text` in its claims.
fn check_signed(text: &str, uid: u64, ctl: u8) {
    let exp = NOW - 1 + i64::from(ctl >> 6);
    let payload = serde_json::json!({"user_id": uid, "exp": exp, "name": text});
    let token = jwt::sign(&payload, SECRET);
    assert!(jwt::looks_like_jwt(&token), "{token:?}");
    assert_eq!(jwt::claimed_user(&token), Some(uid));
    assert_eq!(jwt::claimed_exp(&token), Some(exp));
    let want = if exp > NOW { Ok(()) } else { Err(JwtError::Expired(exp)) };
    assert_eq!(jwt::verify(&token, SECRET, uid, NOW), want);
    assert!(jwt::verify(&token, SECRET, uid + 1, NOW).is_err(), "another user");
    assert!(jwt::verify(&token, b"pw1", uid, NOW).is_err(), "another dev_id's secret");
    if exp <= NOW {
        return;
    }
    // One edit anywhere (replace, insert or remove one character) must
    // break the token, whatever the character.
    let bytes = text.as_bytes();
    let at = bytes.first().map_or(0, |&b| b as usize) % (token.len() + 1);
    let c = bytes.get(1).map_or('=', |&b| if b.is_ascii_graphic() { b as char } else { '=' });
    let mut edits = vec![format!("{}{c}{}", &token[..at], &token[at..])];
    if at < token.len() {
        edits.push(format!("{}{}", &token[..at], &token[at + 1..]));
        edits.push(format!("{}{c}{}", &token[..at], &token[at + 1..]));
    }
    for edited in edits {
        if edited != token {
            assert!(jwt::verify(&edited, SECRET, uid, NOW).is_err(), "edited token verifies: {edited:?}");
        }
    }
}
