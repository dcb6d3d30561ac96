//! Fuzz body for the HTTP upgrade request (`comet::ws::handshake`).
//!
//! The input is the bytes a client sends before its first frame. A parsed
//! head must be self-consistent (its length within the input, the same
//! request when re-read from exactly its own bytes), and an accepted upgrade
//! must produce a `101` answer that an HTTP parser reads back with the right
//! `Sec-WebSocket-Accept` and no header smuggled in from the request.

use comet::frontend::url;
use comet::ws::handshake::MAX_HEAD;
use comet::ws::{HandshakeError, accept_key, parse_request};

pub fn run(data: &[u8]) {
    let req = match parse_request(data) {
        Ok(Some(r)) => r,
        Ok(None) => {
            assert!(data.len() <= MAX_HEAD, "an incomplete head over {MAX_HEAD} bytes must be refused");
            return;
        }
        Err(HandshakeError::TooLarge) => {
            assert!(data.len() > MAX_HEAD, "TooLarge for {} bytes", data.len());
            return;
        }
        Err(_) => return,
    };
    assert!(req.head_len <= data.len() && req.head_len <= MAX_HEAD, "head_len {}", req.head_len);
    assert!(data[..req.head_len].ends_with(b"\n"), "a head ends with its blank line");
    assert_eq!(
        parse_request(&data[..req.head_len]),
        Ok(Some(req.clone())),
        "the head alone is the same request (bytes after it belong to the first frame)"
    );
    if req.head_len > 0 {
        assert!(
            !matches!(parse_request(&data[..req.head_len - 1]), Ok(Some(_))),
            "a head one byte short is not complete"
        );
    }

    // The path goes on to the comet URL parser, as in the connection driver.
    if let Some(params) = url::ws_params(&req.path) {
        let p = url::parse_params(params);
        assert!(p.uuid.len() <= 32);
    }

    if req.validate_upgrade().is_err() {
        return;
    }
    assert_eq!(req.method, "GET");
    assert!(req.wants_websocket());
    let key = req.ws_key.clone().expect("validated upgrade has a key");
    let answer = req.upgrade_response(req.offers_deflate());
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut resp = httparse::Response::new(&mut headers);
    let status = resp.parse(&answer).expect("the 101 answer is valid HTTP");
    assert_eq!(status, httparse::Status::Complete(answer.len()), "the answer is exactly one head");
    assert_eq!(resp.code, Some(101));
    let names: Vec<String> = resp.headers.iter().map(|h| h.name.to_ascii_lowercase()).collect();
    let want: &[&str] = if req.ws_protocol.is_some() {
        &["upgrade", "connection", "sec-websocket-accept", "sec-websocket-protocol"]
    } else {
        &["upgrade", "connection", "sec-websocket-accept"]
    };
    assert_eq!(names, want, "no header may come from the request but the protocol");
    let accept = resp.headers[2].value;
    assert_eq!(accept, accept_key(key.trim()).as_bytes());
    if let Some(p) = &req.ws_protocol {
        assert_eq!(resp.headers[3].value, p.as_bytes(), "the first offered protocol is echoed as is");
    }
}
