//! The HTTP API for backends against the real binary: every table and verb,
//! what reaches real WebSocket clients, errors and their statuses,
//! keep-alive and pipelining order, the body limit under attack, slow
//! requests, the bad-key throttle, and the same API through curl, Python
//! (urllib, and `examples/http-python`) and the port claim.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BACKENDS, Client, Server, eventually};
use serde_json::{Value, json};

const KEY: &str = "api-pw";

fn start(io: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--io", io, "--shards", "2", "--password", KEY];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn api(s: &Server) -> SocketAddr {
    s.api.expect("the HTTP API listens")
}

/// One keep-alive HTTP/1.1 connection to the API.
struct Http {
    r: BufReader<TcpStream>,
}

/// An answer: status, headers (lower-case names), body as JSON.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn code(&self) -> i64 {
        self.body["error"]["code"].as_i64().unwrap_or_else(|| panic!("no error code: {self:?}"))
    }
}

fn request_bytes(method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: comet\r\n");
    if let Some(k) = key {
        r.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(b) = body {
        r.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len()));
    } else {
        r.push_str("\r\n");
    }
    r.into_bytes()
}

impl Http {
    fn connect(addr: SocketAddr) -> Http {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Http { r: BufReader::new(s) }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.r.get_mut().write_all(bytes).unwrap();
    }

    /// Reads one answer.
    fn read(&mut self) -> Answer {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        let status: u16 = line.split(' ').nth(1).unwrap_or_else(|| panic!("status line {line:?}")).parse().unwrap();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.r.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap();
            headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
        }
        let len: usize = headers.iter().find(|(k, _)| k == "content-length").map_or(0, |(_, v)| v.parse().unwrap());
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).unwrap();
        let body = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap() };
        Answer { status, headers, body }
    }

    fn call(&mut self, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> Answer {
        self.send(&request_bytes(method, path, key, body));
        self.read()
    }

    fn get(&mut self, path: &str) -> Answer {
        self.call("GET", path, Some(KEY), None)
    }

    fn post(&mut self, path: &str, body: Value) -> Answer {
        self.call("POST", path, Some(KEY), Some(&body.to_string()))
    }

    fn delete(&mut self, path: &str) -> Answer {
        self.call("DELETE", path, Some(KEY), None)
    }

    /// Whether the server closed the connection (EOF or reset) within 10 s.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0) | Err(_))
    }
}

fn ok(a: &Answer) -> &Value {
    assert_eq!(a.status, 200, "{a:?}");
    &a.body
}

fn rows(a: &Answer) -> Vec<Value> {
    ok(a)["rows"].as_array().unwrap_or_else(|| panic!("no rows: {a:?}")).clone()
}

#[test]
fn a_post_to_pipes_messages_reaches_a_websocket_subscriber_and_history_answers() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut h = Http::connect(api(&s));
        let mut subs: Vec<Client> = (0..3).map(|i| s.client(&format!("u{i}"))).collect();
        for c in &mut subs {
            c.subscribe(&["news_http"]);
        }
        assert!(eventually(5, || rows(&h.get("/api/pipes?name=news_http"))[0]["users"] == 3), "{io}");
        assert_eq!(
            ok(&h.post("/api/pipes_settings", json!({"name": "news_http", "length": 10}))),
            &json!({"affected": 1})
        );
        // A message that is a JSON object goes out as its JSON text, as
        // CometQL publishes VALUES ('news_http', 'update', '{"a":1}').
        let a = h.post("/api/pipes_messages", json!({"name": "news_http", "event": "update", "message": {"a": 1}}));
        assert_eq!(ok(&a), &json!({"affected": 3}), "{io}");
        for c in &mut subs {
            let m = c.recv();
            assert_eq!(
                (m["pipe"].as_str(), m["event"].as_str(), m["data"].as_str()),
                (Some("news_http"), Some("update"), Some(r#"{"a":1}"#)),
                "{io}"
            );
        }
        // An array publishes in order; a string is the text itself.
        let batch = json!([{"name": "news_http", "event": "e", "message": "one"}, {"name": "news_http", "event": "e", "message": "two"}]);
        assert_eq!(ok(&h.post("/api/pipes_messages", batch))["affected"], 6);
        for c in &mut subs {
            assert_eq!(c.recv()["data"], "one");
            assert_eq!(c.recv()["data"], "two");
        }
        let history = rows(&h.get("/api/pipes_messages?name=news_http"));
        let texts: Vec<&str> = history.iter().map(|r| r["message"].as_str().unwrap()).collect();
        assert_eq!(texts, [r#"{"a":1}"#, "one", "two"], "{io}");
        assert!(history[0]["id"].is_u64() && history[0]["time"].is_i64() && history[0]["user_id"].is_null());
        assert_eq!(rows(&h.get("/api/pipes_messages?name=news_http&limit=1&offset=2"))[0]["message"], "two");
        let who = rows(&h.get("/api/users_in_pipes?name=news_http"));
        assert_eq!(who.len(), 3);
        assert_eq!(who[0]["user_id"], 0);
        assert_eq!(
            rows(&h.get("/api/pipes_settings?name=news_http")),
            vec![json!({"name": "news_http", "length": 10})]
        );
        assert_eq!(ok(&h.delete("/api/pipes_messages?name=news_http"))["affected"], 3);
        assert!(rows(&h.get("/api/pipes_messages?name=news_http")).is_empty());
        assert_eq!(ok(&h.delete("/api/pipes_settings?name=news_http"))["affected"], 1);
        assert!(rows(&h.get("/api/pipes_settings")).is_empty(), "{io}");
    }
}

#[test]
fn a_post_to_users_messages_reaches_the_authorized_user_and_the_user_tables_work() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut h = Http::connect(api(&s));
        assert_eq!(
            ok(&h.post("/api/users_auth", json!({"id": 42, "hash": "k42"}))),
            &json!({"affected": 1, "last_insert_id": 42})
        );
        assert_eq!(rows(&h.get("/api/users_auth?id=42")), vec![json!({"id": 42, "hash": "k42"})]);
        // Queued while offline, delivered when the user connects.
        assert_eq!(
            ok(&h.post("/api/users_messages", json!({"id": 42, "event": "hello", "message": "queued"})))["affected"],
            1
        );
        assert_eq!(rows(&h.get("/api/users_messages?id=42"))[0]["message"], "queued");
        let mut user = Client::connect(&s.url("sesion=k42&myid=42&devid=0&v=4.08&uuid=u42&api=js"));
        assert_eq!(user.recv()["authorized"], true, "{io}");
        let q = user.recv();
        assert_eq!((q["data"].as_str(), q["fromQueue"].as_bool()), (Some("queued"), Some(true)), "{io}");
        let a = h.post("/api/users_messages", json!({"id": 42, "event": "hello", "message": {"text": "live"}}));
        assert_eq!(ok(&a), &json!({"affected": 1, "last_insert_id": 42}));
        let m = user.recv();
        assert_eq!(
            (m["pipe"].as_str(), m["event"].as_str(), m["data"].as_str()),
            (Some("msg"), Some("hello"), Some(r#"{"text":"live"}"#)),
            "{io}"
        );
        assert_eq!(rows(&h.get("/api/users_time?id=42")), vec![json!({"id": 42, "time": 0})]);
        assert_eq!(rows(&h.get("/api/users_time?id=43")), vec![json!({"id": 43, "time": -1})]);
        assert_eq!(ok(&h.post("/api/users_data", json!({"id": 42, "data": "profile"})))["affected"], 1);
        assert_eq!(rows(&h.get("/api/users_data?id=42")), vec![json!({"id": 42, "data": "profile"})]);
        assert_eq!(ok(&h.delete("/api/users_data?id=42"))["affected"], 1);
        assert_eq!(ok(&h.post("/api/users_messages", json!({"id": 7, "event": "e", "message": "x"})))["affected"], 1);
        assert!(ok(&h.delete("/api/users_messages?id=7"))["affected"].is_u64());
        assert!(rows(&h.get("/api/users_messages?id=7")).is_empty(), "{io}");
        assert_eq!(ok(&h.post("/api/revoked_tokens", json!({"token": "a.b.c"})))["affected"], 1);
        assert_eq!(rows(&h.get("/api/revoked_tokens")), vec![json!({"token": "a.b.c"})]);
        assert!(ok(&h.delete("/api/revoked_tokens?token=a.b.c"))["affected"].is_u64());
        assert!(rows(&h.get("/api/revoked_tokens")).is_empty(), "{io}");
        // Deleting the key closes the user's devices, as through CometQL.
        assert_eq!(ok(&h.delete("/api/users_auth?id=42"))["affected"], 1);
        assert_eq!(user.expect_close(), 4001, "{io}");
    }
}

#[test]
fn errors_carry_the_cometql_code_and_their_http_status() {
    let s = start("epoll", &[]);
    let mut h = Http::connect(api(&s));
    let cases: Vec<(Answer, u16, i64)> = vec![
        (h.call("GET", "/api/pipes?name=abc", None, None), 401, 16),
        (h.call("GET", "/api/pipes?name=abc", Some("wrong"), None), 401, 16),
        (h.call("POST", "/api/pipes_messages", Some(KEY), Some("{not json")), 400, 3),
        (h.call("POST", "/api/pipes_messages", Some(KEY), Some("[1, 2]")), 400, 3),
        (h.get("/api/no_such_table?name=abc"), 404, 15),
        (h.get("/elsewhere"), 404, 15),
        (h.call("PUT", "/api/pipes", Some(KEY), Some("{}")), 405, 2),
        (h.post("/api/pipes_messages", json!({"name": "a b", "event": "e", "message": "m"})), 422, 12),
        (h.post("/api/pipes", json!({"name": "abc", "users": 1})), 422, 10),
        (h.post("/api/pipes_messages", json!({"name": "abc", "message": "m"})), 422, 12),
        (h.post("/api/pipes_messages", json!({"name": "abc", "event": "e", "message": "m", "id": 1})), 422, 14),
        (h.get("/api/pipes"), 422, 13),
        (h.get("/api/pipes?users=1"), 422, 13),
        (h.delete("/api/pipes?name=abc"), 422, 10),
        (h.post("/api/users_auth", json!({"id": -1, "hash": "h"})), 422, 12),
    ];
    for (a, status, code) in &cases {
        assert_eq!((a.status, a.code()), (*status, *code), "{a:?}");
        assert!(a.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(cases[0].0.header("www-authenticate"), Some("Bearer realm=\"comet\""));
    assert_eq!(cases[6].0.header("allow"), Some("GET, POST, DELETE"));
    // The message names the offending value, as CometQL's does.
    assert!(cases[7].0.body["error"]["message"].as_str().unwrap().contains("'a b'"));
    // None of these closed the connection.
    assert_eq!(rows(&h.get("/api/pipes?name=abc"))[0]["users"], 0);
}

#[test]
fn dev_id_picks_the_tenant_and_only_its_key_opens_it() {
    let dir = std::env::temp_dir().join(format!("comet-http-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("comet.toml");
    std::fs::write(&cfg, "[passwords]\n\"5\" = \"five-pw\"\n").unwrap();
    let s = start("epoll", &["--config", cfg.to_str().unwrap()]);
    let mut h = Http::connect(api(&s));
    let mut c5 = Client::connect(&s.url("sesion=&myid=&devid=5&v=4.08&uuid=t5&api=js"));
    c5.recv();
    c5.subscribe(&["tenant_chan"]);
    let mut c0 = s.client("t0");
    c0.subscribe(&["tenant_chan"]);
    let msg = json!({"name": "tenant_chan", "event": "e", "message": "for five"}).to_string();
    let a = h.call("POST", "/api/pipes_messages?dev_id=5", Some(KEY), Some(&msg));
    assert_eq!((a.status, a.code()), (401, 16), "dev_id 0's key does not open dev_id 5");
    let five = |h: &mut Http| h.call("GET", "/api/pipes?name=tenant_chan&dev_id=5", Some("five-pw"), None);
    assert!(eventually(5, || rows(&five(&mut h))[0]["users"] == 1));
    let a = h.call("POST", "/api/pipes_messages?dev_id=5", Some("five-pw"), Some(&msg));
    assert_eq!(ok(&a)["affected"], 1);
    assert_eq!(c5.recv()["data"], "for five");
    c0.expect_silence(300);
    // X-API-Key works as well as Bearer.
    h.send(b"GET /api/pipes?name=tenant_chan&dev_id=5 HTTP/1.1\r\nX-API-Key: five-pw\r\n\r\n");
    assert_eq!(rows(&h.read())[0]["users"], 1);
}

#[test]
fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut subscriber = s.client("p");
        subscriber.subscribe(&["pipe_order"]);
        let mut h = Http::connect(api(&s));
        assert!(eventually(5, || rows(&h.get("/api/pipes?name=pipe_order"))[0]["users"] == 1));
        // 60 requests in one write: publishes (which gather from every
        // shard), counts, and errors answered at once, interleaved.
        let mut batch = Vec::new();
        let mut expected = Vec::new();
        for i in 0..60 {
            match i % 3 {
                0 => {
                    let body = json!({"name": "pipe_order", "event": "e", "message": format!("m{i}")}).to_string();
                    batch.extend(request_bytes("POST", "/api/pipes_messages", Some(KEY), Some(&body)));
                    expected.push(json!({"affected": 1}));
                }
                1 => {
                    batch.extend(request_bytes("GET", &format!("/api/users_time?id={}", i + 1), Some(KEY), None));
                    expected.push(json!({"rows": [{"id": i + 1, "time": -1}]}));
                }
                _ => {
                    batch.extend(request_bytes("GET", &format!("/api/nope{i}"), Some(KEY), None));
                    expected.push(json!({"error": {"code": 15, "message": format!("Table 'nope{i}' doesn't exist")}}));
                }
            }
        }
        h.send(&batch);
        for (i, want) in expected.iter().enumerate() {
            let a = h.read();
            assert_eq!(&a.body, want, "{io}: answer {i}");
        }
        for i in (0..60).step_by(3) {
            assert_eq!(subscriber.recv()["data"], format!("m{i}"), "{io}");
        }
        // `Connection: close` is honoured after its answer.
        h.send(b"GET /api/pipes?name=pipe_order HTTP/1.1\r\nX-API-Key: api-pw\r\nConnection: close\r\n\r\n");
        let a = h.read();
        assert_eq!(a.header("connection"), Some("close"));
        assert!(h.closed(), "{io}");
    }
}

fn rss_kib(s: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.child.id())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn bodies_over_the_limit_get_413_and_hold_no_memory() {
    let s = start("epoll", &["--max-query-size", "65536"]);
    let addr = api(&s);
    let mut h = Http::connect(addr);
    // One body just under the limit is read and answered.
    let message = "x".repeat(60_000);
    let a = h.post("/api/pipes_messages", json!({"name": "big_one", "event": "e", "message": message}));
    assert_eq!(ok(&a)["affected"], 0);
    let before = rss_kib(&s);
    // 200 clients each announce a 64 MiB body and start sending it: each is
    // answered 413 from the head alone, and its body is never held.
    let chunk = vec![b'a'; 256 * 1024];
    let mut answered = 0;
    for _ in 0..200 {
        let mut c = Http::connect(addr);
        c.send(b"POST /api/pipes_messages HTTP/1.1\r\nX-API-Key: api-pw\r\nContent-Length: 67108864\r\n\r\n");
        let _ = c.r.get_mut().write_all(&chunk);
        let a = c.read();
        assert_eq!((a.status, a.code()), (413, 11), "{a:?}");
        assert_eq!(a.header("connection"), Some("close"));
        answered += 1;
    }
    assert_eq!(answered, 200);
    let grown = rss_kib(&s).saturating_sub(before);
    assert!(grown < 8 * 1024, "RSS grew by {grown} KiB after 200 oversized bodies");
    // The server still serves.
    let mut h = Http::connect(addr);
    assert_eq!(rows(&h.get("/api/pipes?name=big_one"))[0]["users"], 0);
}

#[test]
fn oversized_heads_and_chunked_bodies_are_refused_and_the_connection_closed() {
    let s = start("epoll", &[]);
    let huge = format!("GET /api/pipes?name={} HTTP/1.1\r\n\r\n", "a".repeat(20_000));
    let many: String = (0..40).map(|i| format!("X-Filler-{i}: y\r\n")).collect();
    let cases = [
        (huge.into_bytes(), 431, 11),
        (format!("GET /api/pipes?name=abc HTTP/1.1\r\n{many}\r\n").into_bytes(), 431, 20),
        (b"POST /api/pipes_messages HTTP/1.1\r\nX-API-Key: api-pw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(), 411, 2),
        (b"GET /api/pipes?name=abc HTTP/1.1\r\nContent-Length: x\r\n\r\n".to_vec(), 400, 3),
    ];
    for (raw, status, code) in cases {
        let mut h = Http::connect(api(&s));
        h.send(&raw);
        let a = h.read();
        assert_eq!((a.status, a.code()), (status, code), "{a:?}");
        assert_eq!(a.header("connection"), Some("close"));
        assert!(h.closed());
    }
}

#[test]
fn a_client_that_pipelines_and_never_reads_is_disconnected_at_the_answer_bound() {
    // Unread answers are bounded at max(16 x --outbound-limit, 4 x
    // --max-query-size) = 1 MiB here, as for CometQL clients.
    // Past it the connection is not read, and after --message-timeout so
    // it is disconnected.
    let s = start("epoll", &["--outbound-limit", "65536", "--max-query-size", "1024", "--message-timeout", "2"]);
    let before = rss_kib(&s);
    let mut h = Http::connect(api(&s));
    let one = request_bytes("GET", "/api/users_time?id=1", Some(KEY), None);
    let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 1000).collect();
    let started = Instant::now();
    let mut sent = 0;
    // Never read: the server's queue of answers grows until it gives up.
    h.r.get_mut().set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    while started.elapsed() < Duration::from_secs(20) {
        if h.r.get_mut().write_all(&batch).is_err() {
            break;
        }
        sent += 1000;
    }
    let mut log = Vec::new();
    assert!(
        eventually(10, || {
            log.extend(s.drain_log());
            log.iter().any(|l| l.contains("does not read its answers"))
        }),
        "after {sent} requests: {log:?}"
    );
    let grown = rss_kib(&s).saturating_sub(before);
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
    let mut other = Http::connect(api(&s));
    assert_eq!(rows(&other.get("/api/users_time?id=2"))[0]["time"], -1);
}

#[test]
fn an_unfinished_request_is_dropped_after_the_message_timeout() {
    let s = start("epoll", &["--message-timeout", "2"]);
    let mut head = Http::connect(api(&s));
    head.send(b"GET /api/pipes?name=abc HTTP/1.1\r\nX-API-");
    let mut body = Http::connect(api(&s));
    body.send(b"POST /api/pipes_messages HTTP/1.1\r\nX-API-Key: api-pw\r\nContent-Length: 100\r\n\r\n{\"name\":");
    let started = Instant::now();
    assert!(head.closed(), "a slow head is dropped");
    assert!(body.closed(), "a slow body is dropped");
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(6), "{took:?}");
    // A connection that finishes its request in time is served.
    let mut h = Http::connect(api(&s));
    h.send(b"GET /api/pipes?name=abc HTTP/1.1\r\nX-API-");
    std::thread::sleep(Duration::from_millis(500));
    h.send(b"Key: api-pw\r\n\r\n");
    assert_eq!(rows(&h.read())[0]["users"], 0);
}

#[test]
fn a_request_without_a_good_key_is_answered_before_its_body_is_held() {
    let s = start("epoll", &["--message-timeout", "30"]);
    // A wrong key and a promised megabyte: 401 at once, no 100 Continue,
    // and the connection closes; nothing waits for the body.
    let mut h = Http::connect(api(&s));
    h.send(b"POST /api/pipes_messages HTTP/1.1\r\nX-API-Key: wrong\r\nExpect: 100-continue\r\nContent-Length: 1000000\r\n\r\n{");
    let started = Instant::now();
    let a = h.read();
    assert_eq!((a.status, a.code()), (401, 16), "{a:?}");
    assert!(h.closed(), "closed after the answer");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // The right key with the body still coming: served once it arrives.
    let mut h = Http::connect(api(&s));
    let body = br#"{"name":"web_early","event":"e","message":"m"}"#;
    h.send(
        format!("POST /api/pipes_messages HTTP/1.1\r\nX-API-Key: {KEY}\r\nContent-Length: {}\r\n\r\n", body.len())
            .as_bytes(),
    );
    std::thread::sleep(Duration::from_millis(200));
    h.send(body);
    assert_eq!(ok(&h.read())["affected"], 0);
}

/// Sum of a metric over its per-shard series.
fn metric_sum(s: &Server, name: &str) -> i64 {
    let (_, body) = s.http_get("/metrics");
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && !l.contains("shard=\"all\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<i64>().unwrap())
        .sum()
}

#[test]
fn bad_keys_are_throttled_with_cometql_logins() {
    let s = start("epoll", &[]);
    let mut h = Http::connect(api(&s));
    let before = metric_sum(&s, "comet_auth_failures_total");
    for i in 0..21 {
        let a = h.call("GET", "/api/pipes?name=abc", Some(&format!("guess{i}")), None);
        assert_eq!(a.status, 401, "guess {i}");
    }
    // Blocked now: even the right key gets 429 with Retry-After.
    let a = h.get("/api/pipes?name=abc");
    assert_eq!((a.status, a.code()), (429, 1129), "{a:?}");
    assert!(a.header("retry-after").is_some_and(|v| v.parse::<u64>().is_ok_and(|n| (1..=10).contains(&n))));
    assert_eq!(metric_sum(&s, "comet_auth_failures_total") - before, 21);
    // A new connection from the address is answered so at once, without
    // taking a backend slot (nor, at the limit, anyone else's).
    let a = Http::connect(api(&s)).get("/api/pipes?name=abc");
    assert_eq!((a.status, a.code()), (429, 1129), "{a:?}");
    // The throttle is the CometQL logins' one: that address's logins fail too.
    let opts = mysql::OptsBuilder::new()
        .ip_or_hostname(Some(s.backend.ip().to_string()))
        .tcp_port(s.backend.port())
        .user(Some("root"))
        .pass(Some(KEY));
    let e = match mysql::Conn::new(opts) {
        Ok(_) => panic!("a blocked address logged in"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("1129"), "{e}");
    let mut log = Vec::new();
    assert!(
        eventually(5, || {
            log.extend(s.drain_log());
            log.iter().any(|l| l.contains("blocked for 10 s"))
        }),
        "the block is logged: {log:?}"
    );
}

#[test]
fn curl_publishes_selects_and_deletes_over_one_connection() {
    let s = start("epoll", &[]);
    let base = format!("http://{}", api(&s));
    let mut sub = s.client("curl");
    sub.subscribe(&["curl_chan"]);
    let curl = |args: &[&str]| {
        let out =
            Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("curl is installed");
        assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let key = format!("Authorization: Bearer {KEY}");
    let pipes = format!("{base}/api/pipes?name=curl_chan");
    assert!(eventually(5, || curl(&["-H", &key, &pipes]).0.contains("\"users\":1")));
    let (out, _) = curl(&[
        "-H",
        &key,
        "-H",
        "Content-Type: application/json",
        "--data",
        r#"{"name":"curl_chan","event":"ev","message":{"from":"curl"}}"#,
        &format!("{base}/api/pipes_messages"),
    ]);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!({"affected": 1}));
    assert_eq!(sub.recv()["data"], r#"{"from":"curl"}"#);
    // Two URLs on one command line: curl reuses the keep-alive connection.
    let (out, err) =
        curl(&["-v", "-H", &key, &format!("{base}/api/users_time?id=1"), &format!("{base}/api/users_time?id=2")]);
    assert_eq!(out, r#"{"rows":[{"id":1,"time":-1}]}{"rows":[{"id":2,"time":-1}]}"#);
    assert!(err.contains("Re-using existing connection") || err.contains("Reusing existing"), "{err}");
    let (out, _) = curl(&["-X", "DELETE", "-H", &format!("X-API-Key: {KEY}"), &format!("{base}/api/users_auth?id=9")]);
    assert_eq!(out, r#"{"affected":0}"#);
    let (code, _) = curl(&["-o", "/dev/null", "-w", "%{http_code}", &pipes]);
    assert_eq!(code, "401");
    // A body over the limit: curl sends `Expect: 100-continue` and gets 413.
    let big = std::env::temp_dir().join(format!("comet-big-{}.json", std::process::id()));
    std::fs::write(&big, vec![b' '; 2 << 20]).unwrap();
    let (code, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &key,
        "--data-binary",
        &format!("@{}", big.display()),
        &format!("{base}/api/pipes_messages"),
    ]);
    assert_eq!(code, "413");
    // A body under the limit that waits for `100 Continue` gets it, then the answer.
    let message = "y".repeat(4000);
    let body = json!({"name": "curl_chan", "event": "ev", "message": message}).to_string();
    std::fs::write(&big, body).unwrap();
    let (out, err) = curl(&[
        "-v",
        "-H",
        &key,
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", big.display()),
        &format!("{base}/api/pipes_messages"),
    ]);
    let _ = std::fs::remove_file(&big);
    assert_eq!(out, r#"{"affected":1}"#);
    assert!(err.contains("100 Continue"), "{err}");
    assert_eq!(sub.recv()["data"].as_str().map(str::len), Some(4000));
}

/// Runs `python3 script` with the server's addresses in the environment;
/// panics with its output when it fails.
fn run_python(s: &Server, script: &std::path::Path) -> String {
    let out = Command::new("python3")
        .arg(script)
        .env("COMET_API_URL", format!("http://{}", api(s)))
        .env("COMET_WS_URL", format!("ws://{}", s.addr))
        .env("COMET_API_KEY", KEY)
        .stdin(Stdio::null())
        .output()
        .expect("python3 is installed");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{} failed:\n{text}", script.display());
    text
}

#[test]
fn python_urllib_talks_to_the_api() {
    let s = start("epoll", &[]);
    let mut sub = s.client("py");
    sub.subscribe(&["py_chan"]);
    let mut h = Http::connect(api(&s));
    assert!(eventually(5, || rows(&h.get("/api/pipes?name=py_chan"))[0]["users"] == 1));
    let out = run_python(&s, &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/http_api_test.py"));
    assert!(out.contains("ok"), "{out}");
    assert_eq!(sub.recv()["data"], r#"{"from":"python","n":1}"#);
}

#[test]
fn the_python_example_authorizes_a_user_sends_a_private_message_and_publishes() {
    let s = start("epoll", &[]);
    let out = run_python(&s, &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/http-python/backend.py"));
    assert!(out.contains("private message delivered") && out.contains("channel message delivered"), "{out}");
}

#[test]
fn a_second_comet_on_the_api_port_and_a_public_api_with_the_default_password_are_refused() {
    let s = start("epoll", &[]);
    let taken = api(&s).to_string();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_comet"))
            .args(["--frontend", "127.0.0.1:0", "--backend", "127.0.0.1:0", "--shards", "1"])
            .args(args)
            .env_remove("COMET_IO")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&["--api", &taken, "--password", "x"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains(&taken) && log.contains("--api"), "{log}");
    let out = run(&["--api", "0.0.0.0:0"]);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && log.contains("refusing to bind api 0.0.0.0:0"), "{log}");
    // `--api off` serves without it.
    let off = Server::start(&["--api", "off", "--shards", "1"]);
    assert!(off.api.is_none());
}
