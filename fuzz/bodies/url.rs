//! Fuzz body for the connection URL (`comet::frontend::url`, docs/protocol.md
//! "Connecting").
//!
//! The input is a request path. Its parameters are parsed, written back in
//! a canonical form (every key byte percent-encoded) and parsed again: the
//! two must agree, which pins percent-decoding and the by-name reading. The
//! path prefixes are checked to hand out exactly what follows them.

use comet::frontend::url::{ConnectParams, parse_params, ws_params};

pub fn run(data: &[u8]) {
    let path = String::from_utf8_lossy(data);
    if let Some(params) = ws_params(&path) {
        assert!(path.ends_with(params), "the parameters are the tail of the path");
        check_params(params);
    }
    check_params(&path);

    // Under each prefix, the parameter string comes back unchanged (less
    // one leading `?` of the query-string form).
    let want = path.strip_prefix('?').unwrap_or(&path);
    for prefix in ["/ws/", "//ws/", "/comet-server/ws/", "//comet-server/ws/", "/ws?", "/comet-server/ws?"] {
        let full = format!("{prefix}{path}");
        assert_eq!(ws_params(&full), Some(want), "{full:?}");
    }
    for not_comet in ["/wsx", "/info", "/comet-server/wsx", "ws/"] {
        assert_eq!(ws_params(&format!("{not_comet}{path}")), None);
    }
}

fn check_params(params: &str) {
    let p = parse_params(params);
    assert!(p.uuid.len() <= 32 && p.uuid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
    // The channel list splits into names of the allowed characters only.
    for name in comet::frontend::channel_names(&p.subscription) {
        assert!(!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
    }
    let again = parse_params(&canonical(&p));
    assert_eq!(again, p, "canonical form {:?}", canonical(&p));
}

/// The parameter string the JS client would send for `p`, with the key
/// fully percent-encoded.
fn canonical(p: &ConnectParams) -> String {
    let mut s = String::from("sesion=");
    for b in p.key.bytes() {
        s.push_str(&format!("%{b:02X}"));
    }
    s.push_str(&format!("&myid={}&devid={}", p.user_id, p.dev_id));
    if let Some(v) = p.api_major {
        s.push_str(&format!("&v={v}.08"));
    }
    if !p.uuid.is_empty() {
        s.push_str(&format!("&uuid={}", p.uuid));
    }
    if !p.subscription.is_empty() {
        s.push_str("&subscription=");
        for b in p.subscription.bytes() {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s.push_str("&api=js");
    s
}
