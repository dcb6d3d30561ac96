//! The comet frontend protocol for anonymous connections, against the real
//! server on both I/O backends.

mod common;

use common::{BACKENDS, Client, Raw, Server, eventually, http_request};
use std::time::Duration;

/// Waits until `c` sees `n` subscribers on `pipe` (subscriptions are not
/// acknowledged, and other connections may live on the other shard).
fn wait_count(c: &mut Client, pipe: &str, n: u64) {
    let ok = eventually(5, || {
        c.send(&format!("pipe_count\n{pipe}\nm\n"));
        c.recv()["data"]["user_in_pipe"] == n
    });
    assert!(ok, "{pipe} never reached {n} subscribers");
}

fn start(io: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--io", io, "--shards", "2"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn server_info_is_the_first_frame_and_is_byte_exact() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut c = Client::connect(&s.url("sesion=&myid=undefined&devid=0&v=4.08&uuid=abc&api=js"));
        let text = c.recv_text();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let expected = format!(
            r#"{{"authorized":false,"data":"","event":"serverInfo","message_send_time":{},"pipe":"sys","server":"comet {}"}}"#,
            v["message_send_time"],
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(text, expected, "{io}");
    }
}

#[test]
fn missing_api_version_gets_error_418_then_close_4418() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut c = Client::connect(&s.url("sesion=&myid=&devid=0&uuid=x"));
        assert_eq!(c.recv()["event"], "serverInfo");
        let e = c.recv();
        assert_eq!(e["data"]["error_code"], 418, "{io}: {e}");
        assert_eq!(e["pipe"], "sys");
        assert_eq!(c.expect_close(), 4418, "{io}");
    }
}

#[test]
fn web_pipe_reaches_others_not_the_sender_and_reports_the_count() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut a = s.client("aaa");
        let mut b = s.client("bbb");
        let mut c = s.client("ccc");
        for x in [&mut a, &mut b, &mut c] {
            x.subscribe(&["web_chat"]);
        }
        // Subscriptions have no acknowledgement: wait until all three count.
        wait_count(&mut a, "web_chat", 3);
        a.send("web_pipe2\nweb_chat\nnewMessage\n*\n{\"text\":\"hi\\nthere\"}");
        for x in [&mut b, &mut c] {
            let m = x.recv_text();
            let v: serde_json::Value = serde_json::from_str(&m).unwrap();
            assert_eq!(
                m,
                format!(
                    r#"{{"data":"{{\"text\":\"hi\\nthere\"}}","event":"newMessage","message_send_time":{},"pipe":"web_chat","user_id":0}}"#,
                    v["message_send_time"]
                ),
                "{io}"
            );
        }
        let report = a.recv();
        assert_eq!(report["pipe"], "_answer_to_web_chat", "{io}: {report}");
        assert_eq!(report["data"]["number_messages"], 2);
        assert_eq!(report["data"]["message"], "{\"text\":\"hi\\nthere\"}");
        a.expect_silence(200);
    }
}

#[test]
fn hidden_sender_and_channel_kind_rules() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut a = s.client("a");
        let mut b = s.client("b");
        b.subscribe(&["web_x"]);
        wait_count(&mut a, "web_x", 1);
        a.send("web_pipe2\n@web_x\nev\n*\nhello");
        let m = b.recv();
        assert_eq!((m["pipe"].as_str(), m["user_id"].as_i64()), (Some("web_x"), Some(0)), "{io}");
        a.recv(); // delivery report
        a.send("web_pipe2\nwebauth_x\nev\n*\nhello");
        assert!(a.recv()["data"]["error"].as_str().unwrap().contains("authorized"), "{io}");
        a.send("web_pipe2\nnews\nev\n*\nhello");
        assert_eq!(a.recv()["data"]["error"], "Invalid channel name. The channel should begin with web_", "{io}");
        a.send("pipe_count\nnews\nm\n");
        assert_eq!(a.recv()["event"], "error");
        a.send("track_pipe_users\nweb_x\nm\n");
        assert_eq!(a.recv()["event"], "error");
    }
}

#[test]
fn presence_events_and_no_spurious_pair_on_resubscribe() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut a = s.client("watcher");
        a.subscribe(&["track_room"]);
        // An answer on a's own connection means its subscription is in
        // place (commands of one connection run in order); only then may
        // b's join, which comes as mail from b's shard, expect to reach it.
        a.send("track_pipe_users\ntrack_room\nm0\n");
        assert_eq!(a.recv()["marker"], "m0", "{io}");
        let mut b = s.client("q1W2e3");
        b.subscribe(&["track_room", "web_other"]);
        let ev = a.recv();
        assert_eq!(ev["event"], "subscription", "{io}: {ev}");
        assert_eq!(ev["data"], serde_json::json!({"user_id": 0, "uuid": "q1W2e3"}));
        assert_eq!(ev["pipe"], "track_room");
        // Re-subscribing while keeping track_room changes nothing for `a`.
        b.subscribe(&["web_third", "track_room"]);
        a.send("track_pipe_users\ntrack_room\nmk\n");
        let list = a.recv();
        assert_eq!(list["pipe"], "_answer", "{io}: {list}");
        assert_eq!(list["marker"], "mk");
        let mut members: Vec<String> =
            list["data"].as_array().unwrap().iter().map(|m| m["uuid"].as_str().unwrap().to_string()).collect();
        members.sort();
        assert_eq!(members, ["q1W2e3", "watcher"]);
        drop(b);
        let ev = a.recv();
        assert_eq!(ev["event"], "unsubscription", "{io}: {ev}");
        assert_eq!(ev["data"]["uuid"], "q1W2e3");
    }
}

#[test]
fn subscription_limits_names_and_reserved_channels() {
    for io in BACKENDS {
        let s = start(io, &["--max-subscriptions", "3"]);
        let mut a = s.client("a");
        a.subscribe(&["web_1", "web_2", "web_3", "web_4", "x", "sys", "_answer_pipe_count", "private_p"]);
        let mut errors = Vec::new();
        for _ in 0..4 {
            errors.push(a.recv()["data"]["error"].as_str().unwrap().to_string());
        }
        errors.sort();
        assert!(errors.iter().any(|e| e.contains("'x'")), "{io}: {errors:?}");
        assert!(errors.iter().any(|e| e.contains("'sys'")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("'_answer_pipe_count'")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("at most 3")), "{errors:?}");
        a.send("pipe_count\nweb_4\nm\n");
        assert_eq!(a.recv()["data"]["user_in_pipe"], 0, "the 4th channel was dropped");
        a.send("pipe_count\nweb_3\nm\n");
        assert_eq!(a.recv()["data"]["user_in_pipe"], 1);
    }
}

#[test]
fn unknown_command_gets_error_and_connection_stays() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut a = s.client("a");
        a.send("frobnicate\nx");
        let e = a.recv();
        assert_eq!(e["event"], "error");
        assert_eq!(e["data"]["error"], "Unknown command 'frobnicate'", "{io}");
        a.send("statistics\n{}");
        a.subscribe(&["web_ok"]);
        a.send("pipe_count\nweb_ok\nm\n");
        assert_eq!(a.recv()["data"]["user_in_pipe"], 1);
    }
}

#[test]
fn fanout_reaches_subscribers_on_every_shard() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut subs: Vec<Client> = (0..40).map(|i| s.client(&format!("u{i}"))).collect();
        for c in &mut subs {
            c.subscribe(&["web_big"]);
        }
        assert!(
            s.metric("comet_websockets{shard=\"0\"}") > 0 && s.metric("comet_websockets{shard=\"1\"}") > 0,
            "{io}: both shards must hold subscribers for this test"
        );
        let mut p = s.client("pub");
        wait_count(&mut p, "web_big", 40);
        p.send("web_pipe2\nweb_big\ne\n*\npayload");
        for c in &mut subs {
            assert_eq!(c.recv()["data"], "payload", "{io}");
        }
        assert_eq!(p.recv()["data"]["number_messages"], 40, "{io}");
    }
}

#[test]
fn ping_gets_pong_and_close_is_echoed() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut r = Raw::open(s.addr, "/ws/v=4&uuid=r");
        assert_eq!(r.frame().0, 1); // serverInfo
        r.send_frame(0x89, b"hey", true);
        assert_eq!(r.frame(), (0xA, b"hey".to_vec()), "{io}");
        r.send_frame(0x88, &3001u16.to_be_bytes(), true);
        assert_eq!(r.close_code(), 3001, "{io}");
    }
}

#[test]
fn protocol_violations_get_their_close_codes() {
    for io in BACKENDS {
        let s = start(io, &["--max-message-size", "1000"]);
        let mut r = Raw::open(s.addr, "/ws/v=4");
        r.frame();
        r.send_frame(0x81, b"subscription\nweb_a", false);
        assert_eq!(r.close_code(), 1002, "{io}: unmasked");
        let mut r = Raw::open(s.addr, "/ws/v=4");
        r.frame();
        r.send_frame(0x81, &[b'a'; 1001], true);
        assert_eq!(r.close_code(), 1009, "{io}: too big");
        let mut r = Raw::open(s.addr, "/ws/v=4");
        r.frame();
        r.send_frame(0x81, &[0xff, 0xfe], true);
        assert_eq!(r.close_code(), 1007, "{io}: bad utf-8");
        // Fragmented command with a ping in between still works.
        let mut r = Raw::open(s.addr, "/ws/v=4");
        r.frame();
        r.send_frame(0x01, b"frob", true);
        r.send_frame(0x89, b"", true);
        r.send_frame(0x80, b"nicate", true);
        assert_eq!(r.frame().0, 0xA);
        let (op, p) = r.frame();
        assert_eq!(op, 1);
        assert!(String::from_utf8_lossy(&p).contains("Unknown command 'frobnicate'"), "{io}");
        // The server survived all of it.
        assert_eq!(s.http_get("/info").0, "HTTP/1.1 200 OK");
    }
}

#[test]
fn heartbeat_pings_silent_clients_and_closes_dead_ones() {
    for io in BACKENDS {
        let s = start(io, &["--ping-interval", "1", "--ping-timeout", "1"]);
        let mut r = Raw::open(s.addr, "/ws/v=4");
        r.frame();
        r.s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let (op, _) = r.frame();
        assert_eq!(op, 0x9, "{io}: expected a ping");
        assert_eq!(r.close_code(), 4000, "{io}: unanswered ping closes");
        assert!(eventually(5, || s.metric("comet_heartbeat_closes_total") == 1));
    }
}

#[test]
fn slow_consumer_is_closed_with_4008_and_others_keep_receiving() {
    for io in BACKENDS {
        let s = Server::start(&[
            "--io",
            io,
            "--outbound-limit",
            "65536",
            "--shards",
            "1",
            "--client-rate",
            "100000",
            "--channel-rate",
            "0",
        ]);
        let mut slow = Raw::open(s.addr, "/ws/v=4&uuid=slow");
        slow.frame();
        slow.send_frame(0x81, b"subscription\nweb_flood", true);
        // Keep the slow client's receive buffer small so the server backs up.
        let mut fast = s.client("fast");
        fast.subscribe(&["web_flood"]);
        let mut p = s.client("pub");
        wait_count(&mut p, "web_flood", 2);
        let big = "x".repeat(16 * 1024);
        let mut closed = false;
        for i in 0..2000 {
            p.send(&format!("web_pipe2\nweb_flood\ne\n*\n{i}{big}"));
            p.recv(); // report
            assert!(fast.recv()["data"].as_str().unwrap().starts_with(&i.to_string()), "{io}");
            if s.metric("comet_slow_consumer_closes_total") == 1 {
                closed = true;
                break;
            }
        }
        assert!(closed, "{io}: the slow consumer was never closed");
        // The slow client eventually reads a 4008 close (after what it had).
        slow.s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(slow.close_code(), 4008, "{io}");
    }
}

/// A debug build on `shards` shards whose environment variable `var` (a
/// panic hook of the debug build, `shard::panic_on_test_marker`) is
/// `marker`.
fn start_with_panic_marker(io: &str, shards: u8, var: &str, marker: &str) -> Server {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_comet"));
    cmd.args(["--frontend", "127.0.0.1:0", "--backend", "127.0.0.1:0", "--api", "127.0.0.1:0"])
        .args(["--io", io, "--shards", &shards.to_string(), "--ephemeral", "--password", "pw"])
        .env(var, marker);
    Server::spawn_cmd(cmd)
}

/// A bug in the handling of one connection's input (a panic, asked for
/// here with the debug build's COMET_TEST_PANIC_ON marker) closes that
/// connection at once, with 1011 for a WebSocket, and counts it; the
/// other connections, on the same shard, go on.
#[test]
fn a_panic_handling_one_connection_closes_it_alone() {
    for io in BACKENDS {
        let s = start_with_panic_marker(io, 1, "COMET_TEST_PANIC_ON", "panic-marker");
        let mut sub = s.client("sub");
        sub.subscribe(&["web_x"]);
        let mut bad = s.client("bad");
        bad.subscribe(&["web_x"]);
        let mut p = s.client("pub");
        wait_count(&mut p, "web_x", 2);
        bad.send("panic-marker");
        assert_eq!(bad.expect_close(), 1011, "{io}");
        assert_eq!(s.metric("comet_handler_panics_total"), 1, "{io}");
        // Its subscription went with it; the subscriber and the publisher,
        // on the same shard, go on.
        wait_count(&mut p, "web_x", 1);
        p.send("web_pipe2\nweb_x\ne\n*\nafter");
        p.recv();
        assert_eq!(sub.recv()["data"], "after", "{io}");
        // Plain HTTP and CometQL connections are dropped.
        let (status, _) = http_request(s.addr, "GET /panic-marker HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status, "", "{io}: an HTTP request that panicked gets no answer");
        let (mut t, ok) = common::raw_login(&s, "pw");
        assert_eq!(ok[0], 0, "{io}");
        let q = b"\x03SELECT 'panic-marker'";
        let mut packet = vec![q.len() as u8, 0, 0, 0];
        packet.extend_from_slice(q);
        std::io::Write::write_all(&mut t, &packet).unwrap();
        let mut rest = Vec::new();
        let read = std::io::Read::read_to_end(&mut t, &mut rest);
        assert!(read.is_ok() && rest.is_empty(), "{io}: {read:?} {rest:?}");
        assert_eq!(s.metric("comet_handler_panics_total"), 3, "{io}");
        let (_, ok) = common::raw_login(&s, "pw");
        assert_eq!(ok[0], 0, "{io}: a new CometQL connection logs in");
        let mut again = s.client("again");
        again.subscribe(&["web_x"]);
        wait_count(&mut p, "web_x", 2);
    }
}

/// A panic while the user's home shard takes over a connection handed
/// from the shard that accepted it (asked for with the debug build's
/// COMET_TEST_PANIC_ON_ADOPT marker in the request head) drops that
/// connection alone and counts it; the home shard goes on serving.
#[test]
fn a_panic_taking_over_a_handed_off_connection_drops_it_alone() {
    for io in BACKENDS {
        let s = start_with_panic_marker(io, 2, "COMET_TEST_PANIC_ON_ADOPT", "adopt-marker");
        let user_url = |uid: u64, uuid: &str| s.url(&format!("sesion=k&myid={uid}&devid=0&v=4.08&uuid={uuid}"));
        let mut clients = Vec::new();
        let mut dropped = Vec::new();
        // Each connection lands on either shard: those the other shard
        // accepted are handed to the user's home shard, and panic there.
        for uid in 1..=12 {
            match tungstenite::connect(user_url(uid, &format!("adopt-marker{uid}"))) {
                Ok((ws, _)) => clients.push(Client::from_ws(ws)),
                Err(_) => dropped.push(uid),
            }
        }
        assert!(!dropped.is_empty(), "{io}: no connection was handed off");
        assert_eq!(s.metric("comet_handler_panics_total"), dropped.len() as i64, "{io}");
        assert_eq!(s.metric("comet_handoffs_total"), dropped.len() as i64, "{io}");
        // Both shards go on: the users whose connection panicked connect
        // again, and everyone gets a publish.
        for &uid in &dropped {
            clients.push(Client::connect(&user_url(uid, &format!("again{uid}"))));
        }
        for c in &mut clients {
            assert_eq!(c.recv()["event"], "serverInfo", "{io}");
            c.subscribe(&["web_home"]);
        }
        let mut p = s.client("p");
        wait_count(&mut p, "web_home", 12);
        p.send("web_pipe2\nweb_home\ne\n*\nx");
        for c in &mut clients {
            assert_eq!(c.recv()["data"], "x", "{io}");
        }
    }
}

#[test]
fn plain_http_routes() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let (status, body) = s.http_get("/info");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(body, r#"{"node":"test-node","status":"ok"}"#);
        assert_eq!(s.http_get("/comet-server/info").0, "HTTP/1.1 200 OK");
        assert_eq!(s.http_get("/nope").0, "HTTP/1.1 404 Not Found");
        let (status, _) = http_request(s.addr, "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        let want = if io == "uring" { "io_uring" } else { "epoll" };
        let (_, metrics) = s.http_get("/metrics");
        assert!(metrics.contains(&format!("io_backend=\"{want}\"")), "{metrics}");
        assert!(metrics.contains("comet_bytes_out_total{shard=\"0\"}"));
        // A broken upgrade gets a 400 with a reason.
        let (status, body) = http_request(
            s.addr,
            "GET /ws/v=4 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        assert_eq!(body, "missing or invalid Sec-WebSocket-Key\n");
        let (status, _) = http_request(s.addr, "\x16\x03\x01garbage\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
    }
}

#[test]
fn connections_naming_a_user_move_to_the_users_home_shard() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut clients = Vec::new();
        for uid in 1..=12 {
            let mut c = Client::connect(&s.url(&format!("sesion=k&myid={uid}&devid=0&v=4.08&uuid=u{uid}")));
            assert_eq!(c.recv()["event"], "serverInfo", "{io}");
            c.subscribe(&["web_home"]);
            clients.push(c);
        }
        assert!(s.metric("comet_handoffs_total") > 0, "{io}: no connection was handed off");
        // 12 user connections (+ the metric requests themselves): a hand-off
        // is not a second accept.
        let accepted = s.metric("comet_connections_accepted_total");
        assert!((12..=16).contains(&accepted), "{io}: accepted {accepted}");
        let mut p = s.client("p");
        wait_count(&mut p, "web_home", 12);
        p.send("web_pipe2\nweb_home\ne\n*\nx");
        for c in &mut clients {
            assert_eq!(c.recv()["data"], "x", "{io}");
        }
    }
}

#[test]
fn sigterm_closes_websockets_with_1001_and_exits() {
    for io in BACKENDS {
        let mut s = start(io, &["--shutdown-timeout", "5"]);
        let mut a = s.client("a");
        s.sigterm();
        assert_eq!(a.expect_close(), 1001, "{io}");
        drop(a);
        let t = std::time::Instant::now();
        let status = loop {
            if let Some(st) = s.child.try_wait().unwrap() {
                break st;
            }
            assert!(t.elapsed() < Duration::from_secs(8), "{io}: did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{io}: {status:?}");
    }
}

#[test]
fn auto_falls_back_to_epoll_when_seccomp_forbids_io_uring() {
    let s = Server::start_with(&["--io", "auto", "--shards", "2"], Some(()));
    let log = s.drain_log();
    let (_, metrics) = s.http_get("/metrics");
    assert!(metrics.contains("io_backend=\"epoll\""), "{metrics}");
    let mut a = s.client("a");
    let mut b = s.client("b");
    b.subscribe(&["web_f"]);
    wait_count(&mut a, "web_f", 1);
    a.send("web_pipe2\nweb_f\ne\n*\nstill works");
    assert_eq!(b.recv()["data"], "still works");
    drop(log);
}

#[test]
fn uring_refuses_to_start_when_io_uring_is_forbidden() {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_comet"));
    cmd.args(["--io", "uring", "--frontend", "127.0.0.1:0", "--backend", "127.0.0.1:0", "--api", "off", "--ephemeral"]);
    common::forbid_io_uring(&mut cmd);
    let out = cmd.output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("io_uring is not usable here") && err.contains("Operation not permitted"), "{err}");
}

/// Opens a WebSocket by hand with extra headers; returns the status line.
fn upgrade_with(s: &Server, extra_headers: &str) -> (String, std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut t = std::net::TcpStream::connect(s.addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        t,
        "GET /ws/v=4&uuid=hdr HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && t.read(&mut b).unwrap_or(0) == 1 {
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    (text.lines().next().unwrap_or("").to_string(), t)
}

#[test]
fn origin_allow_list_refuses_other_origins_with_403() {
    let s = Server::start(&["--allowed-origins", "https://good.example,https://also.example/"]);
    let (status, mut t) = upgrade_with(&s, "Origin: https://evil.example\r\n");
    assert_eq!(status, "HTTP/1.1 403 Forbidden");
    let mut body = String::new();
    use std::io::Read;
    let _ = t.read_to_string(&mut body);
    assert_eq!(body, "origin 'https://evil.example' is not allowed to connect\n");
    assert_eq!(upgrade_with(&s, "Origin: https://good.example\r\n").0, "HTTP/1.1 101 Switching Protocols");
    assert_eq!(upgrade_with(&s, "Origin: https://also.example\r\n").0, "HTTP/1.1 101 Switching Protocols");
    // Non-browser clients send no Origin: not a cross-site page, allowed.
    assert_eq!(upgrade_with(&s, "").0, "HTTP/1.1 101 Switching Protocols");
}

#[test]
fn x_forwarded_for_counts_only_from_a_trusted_proxy() {
    use mysql::prelude::Queryable;
    for (trusted, want) in [(true, "203.0.113.7"), (false, "127.0.0.1")] {
        let mut args = vec!["--password", "pw"];
        if trusted {
            args.extend(["--trusted-proxies", "127.0.0.1,::1"]);
        }
        let s = Server::start(&args);
        let (status, mut t) = upgrade_with(&s, "X-Forwarded-For: 203.0.113.7, 10.1.2.3\r\n");
        assert_eq!(status, "HTTP/1.1 101 Switching Protocols");
        let mut r = Raw { s: t.try_clone().unwrap() };
        r.frame();
        r.send_frame(0x81, b"subscription\nfwd_chan", true);
        let url = format!("mysql://root:pw@{}/CometQL_v1", s.backend);
        let mut db = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).unwrap();
        let ok = eventually(5, || {
            let ips: Vec<String> = db.query("SELECT ip FROM users_in_pipes WHERE name = 'fwd_chan'").unwrap();
            ips == [want]
        });
        assert!(ok, "trusted={trusted}: expected ip {want}");
        let _ = std::io::Write::flush(&mut t);
    }
}

#[test]
fn running_out_of_descriptors_backs_off_and_recovers() {
    use std::os::unix::process::CommandExt;
    // Start comet with a tiny descriptor limit, then open more connections
    // than it can hold.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_comet"));
    cmd.args([
        "--frontend",
        "127.0.0.1:0",
        "--backend",
        "127.0.0.1:0",
        "--api",
        "off",
        "--shards",
        "1",
        "--io",
        "epoll",
        "--ephemeral",
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit in the forked child before exec; no allocation.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: 64, rlim_max: 64 };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let addr: std::net::SocketAddr = loop {
        let l = rx.recv_timeout(Duration::from_secs(20)).expect("comet started");
        if let Some(a) = l.strip_prefix("comet: frontend listening on ") {
            break a.parse().unwrap();
        }
    };
    let mut held = Vec::new();
    for _ in 0..100 {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            // A first byte of a request: the frontend accepts a connection
            // only once the client has spoken (TCP_DEFER_ACCEPT), and each
            // of these must take a descriptor.
            use std::io::Write;
            let _ = s.write_all(b"G");
            held.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    if let Some(status) = child.try_wait().unwrap() {
        std::thread::sleep(Duration::from_millis(200));
        let logs: Vec<String> = rx.try_iter().collect();
        panic!("comet must survive running out of descriptors: {status}: {logs:#?}");
    }
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    // Recovered: a new client is served.
    let ok = eventually(10, || {
        let (status, _) = common::http_request(addr, "GET /info HTTP/1.1\r\nHost: x\r\n\r\n");
        status == "HTTP/1.1 200 OK"
    });
    let logs: Vec<String> = rx.try_iter().collect();
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok, "comet serves again once descriptors are free");
    let accept_lines = logs.iter().filter(|l| l.contains("accept failed")).count();
    assert!((1..=3).contains(&accept_lines), "one accept-error report, not a storm: {logs:#?}");
    assert!(logs.iter().any(|l| l.contains("shard 0: frontend accept failed")), "{logs:#?}");
}

#[test]
fn with_a_write_delay_a_burst_of_channel_messages_arrives_in_one_write_staggered_over_the_window() {
    use std::io::Read;
    const SUBS: usize = 16;
    for io in BACKENDS {
        let s = start(io, &["--write-delay", "300"]);
        let mut subs: Vec<Raw> = (0..SUBS)
            .map(|i| {
                let mut sub = Raw::open(s.addr, &format!("/ws/v=4&uuid=hot-sub-{i}"));
                sub.frame(); // serverInfo
                sub.send_frame(0x81, b"subscription\nweb_hot", true);
                sub
            })
            .collect();
        let mut publisher = s.client("hot-pub");
        wait_count(&mut publisher, "web_hot", SUBS as u64);
        for sub in &subs {
            sub.s.set_nonblocking(true).unwrap();
        }
        let t = std::time::Instant::now();
        for i in 0..5 {
            publisher.send(&format!("web_pipe2\nweb_hot\ne\n*\nhot-msg-{i}"));
        }
        // The reports to the publisher are not delayed.
        for _ in 0..5 {
            let report = publisher.recv();
            assert_eq!(report["data"]["number_messages"], SUBS, "{io}: {report}");
        }
        let reports = t.elapsed();
        assert!(reports < Duration::from_millis(250), "{io}: reports took {reports:?}");
        // Each subscriber: when its first bytes came, and what each read got.
        let mut got: Vec<(Option<Duration>, Vec<String>)> = vec![(None, Vec::new()); SUBS];
        let mut buf = vec![0u8; 64 * 1024];
        while got.iter().any(|(_, reads)| reads.concat().matches("hot-msg-").count() < 5) {
            assert!(t.elapsed() < Duration::from_secs(3), "{io}: not all delivered: {got:?}");
            for (sub, (first, reads)) in subs.iter_mut().zip(&mut got) {
                match sub.s.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        first.get_or_insert(t.elapsed());
                        reads.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                    }
                    Ok(_) => panic!("{io}: closed"),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{io}: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let waited: Vec<Duration> = got.iter().map(|(first, _)| first.unwrap()).collect();
        for ((first, reads), waited) in got.iter().zip(&waited) {
            let all = reads.concat();
            let order: Vec<usize> = (0..5).map(|i| all.find(&format!("hot-msg-{i}")).unwrap()).collect();
            assert!(order.windows(2).all(|w| w[0] < w[1]), "{io}: in order: {all}");
            assert!(*waited < Duration::from_millis(2000), "{io}: delivered after {waited:?}");
            // A window that ended after the five publishes were answered
            // (and 150 ms at least) spans them all.
            if *waited >= (reports + Duration::from_millis(20)).max(Duration::from_millis(150)) {
                assert_eq!(reads.len(), 1, "{io}: five messages in one write, waited {first:?}: {reads:?}");
            }
        }
        // First windows are staggered over the window by group (eight
        // groups, hashed from the slot and the round of the server's clock:
        // all sixteen subscribers in the same half of them, either one, has
        // odds of about 1 in 32,768).
        assert!(waited.iter().any(|w| *w >= Duration::from_millis(150)), "{io}: some wait: {waited:?}");
        assert!(waited.iter().any(|w| *w < Duration::from_millis(150)), "{io}: some go early: {waited:?}");
    }
}
