//! HS256 JSON Web Tokens as user keys (docs/protocol.md, "JWT keys").
//!
//! The secret is the dev_id's backend password followed by the dev_id in
//! decimal. Only `alg: HS256` is accepted (never `none`); the payload must
//! name the connecting user in `user_id` (number or numeric string) and carry
//! a numeric `exp` in the future. Revocation is checked by the caller.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::domain::clip;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a compact JWS (three base64url parts)")]
    Format,
    /// Holds the token's `alg` as sent; the message clips it, since a
    /// forged header can make it as long as the whole token.
    #[error("algorithm {} is not accepted (only HS256)", clip(.0))]
    Alg(String),
    #[error("bad signature")]
    Signature,
    #[error("payload lacks a user_id")]
    NoUser,
    #[error("token is for user {0}")]
    WrongUser(u64),
    #[error("token has no numeric exp")]
    NoExp,
    #[error("token expired at {0}")]
    Expired(i64),
}

/// Whether `key` looks like a JWT at all (so it is not compared as a hash).
pub fn looks_like_jwt(key: &str) -> bool {
    key.len() > 20 && key.bytes().filter(|&b| b == b'.').count() == 2 && key.starts_with("eyJ")
}

fn part(s: &str) -> Result<serde_json::Value, JwtError> {
    let bytes = URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).map_err(|_| JwtError::Format)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Format)
}

fn number(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The user id a token claims, without checking anything else (used to
/// find the home shard of a revoked token).
pub fn claimed_user(token: &str) -> Option<u64> {
    let mut it = token.split('.');
    let (_, payload) = (it.next()?, it.next()?);
    number(part(payload).ok()?.get("user_id")?)
}

/// The `exp` a token claims, if any.
pub fn claimed_exp(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    part(payload).ok()?.get("exp")?.as_i64()
}

/// Verifies `token` for `user_id` with `secret` at unix time `now`.
pub fn verify(token: &str, secret: &[u8], user_id: u64, now: i64) -> Result<(), JwtError> {
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(sig), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(JwtError::Format);
    };
    let header = part(h)?;
    let alg = header.get("alg").and_then(|a| a.as_str()).unwrap_or("");
    if alg != "HS256" {
        return Err(JwtError::Alg(alg.to_string()));
    }
    // No padding is trimmed here (JWS has none, RFC 7515 §2): each signature
    // must have exactly one spelling, because revocation matches whole token
    // strings and `h.p.s=` would otherwise verify as a second, unrevoked copy.
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| JwtError::Format)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| JwtError::Signature)?;
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    // verify_slice compares in constant time.
    mac.verify_slice(&sig).map_err(|_| JwtError::Signature)?;
    let payload = part(p)?;
    let uid = payload.get("user_id").and_then(number).ok_or(JwtError::NoUser)?;
    if uid != user_id {
        return Err(JwtError::WrongUser(uid));
    }
    let exp = payload.get("exp").and_then(|e| e.as_f64()).ok_or(JwtError::NoExp)?;
    if exp <= now as f64 {
        return Err(JwtError::Expired(exp as i64));
    }
    Ok(())
}

/// Signs a token (for tests and tools): HS256 over `payload`.
pub fn sign(payload: &serde_json::Value, secret: &[u8]) -> String {
    sign_with_header(&serde_json::json!({"alg": "HS256", "typ": "JWT"}), payload, secret)
}

/// Signs with an arbitrary header (tests use it to forge `alg`).
pub fn sign_with_header(header: &serde_json::Value, payload: &serde_json::Value, secret: &[u8]) -> String {
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let p = URL_SAFE_NO_PAD.encode(payload.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    let s = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{h}.{p}.{s}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_700_000_000;

    #[test]
    fn valid_token_for_the_right_user() {
        let t = sign(&json!({"user_id": 5, "exp": NOW + 60}), b"secret1");
        assert!(looks_like_jwt(&t));
        assert_eq!(verify(&t, b"secret1", 5, NOW), Ok(()));
        let t = sign(&json!({"user_id": "5", "exp": NOW + 60}), b"secret1");
        assert_eq!(verify(&t, b"secret1", 5, NOW), Ok(()), "numeric string user_id");
        assert_eq!(claimed_user(&t), Some(5));
    }

    #[test]
    fn every_refusal() {
        let good = json!({"user_id": 5, "exp": NOW + 60});
        assert_eq!(
            verify(&sign(&json!({"user_id": 5, "exp": NOW - 1}), b"s"), b"s", 5, NOW),
            Err(JwtError::Expired(NOW - 1))
        );
        assert_eq!(verify(&sign(&good, b"other"), b"s", 5, NOW), Err(JwtError::Signature));
        assert_eq!(verify(&sign(&good, b"s"), b"s", 6, NOW), Err(JwtError::WrongUser(5)));
        assert_eq!(verify(&sign(&json!({"user_id": 5}), b"s"), b"s", 5, NOW), Err(JwtError::NoExp));
        let none = sign_with_header(&json!({"alg": "none"}), &good, b"s");
        assert_eq!(verify(&none, b"s", 5, NOW), Err(JwtError::Alg("none".into())));
        assert_eq!(
            verify(&none, b"s", 5, NOW).unwrap_err().to_string(),
            "algorithm 'none' is not accepted (only HS256)"
        );
        let long_alg = sign_with_header(&json!({"alg": "x".repeat(10_000)}), &good, b"s");
        let msg = verify(&long_alg, b"s", 5, NOW).unwrap_err().to_string();
        assert!(msg.len() < 400 && msg.contains("(10000 bytes)"), "{msg}");
        let unsigned = format!("{}.", none.rsplit_once('.').unwrap().0);
        assert!(verify(&unsigned, b"s", 5, NOW).is_err());
        assert_eq!(verify("a.b", b"s", 5, NOW), Err(JwtError::Format));
    }

    #[test]
    fn a_signature_has_one_spelling() {
        // Found by the jwt fuzz target: a revoked token with `=` appended
        // verified, and the revocation list (whole strings) did not know it.
        let t = sign(&json!({"user_id": 5, "exp": NOW + 60}), b"s");
        assert_eq!(verify(&t, b"s", 5, NOW), Ok(()));
        for padded in [format!("{t}="), format!("{t}==")] {
            assert_eq!(verify(&padded, b"s", 5, NOW), Err(JwtError::Format), "{padded}");
        }
    }
}
