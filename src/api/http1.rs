//! HTTP/1.1 request framing for the API port, sans-IO: finds where one
//! request ends in the bytes received so far, and keeps what the API needs
//! from its head (method, target, key, keep-alive). Bytes in, a [`Head`]
//! or a [`Refusal`] out; nothing here knows the tables.
//!
//! Bodies must come with `Content-Length` (every HTTP client library sends
//! it for a body it holds in memory); a chunked body is refused with 411,
//! which keeps the framing a length check and the body bound exact.

use super::ApiError;

/// Longest request head accepted, in bytes (431 beyond).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header lines accepted in one head (431 beyond).
pub const MAX_HEADERS: usize = 32;

/// The parts of a request head the API uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// Path and query string, as sent.
    pub target: String,
    /// The key from `Authorization: Bearer ...` or `X-API-Key`.
    pub key: Option<String>,
    /// Whether the connection stays open after the answer: HTTP/1.1 unless
    /// `Connection: close`. An HTTP/1.0 request is answered and closed
    /// (HTTP/1.0 keep-alive would need its own answer header; the clients
    /// backends use all speak HTTP/1.1).
    pub keep_alive: bool,
    /// The client waits for `100 Continue` before sending its body.
    pub expect_continue: bool,
    /// Bytes of the head, blank line included.
    pub head_len: usize,
    /// Bytes of the body that follows (`Content-Length`).
    pub body_len: usize,
}

/// A request that cannot be read on: it is answered with this error and the
/// connection is closed, since where the next request starts is unknown.
pub type Refusal = ApiError;

fn refuse(status: u16, code: u16, message: String) -> Refusal {
    ApiError { status, code, message, retry_after: None }
}

/// Parses the head at the front of `buf`. `Ok(None)`: not complete yet.
/// A body longer than `max_body` is refused (413) as soon as the head says
/// so, before any of it is held.
pub fn parse_head(buf: &[u8], max_body: usize) -> Result<Option<Head>, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(refuse(431, 11, format!("Request head is larger than {MAX_HEAD} bytes")));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(refuse(431, 20, format!("Request has more than {MAX_HEADERS} header lines")));
        }
        Err(e) => return Err(refuse(400, 3, format!("Malformed HTTP request: {e}"))),
    };
    if head_len > MAX_HEAD {
        return Err(refuse(431, 11, format!("Request head is larger than {MAX_HEAD} bytes")));
    }
    let http11 = req.version == Some(1);
    let mut head = Head {
        method: req.method.unwrap_or("").to_string(),
        target: req.path.unwrap_or("/").to_string(),
        key: None,
        keep_alive: http11,
        expect_continue: false,
        head_len,
        body_len: 0,
    };
    let mut length: Option<usize> = None;
    for h in req.headers.iter() {
        let Ok(v) = std::str::from_utf8(h.value) else { continue };
        let v = v.trim();
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n = v
                .parse::<usize>()
                .map_err(|_| refuse(400, 3, format!("Content-Length {} is not a number", crate::domain::clip(v))))?;
            if length.is_some_and(|l| l != n) {
                return Err(refuse(400, 3, "Two different Content-Length headers".into()));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(refuse(
                411,
                2,
                "Transfer-Encoding is not supported: send the body with a Content-Length".into(),
            ));
        } else if name.eq_ignore_ascii_case("authorization") {
            if let Some((scheme, token)) = v.split_once(' ')
                && scheme.eq_ignore_ascii_case("bearer")
            {
                head.key = Some(token.trim().to_string());
            }
        } else if name.eq_ignore_ascii_case("x-api-key") {
            if head.key.is_none() {
                head.key = Some(v.to_string());
            }
        } else if name.eq_ignore_ascii_case("connection") {
            if has_token(v, "close") {
                head.keep_alive = false;
            }
        } else if name.eq_ignore_ascii_case("expect") && v.eq_ignore_ascii_case("100-continue") {
            head.expect_continue = http11;
        }
    }
    let body_len = length.unwrap_or(0);
    if body_len > max_body {
        return Err(refuse(
            413,
            11,
            format!("Body of {body_len} bytes is larger than max_query_size ({max_body} bytes)"),
        ));
    }
    head.body_len = body_len;
    Ok(Some(head))
}

/// Whether a comma-separated header value holds `token` (any case).
fn has_token(v: &str, token: &str) -> bool {
    v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The reason phrase of the statuses the API answers with.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// One answer: status line, JSON body, `Content-Length`, and `extra` header
/// lines (each ending in CRLF); `close` says `Connection: close`.
pub fn response(status: u16, extra: &str, body: &[u8], close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    let conn = if close { "Connection: close\r\n" } else { "" };
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\n{conn}{extra}\r\n",
            reason(status),
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body);
    out
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_gives_its_key_length_and_keep_alive() {
        let raw = b"POST /api/pipes_messages?dev_id=2 HTTP/1.1\r\nHost: x\r\nAuthorization: bearer s3cret\r\nContent-Length: 5\r\n\r\n{\"a\":";
        let h = parse_head(raw, 100).unwrap().unwrap();
        assert_eq!((h.method.as_str(), h.target.as_str()), ("POST", "/api/pipes_messages?dev_id=2"));
        assert_eq!(h.key.as_deref(), Some("s3cret"));
        assert_eq!((h.body_len, h.keep_alive, h.expect_continue), (5, true, false));
        assert_eq!(h.head_len, raw.len() - 5);
        let h = parse_head(b"GET / HTTP/1.0\r\nX-API-Key: k\r\nConnection: keep-alive\r\n\r\n", 100).unwrap().unwrap();
        assert_eq!((h.key.as_deref(), h.keep_alive), (Some("k"), false));
        let h = parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", 100).unwrap().unwrap();
        assert!(!h.keep_alive);
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nHost:", 100), Ok(None));
    }

    #[test]
    fn a_503_says_service_unavailable_and_a_429_too_many_requests() {
        assert_eq!(reason(503), "Service Unavailable");
        assert_eq!(reason(429), "Too Many Requests");
    }

    #[test]
    fn bounds_are_refused_with_their_status() {
        let big = b"POST / HTTP/1.1\r\nContent-Length: 101\r\nExpect: 100-continue\r\n\r\n";
        let e = parse_head(big, 100).unwrap_err();
        assert_eq!((e.status, e.code), (413, 11));
        assert!(e.message.contains("101 bytes") && e.message.contains("(100 bytes)"), "{}", e.message);
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(parse_head(long.as_bytes(), 100).unwrap_err().status, 431);
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: y\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_head(many.as_bytes(), 100).unwrap_err().status, 431);
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse_head(chunked, 100).unwrap_err().status, 411);
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 100).unwrap_err().status, 400);
        assert_eq!(parse_head(b"\x01\x02 / HTTP/1.1\r\n\r\n", 100).unwrap_err().status, 400);
    }

    #[test]
    fn an_answer_is_framed_by_its_length() {
        let r = response(404, "", b"{}", true);
        assert_eq!(
            r,
            b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 2\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{}"
        );
    }
}
