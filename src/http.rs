//! Plain HTTP on the frontend port (docs/protocol.md, "Plain HTTP"): health checks, CORS
//! preflight, the JavaScript client, the demo page (unless `--demo off`),
//! Prometheus metrics (unless `--metrics` gives them their own listener,
//! `metrics::serve`), and short error answers. Every answer
//! closes the connection: these are low-rate requests from load balancers,
//! scrapers and browsers' preflights, and closing keeps the connection state
//! machine simple.

use crate::config::Config;
use crate::metrics::Registry;
use crate::ws::Request;

/// A whole response that closes the connection.
pub fn response(status: &str, content_type: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nAccess-Control-Allow-Origin: *\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// `400 Bad Request` with a one-line reason.
pub fn bad_request(reason: &str) -> Vec<u8> {
    let body = format!("{reason}\n");
    response("400 Bad Request", "text/plain; charset=utf-8", "", body.as_bytes())
}

/// `403 Forbidden` with a one-line reason.
pub fn forbidden(reason: &str) -> Vec<u8> {
    let body = format!("{reason}\n");
    response("403 Forbidden", "text/plain; charset=utf-8", "", body.as_bytes())
}

/// `503 Service Unavailable` with a one-line reason.
pub fn unavailable(reason: &str) -> Vec<u8> {
    let body = format!("{reason}\n");
    response("503 Service Unavailable", "text/plain; charset=utf-8", "", body.as_bytes())
}

/// `503 Service Unavailable` with `Retry-After`: the server is full.
pub fn unavailable_retry(reason: &str, retry_after: u32) -> Vec<u8> {
    let body = format!("{reason}\n");
    let extra = format!("Retry-After: {retry_after}\r\nAccess-Control-Expose-Headers: Retry-After\r\n");
    response("503 Service Unavailable", "text/plain; charset=utf-8", &extra, body.as_bytes())
}

/// `400 Bad Request` for a plaintext client on a TLS port: it is told to
/// use https:// or wss://, then closed.
pub fn plaintext_on_tls_port() -> Vec<u8> {
    let body = b"this port speaks TLS only: use https:// or wss://\n";
    response("400 Bad Request", "text/plain; charset=utf-8", "", body)
}

/// `429 Too Many Requests` with `Retry-After`: this client holds too much.
pub fn too_many(reason: &str, retry_after: u32) -> Vec<u8> {
    let body = format!("{reason}\n");
    let extra = format!("Retry-After: {retry_after}\r\nAccess-Control-Expose-Headers: Retry-After\r\n");
    response("429 Too Many Requests", "text/plain; charset=utf-8", &extra, body.as_bytes())
}

/// Answers a request that is not a WebSocket upgrade.
pub fn route(req: &Request, registry: &Registry, config: &Config) -> Vec<u8> {
    let path = req.path.split('?').next().unwrap_or("");
    if req.method == "OPTIONS" {
        return response(
            "200 OK",
            "text/plain; charset=utf-8",
            "Access-Control-Allow-Methods: GET, POST, OPTIONS\r\nAccess-Control-Allow-Headers: *\r\nAccess-Control-Max-Age: 86400\r\n",
            b"",
        );
    }
    if req.method != "GET" && req.method != "HEAD" {
        return response(
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "Allow: GET, HEAD, OPTIONS\r\n",
            format!("method {} is not allowed here\n", req.method).as_bytes(),
        );
    }
    if path.contains("..") {
        return response("400 Bad Request", "text/plain; charset=utf-8", "", b"path must not contain '..'\n");
    }
    let mut r = match path {
        "/info" | "/comet-server/info" | "//comet-server/info" => {
            let mut body = Vec::with_capacity(64);
            match registry.redis.as_deref().filter(|r| !r.is_up()) {
                // A load balancer takes a node that lost Redis out: its
                // clients would miss what other nodes publish.
                Some(r) => {
                    crate::frontend::message::Obj::new(&mut body)
                        .str("node", &config.node_name)
                        .str("reason", &r.reason())
                        .str("status", "redis down")
                        .end();
                    response("503 Service Unavailable", "application/json", "Cache-Control: no-store\r\n", &body)
                }
                None => {
                    crate::frontend::message::Obj::new(&mut body)
                        .str("node", &config.node_name)
                        .str("status", "ok")
                        .end();
                    response("200 OK", "application/json", "Cache-Control: no-store\r\n", &body)
                }
            }
        }
        "/comet.js" | "/comet-server/comet.js" => {
            asset(req, "application/javascript; charset=utf-8", COMET_JS.as_bytes())
        }
        "/comet.d.ts" => asset(req, "application/typescript; charset=utf-8", COMET_DTS.as_bytes()),
        "/" | "/index.html" if config.demo => asset(req, "text/html; charset=utf-8", demo_page(config).as_bytes()),
        "/metrics" if config.metrics.is_none() => metrics_response(registry),
        _ => response(
            "404 Not Found",
            "text/plain; charset=utf-8",
            "",
            format!("no such path: {}\n", clip(path)).as_bytes(),
        ),
    };
    if req.method == "HEAD"
        && let Some(end) = r.windows(4).position(|w| w == b"\r\n\r\n")
    {
        r.truncate(end + 4);
    }
    r
}

/// `/metrics`' answer: the Prometheus text exposition.
pub fn metrics_response(registry: &Registry) -> Vec<u8> {
    response(
        "200 OK",
        "text/plain; version=0.0.4; charset=utf-8",
        "Cache-Control: no-store\r\n",
        registry.render().as_bytes(),
    )
}

/// The JavaScript client, embedded in the binary.
pub const COMET_JS: &str = include_str!("../static/comet.js");
/// Its TypeScript definitions.
pub const COMET_DTS: &str = include_str!("../static/comet.d.ts");
/// The demo page; `{{...}}` placeholders are filled from the configuration.
pub const DEMO_HTML: &str = include_str!("../static/index.html");

/// The demo page with this server's backend address in its `mysql` lines.
fn demo_page(config: &Config) -> String {
    let host =
        if config.backend.ip().is_unspecified() { "127.0.0.1".to_string() } else { config.backend.ip().to_string() };
    // Only the well-known default password is shown; a real one never is.
    let pw =
        if config.password == crate::config::DEFAULT_PASSWORD { config.password.as_str() } else { "YOUR_PASSWORD" };
    DEMO_HTML
        .replace("{{BACKEND_HOST}}", &host)
        .replace("{{BACKEND_PORT}}", &config.backend.port().to_string())
        .replace("{{PASSWORD_HINT}}", pw)
}

/// A strong ETag: FNV-1a of the bytes.
fn etag(body: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}\"")
}

/// A static asset with its ETag; `304 Not Modified` when the client has it.
fn asset(req: &Request, content_type: &str, body: &[u8]) -> Vec<u8> {
    let tag = etag(body);
    let headers = format!("ETag: {tag}\r\nCache-Control: public, max-age=300\r\n");
    if req.if_none_match.as_deref().is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*")) {
        return format!("HTTP/1.1 304 Not Modified\r\n{headers}Connection: close\r\n\r\n").into_bytes();
    }
    response("200 OK", content_type, &headers, body)
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(100) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
