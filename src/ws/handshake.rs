//! The HTTP/1.1 request that opens every frontend connection, and the
//! WebSocket upgrade answer (RFC 6455 §4).
//!
//! `parse_request` reads one request head with httparse and keeps only what
//! comet uses later (path, the upgrade headers, and the client facts that
//! `users_in_pipes` reports). It does not decide what the path means: plain
//! HTTP routes and comet URL parameters are the frontend's business.

use base64::Engine;
use sha1::{Digest, Sha1};

/// Longest request head accepted; browsers send well under 4 KiB.
pub const MAX_HEAD: usize = 16 * 1024;

/// Why an upgrade was refused; the text becomes the one-line 400 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("WebSocket upgrade needs method GET, got {0}")]
    Method(String),
    #[error("missing header 'Upgrade: websocket'")]
    Upgrade,
    #[error("missing header 'Connection: Upgrade'")]
    Connection,
    #[error("missing or invalid Sec-WebSocket-Key")]
    Key,
    #[error("unsupported Sec-WebSocket-Version (need 13)")]
    Version,
}

/// A parsed request head: enough to route it and, for an upgrade, to answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Header `Upgrade` contains the token `websocket`.
    pub upgrade_websocket: bool,
    /// Header `Connection` contains the token `upgrade`.
    pub connection_upgrade: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    /// First value offered in `Sec-WebSocket-Protocol`, echoed back.
    pub ws_protocol: Option<String>,
    /// Every `Sec-WebSocket-Extensions` line, joined with ", ".
    pub ws_extensions: Option<String>,
    pub origin: Option<String>,
    pub user_agent: Option<String>,
    pub accept_language: Option<String>,
    pub forwarded_for: Option<String>,
    pub if_none_match: Option<String>,
    /// Length of the head in bytes, including the blank line.
    pub head_len: usize,
}

impl Request {
    /// Whether the client asked for a WebSocket (even a malformed one).
    pub fn wants_websocket(&self) -> bool {
        self.upgrade_websocket
    }

    /// Checks the upgrade headers; `Ok` means `101` may be sent.
    pub fn validate_upgrade(&self) -> Result<(), HandshakeError> {
        if self.method != "GET" {
            return Err(HandshakeError::Method(self.method.clone()));
        }
        if !self.upgrade_websocket {
            return Err(HandshakeError::Upgrade);
        }
        if !self.connection_upgrade {
            return Err(HandshakeError::Connection);
        }
        match &self.ws_key {
            Some(k) if is_valid_key(k) => {}
            _ => return Err(HandshakeError::Key),
        }
        if self.ws_version.as_deref().map(str::trim) != Some("13") {
            return Err(HandshakeError::Version);
        }
        Ok(())
    }

    /// The first acceptable permessage-deflate offer, if one was made (see
    /// [`super::deflate::negotiate`]).
    pub fn offers_deflate(&self) -> Option<super::deflate::Accepted> {
        super::deflate::negotiate(self.ws_extensions.as_deref())
    }

    /// The `101 Switching Protocols` answer; `deflate`: the accepted
    /// permessage-deflate offer (from [`Request::offers_deflate`]).
    pub fn upgrade_response(&self, deflate: Option<super::deflate::Accepted>) -> Vec<u8> {
        let key = self.ws_key.as_deref().unwrap_or("");
        let mut r = String::with_capacity(160);
        r.push_str(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
        );
        r.push_str(&accept_key(key.trim()));
        r.push_str("\r\n");
        if let Some(p) = &self.ws_protocol {
            r.push_str("Sec-WebSocket-Protocol: ");
            r.push_str(p);
            r.push_str("\r\n");
        }
        if let Some(d) = deflate {
            r.push_str("Sec-WebSocket-Extensions: ");
            r.push_str(&d.response());
            r.push_str("\r\n");
        }
        r.push_str("\r\n");
        r.into_bytes()
    }
}

/// A key is the base64 of 16 bytes (RFC 6455 §4.1).
fn is_valid_key(k: &str) -> bool {
    base64::engine::general_purpose::STANDARD.decode(k.trim()).is_ok_and(|b| b.len() == 16)
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

fn has_token(value: &str, token: &str) -> bool {
    value.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Parses a request head from the front of `buf`. `Ok(None)`: incomplete.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(HandshakeError::TooLarge);
            }
            return Ok(None);
        }
        Err(e) => return Err(HandshakeError::Malformed(e.to_string())),
    };
    if head_len > MAX_HEAD {
        return Err(HandshakeError::TooLarge);
    }
    let mut r = Request {
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("/").to_string(),
        head_len,
        ..Request::default()
    };
    for h in req.headers.iter() {
        let Ok(v) = std::str::from_utf8(h.value) else {
            continue;
        };
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            r.upgrade_websocket = has_token(v, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            r.connection_upgrade = has_token(v, "upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            r.ws_key = Some(v.trim().to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            r.ws_version = Some(v.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            if r.ws_protocol.is_none() {
                r.ws_protocol = v.split(',').map(str::trim).find(|s| !s.is_empty()).map(String::from);
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            match &mut r.ws_extensions {
                Some(e) => {
                    e.push_str(", ");
                    e.push_str(v);
                }
                None => r.ws_extensions = Some(v.to_string()),
            }
        } else if name.eq_ignore_ascii_case("origin") {
            r.origin = Some(v.to_string());
        } else if name.eq_ignore_ascii_case("user-agent") {
            r.user_agent = Some(v.to_string());
        } else if name.eq_ignore_ascii_case("accept-language") {
            r.accept_language = Some(v.to_string());
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            r.forwarded_for = v.split(',').next().map(|s| s.trim().to_string());
        } else if name.eq_ignore_ascii_case("if-none-match") {
            r.if_none_match = Some(v.trim().to_string());
        }
    }
    Ok(Some(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn rfc6455_accept_key_fixture() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn upgrade_answer_echoes_first_protocol() {
        let r = parse_request(RFC_REQUEST).unwrap().unwrap();
        assert_eq!(r.head_len, RFC_REQUEST.len());
        r.validate_upgrade().unwrap();
        let resp = String::from_utf8(r.upgrade_response(None)).unwrap();
        assert_eq!(
            resp,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
        );
        assert_eq!(r.origin.as_deref(), Some("http://example.com"));
    }

    #[test]
    fn deflate_offers_over_several_lines_are_answered_byte_exactly() {
        let req = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=10\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n";
        let r = parse_request(req).unwrap().unwrap();
        assert_eq!(
            r.ws_extensions.as_deref(),
            Some("permessage-deflate; server_max_window_bits=10, permessage-deflate; client_max_window_bits")
        );
        let accepted = r.offers_deflate();
        assert_eq!(accepted.map(|a| a.window_bits()), Some(10));
        assert_eq!(
            String::from_utf8(r.upgrade_response(accepted)).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10\r\n\r\n"
        );
        // Chromium's offer.
        let chrome =
            b"GET /ws HTTP/1.1\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n";
        let accepted = parse_request(chrome).unwrap().unwrap().offers_deflate();
        assert_eq!(accepted, Some(super::super::deflate::Accepted { server_max_window_bits: None }));
        // No acceptable offer: no extension in the answer.
        let bad =
            b"GET /ws HTTP/1.1\r\nSec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=16\r\n\r\n";
        assert_eq!(parse_request(bad).unwrap().unwrap().offers_deflate(), None);
        assert_eq!(parse_request(RFC_REQUEST).unwrap().unwrap().offers_deflate(), None);
    }

    #[test]
    fn incomplete_head_asks_for_more() {
        assert_eq!(parse_request(&RFC_REQUEST[..40]), Ok(None));
    }

    #[test]
    fn bad_upgrades_name_the_missing_piece() {
        let cases: &[(&str, HandshakeError)] = &[
            ("POST / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", HandshakeError::Method("POST".into())),
            ("GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", HandshakeError::Connection),
            ("GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n", HandshakeError::Key),
            (
                "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
                HandshakeError::Version,
            ),
            ("GET / HTTP/1.1\r\nConnection: Upgrade\r\n\r\n", HandshakeError::Upgrade),
        ];
        for (req, want) in cases {
            let r = parse_request(req.as_bytes()).unwrap().unwrap();
            assert_eq!(r.validate_upgrade().unwrap_err(), *want, "{req}");
        }
    }

    #[test]
    fn garbage_and_oversized_heads_are_refused() {
        assert!(matches!(parse_request(b"\x00\x01\x02 \r\n\r\n"), Err(HandshakeError::Malformed(_))));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(parse_request(&big), Err(HandshakeError::TooLarge));
    }
}
