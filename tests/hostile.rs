//! Hostile clients against the real server: each bound the server keeps is
//! attacked here and must hold, while a bystander keeps being served.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{BACKENDS, Client, Raw, Server, eventually};

fn start(io: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--io", io, "--shards", "2"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// A bystander that publishes to itself through a second connection and
/// must get its message promptly.
fn bystander_round_trip(s: &Server, tag: &str) -> Duration {
    let mut sub = s.client(&format!("{tag}-sub"));
    sub.subscribe(&[&format!("web_{tag}")]);
    let mut publisher = s.client(&format!("{tag}-pub"));
    // The subscription is in effect once pipe_count sees it.
    assert!(eventually(5, || {
        publisher.send(&format!("pipe_count\nweb_{tag}\nm\n"));
        publisher.recv()["data"]["user_in_pipe"] == 1
    }));
    let t = Instant::now();
    publisher.send(&format!("web_pipe2\nweb_{tag}\ne\n*\nhello"));
    let got = sub.recv();
    assert_eq!(got["data"], "hello", "{got}");
    t.elapsed()
}

#[test]
fn a_command_flood_is_dropped_with_one_error_a_second_then_closed_with_4029() {
    for io in BACKENDS {
        let s = start(io, &["--client-rate", "5"]);
        let mut flooder = s.client("flooder");
        // 200 commands at once: the burst (10) is handled, the rest dropped.
        for _ in 0..200 {
            flooder.send("pipe_count\nweb_x\nm\n");
        }
        let mut answers = 0;
        let mut rate_errors = 0;
        loop {
            let m = flooder.recv();
            match m["event"].as_str() {
                Some("pipe_count") | Some("user_in_pipe") => answers += 1,
                _ if m.to_string().contains("rate limit") => rate_errors += 1,
                _ => {}
            }
            if answers + rate_errors >= 11 {
                break;
            }
        }
        assert_eq!((answers, rate_errors), (10, 1), "{io}: the burst, then one error");
        flooder.expect_silence(300);
        // Keep exceeding the rate (a writer thread floods while this one
        // reads): closed with 4029 after about 10 s.
        let mut raw = Raw::open(s.addr, "/ws/v=4&uuid=flooder2");
        raw.frame(); // serverInfo
        let mut writer = raw.s.try_clone().unwrap();
        let t = Instant::now();
        let flood = std::thread::spawn(move || {
            let text = b"pipe_count\nweb_x\nm\n";
            let mut f = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
            f.extend_from_slice(text);
            while t.elapsed() < Duration::from_secs(20) && writer.write_all(&f).is_ok() {
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        raw.s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut errors = 0;
        let code = loop {
            let (op, payload) = raw.frame();
            if op == 8 {
                break u16::from_be_bytes([payload[0], payload[1]]);
            }
            if String::from_utf8_lossy(&payload).contains("rate limit") {
                errors += 1;
            }
        };
        let _ = raw.s.shutdown(std::net::Shutdown::Both);
        flood.join().unwrap();
        assert!((8..=12).contains(&errors), "{io}: {errors} rate-limit errors in about 10 s");
        assert_eq!(code, 4029, "{io}");
        assert!(t.elapsed() >= Duration::from_secs(8), "{io}: closed after {:?}", t.elapsed());
        assert!(s.metric("comet_rate_limit_closes_total") >= 1);
        // Nobody else was affected.
        assert!(bystander_round_trip(&s, "by") < Duration::from_secs(1));
    }
}

#[test]
fn browsers_flooding_one_channel_are_held_to_the_channel_rate() {
    for io in BACKENDS {
        // 20 a second process-wide, burst 40 (each of the 2 shards: 10, 20).
        let s = start(io, &["--channel-rate", "20"]);
        let mut sub = s.client("hot-sub");
        sub.subscribe(&["web_hot"]);
        let mut publishers: Vec<Client> = (0..4).map(|i| s.client(&format!("hot-pub{i}"))).collect();
        for p in &mut publishers {
            for _ in 0..50 {
                p.send("web_pipe2\nweb_hot\ne\n*\nflood");
            }
        }
        // Every publish is answered: a delivery report or the rate error.
        let (mut reports, mut refused) = (0, 0);
        for p in &mut publishers {
            for _ in 0..50 {
                let m = p.recv();
                if m.to_string().contains("rate limit: channel web_hot takes at most 20 messages per second") {
                    refused += 1;
                } else {
                    assert_eq!(m["event"], "answer", "{io}: {m}");
                    reports += 1;
                }
            }
        }
        // The bursts, and what refills while the 200 arrive (well under 1 s).
        assert!((20..=60).contains(&reports), "{io}: {reports} admitted, {refused} refused");
        let mut delivered = 0;
        while delivered < reports {
            assert_eq!(sub.recv()["data"], "flood", "{io}");
            delivered += 1;
        }
        sub.expect_silence(300);
        // Other channels are not held back.
        assert!(bystander_round_trip(&s, "calm") < Duration::from_secs(1));
    }
}

/// A browser toggling its subscription between many `track_` channels and
/// none makes a presence event per channel per toggle, each sent to every
/// member: a toggle costs a command per event, so the events it causes
/// are held to --client-rate a second, not --client-rate toggles.
#[test]
fn presence_churn_is_held_to_the_client_rate_in_events() {
    for io in BACKENDS {
        // 10 commands a second, burst 20.
        let s = start(io, &["--client-rate", "10"]);
        let channels: Vec<String> = (0..32).map(|i| format!("track_{i}")).collect();
        let names: Vec<&str> = channels.iter().map(String::as_str).collect();
        let mut watcher = s.client("watcher");
        watcher.subscribe(&names);
        let mut churner = s.client("churner");
        let join = format!("subscription\n{}\n", channels.join("\n"));
        // 40 toggles over 0.8 s: within the command rate, 28 would pass
        // (20 of burst, 8 refilled), 896 presence events.
        for i in 0..40 {
            churner.send(if i % 2 == 0 { &join } else { "subscription\nweb_calm\n" });
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut events = 0;
        loop {
            if let tungstenite::stream::MaybeTlsStream::Plain(t) = watcher.ws.get_ref() {
                t.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            }
            match watcher.ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    let m: serde_json::Value = serde_json::from_str(&t).unwrap();
                    if m["event"] == "subscription" || m["event"] == "unsubscription" {
                        events += 1;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        // The first toggle's 32 joins put the churner 12 commands in debt
        // (1.2 s at 10 a second): nothing else it sent passed.
        assert!((32..=64).contains(&events), "{io}: {events} presence events");
        assert!(bystander_round_trip(&s, "calm") < Duration::from_secs(1));
    }
}

#[test]
fn a_frame_that_never_finishes_is_closed_with_1008_after_the_message_timeout() {
    for io in BACKENDS {
        let s = start(io, &["--message-timeout", "1"]);
        let mut slow = Raw::open(s.addr, "/ws/v=4&uuid=slow");
        slow.frame(); // serverInfo
        // A masked text frame announcing 1000 bytes, of which 10 arrive.
        let mut head = vec![0x81, 0x80 | 126];
        head.extend_from_slice(&1000u16.to_be_bytes());
        head.extend_from_slice(&[1, 2, 3, 4]);
        head.extend_from_slice(&[0u8; 10]);
        slow.s.write_all(&head).unwrap();
        let t = Instant::now();
        // A byte now and then does not extend the deadline.
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(400));
            let _ = slow.s.write_all(&[0]);
        }
        slow.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(slow.close_code(), 1008, "{io}");
        assert!(t.elapsed() < Duration::from_secs(4), "{io}: {:?}", t.elapsed());
        assert!(s.metric("comet_message_timeouts_total") >= 1);
    }
}

#[test]
fn a_request_head_or_mysql_packet_that_never_finishes_is_dropped() {
    for io in BACKENDS {
        let s = start(io, &["--message-timeout", "1", "--password", "s3cret"]);
        let mut http = TcpStream::connect(s.addr).unwrap();
        http.write_all(b"GET /ws/v=4 HTTP/1.1\r\nHost: x\r\n").unwrap();
        let mut sql = TcpStream::connect(s.backend).unwrap();
        let mut greeting = [0u8; 4];
        sql.read_exact(&mut greeting).unwrap();
        let len = u32::from_le_bytes([greeting[0], greeting[1], greeting[2], 0]) as usize;
        let mut rest = vec![0u8; len];
        sql.read_exact(&mut rest).unwrap();
        // A login packet that announces 100 bytes and sends 5.
        sql.write_all(&[100, 0, 0, 1, 1, 2, 3, 4, 5]).unwrap();
        let t = Instant::now();
        for mut c in [http, sql] {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)), "{io}: expected the connection closed");
        }
        assert!(t.elapsed() < Duration::from_secs(4), "{io}: {:?}", t.elapsed());
    }
}

/// Sends `n` masked pings with a 125-byte payload without reading anything.
fn flood_pings(raw: &mut Raw, n: usize) -> std::io::Result<()> {
    let mut frame = vec![0x89, 0x80 | 125, 1, 2, 3, 4];
    frame.extend_from_slice(&[7u8; 125]);
    let burst: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * 100).collect();
    for _ in 0..n / 100 {
        raw.s.write_all(&burst)?;
    }
    Ok(())
}

#[test]
fn a_client_that_floods_pings_and_never_reads_is_closed_as_a_slow_consumer() {
    for io in BACKENDS {
        // Rate high enough that every ping is answered: this is about the
        // outbound queue's memory, charged per frame.
        let s = Server::start(&["--io", io, "--client-rate", "1000000", "--outbound-limit", "65536", "--shards", "1"]);
        let mut raw = Raw::open(s.addr, "/ws/v=4&uuid=pinger");
        raw.s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = flood_pings(&mut raw, 200_000);
        assert!(
            eventually(10, || s.metric("comet_slow_consumer_closes_total") >= 1),
            "{io}: the non-reader was never closed"
        );
        assert!(bystander_round_trip(&s, "by") < Duration::from_secs(1));
    }
}

#[test]
fn an_echo_client_that_never_reads_is_bounded_too() {
    for io in BACKENDS {
        let s = Server::start(&["--io", io, "--echo-path", "/echo", "--outbound-limit", "65536", "--shards", "1"]);
        let mut raw = Raw::open(s.addr, "/echo");
        raw.s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let payload = vec![b'x'; 60_000];
        for _ in 0..2000 {
            raw.send_frame(0x82, &payload, true);
            if s.metric("comet_slow_consumer_closes_total") >= 1 {
                break;
            }
        }
        assert!(
            eventually(10, || s.metric("comet_slow_consumer_closes_total") >= 1),
            "{io}: the echo non-reader was never closed"
        );
    }
}

/// Opens a TCP connection from `source` and sends a WebSocket upgrade;
/// returns the status line.
fn upgrade_status(server: SocketAddr, source: &str, keep: &mut Vec<TcpStream>) -> String {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{source}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
    sock.connect(&server.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(common::upgrade_request("/ws/v=4&uuid=x").as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read_exact(&mut b).is_err() {
            break;
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    keep.push(s);
    text
}

#[test]
fn connections_over_the_process_and_address_limits_get_503_and_429_and_backends_still_log_in() {
    for io in BACKENDS {
        let s = start(io, &["--max-connections", "6", "--max-connections-per-ip", "3", "--password", "s3cret"]);
        let mut keep = Vec::new();
        for _ in 0..3 {
            assert!(upgrade_status(s.addr, "127.0.0.1", &mut keep).starts_with("HTTP/1.1 101"));
        }
        let refused = upgrade_status(s.addr, "127.0.0.1", &mut keep);
        assert!(refused.starts_with("HTTP/1.1 429"), "{io}: {refused}");
        assert!(refused.contains("Retry-After:"), "{refused}");
        for _ in 0..3 {
            assert!(upgrade_status(s.addr, "127.0.0.2", &mut keep).starts_with("HTTP/1.1 101"));
        }
        let full = upgrade_status(s.addr, "127.0.0.3", &mut keep);
        assert!(full.starts_with("HTTP/1.1 503"), "{io}: {full}");
        assert!(full.contains("Retry-After:"), "{full}");
        // The backend port is not counted: a CometQL login still works.
        let url = format!("mysql://root:s3cret@{}/CometQL_v1", s.backend);
        mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).expect("backend login while the frontend is full");
        // A connection that goes frees its place.
        keep.truncate(0);
        assert!(eventually(5, || {
            let mut k = Vec::new();
            upgrade_status(s.addr, "127.0.0.1", &mut k).starts_with("HTTP/1.1 101")
        }));
        assert!(s.metric("comet_refused_total") >= 1);
        assert!(s.metric("comet_refused_per_ip_total") >= 1);
    }
}

#[test]
fn backend_connections_over_their_limit_get_err_1040_or_503_and_the_frontend_is_untouched() {
    for io in BACKENDS {
        let s = start(io, &["--max-backend-connections", "4", "--password", "s3cret"]);
        let url = format!("mysql://root:s3cret@{}/CometQL_v1", s.backend);
        let opts = mysql::Opts::from_url(&url).unwrap();
        // Logged-in CometQL connections and HTTP API connections that
        // showed a good key count together. (Connections that never log
        // in give their slot to a new one: tests/cometql.rs.)
        let mut idle: Vec<mysql::Conn> = (0..2).map(|_| mysql::Conn::new(opts.clone()).unwrap()).collect();
        let mut api = TcpStream::connect(s.api.unwrap()).unwrap();
        api.write_all(b"GET /api/pipes?name=web_x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n")
            .unwrap();
        let mut head = [0u8; 12];
        api.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "{io}");
        let mut db = mysql::Conn::new(opts.clone()).expect("the fourth backend connection is admitted");
        assert!(eventually(5, || s.metric("comet_cometql_connections") == 4), "{io}");

        let err = mysql::Conn::new(opts.clone()).expect_err("a fifth backend connection is refused");
        assert!(
            err.to_string().contains("1040") && err.to_string().contains("--max-backend-connections"),
            "{io}: {err}"
        );
        let (head, body) = common::http_request(s.api.unwrap(), "GET /api/pipes HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 503"), "{io}: {head}");
        assert!(body.contains("1040"), "{body}");
        assert!(s.metric("comet_refused_backend_total") >= 2, "{io}");

        // The admitted backend still works, and the frontend is not counted.
        let n: Option<u64> = mysql::prelude::Queryable::query_first(&mut db, "SELECT 1").unwrap();
        assert_eq!(n, Some(1));
        assert!(bystander_round_trip(&s, "backfull") < Duration::from_secs(2));

        assert_eq!(s.metric("comet_evicted_backend_total"), 0, "{io}");
        // A connection that goes frees its place.
        idle.truncate(0);
        drop(api);
        assert!(eventually(5, || mysql::Conn::new(opts.clone()).is_ok()), "{io}: a freed place is taken again");
    }
}

/// At --max-backend-connections, the slot a new backend connection takes
/// is one from the address holding the most connections that prove
/// nothing, so a flood of silent connections evicts its own, not a backend
/// from another address; and each eviction counts as a failed login of the
/// flood's address, which is soon refused at accept (ERR 1129).
#[test]
fn a_flood_of_silent_backend_connections_evicts_its_own_and_gets_its_address_refused() {
    for io in BACKENDS {
        let s = Server::start(&["--io", io, "--shards", "1", "--password", "s3cret", "--max-backend-connections", "4"]);
        // A connection from `source` and the first packet it gets.
        let from = |source: &str| {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            sock.bind(&format!("{source}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
            sock.connect(&s.backend.into()).unwrap();
            let mut t: TcpStream = sock.into();
            t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let (_, first) = common::read_packet(&mut t);
            (t, first)
        };
        let (mut lone, _) = from("127.0.0.3");
        let mut flood = Vec::new();
        let mut refused = 0;
        for _ in 0..40 {
            let (t, first) = from("127.0.0.2");
            if first[0] == 0xff && u16::from_le_bytes([first[1], first[2]]) == 1129 {
                refused += 1;
            }
            flood.push(t);
        }
        // 3 fill the slots; then each evicts one of its own, and past 20
        // failures in 10 s the address is refused.
        assert!(refused >= 15, "{io}: {refused} of the flood refused at accept");
        assert!(s.metric("comet_evicted_backend_total") >= 15, "{io}");
        // The connection from the other address was never the one taken.
        lone.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        assert!(
            matches!(lone.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "{io}: the lone connection was closed"
        );
        // A backend from a third address logs in (taking one of the
        // flood's slots) and works.
        let url = format!("mysql://root:s3cret@{}/CometQL_v1", s.backend);
        let mut db = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).expect("a backend logs in");
        let n: Option<u64> = mysql::prelude::Queryable::query_first(&mut db, "SELECT 1").unwrap();
        assert_eq!(n, Some(1), "{io}");
    }
}

/// Past the 64 refusals a shard keeps lingering, a refused connection is
/// not kept, but it is still told to come back later: every one of a burst
/// far larger than that gets its 503 with `Retry-After` (before, those past
/// 64 saw a bare close).
#[test]
fn refusals_past_the_lingering_bound_still_get_503_with_retry_after() {
    for io in BACKENDS {
        // One shard, one new connection a second: the whole burst but one
        // is refused within the second its refusals linger.
        let s = Server::start(&["--io", io, "--shards", "1", "--max-accept-rate", "1"]);
        let n = 300;
        let mut socks = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = TcpStream::connect(s.addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(common::upgrade_request("/ws/v=4&uuid=burst").as_bytes()).unwrap();
            socks.push(c);
        }
        let (mut refused, mut upgraded, mut other) = (0, 0, Vec::new());
        for mut c in socks {
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            // Up to the end of the head: a refusal is then closed, an upgrade is not.
            while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => answer.extend_from_slice(&buf[..k]),
                }
            }
            let text = String::from_utf8_lossy(&answer);
            if text.starts_with("HTTP/1.1 503") && text.contains("\r\nRetry-After: 2\r\n") {
                refused += 1;
            } else if text.starts_with("HTTP/1.1 101") {
                upgraded += 1;
            } else {
                other.push(text.into_owned());
            }
        }
        assert!(
            other.is_empty(),
            "{io}: {} answers neither 503 + Retry-After nor 101: {:?}",
            other.len(),
            other.first()
        );
        assert!(upgraded <= 2, "{io}: {upgraded} upgraded");
        assert_eq!(refused + upgraded, n, "{io}");
        // /metrics is a new frontend connection too: wait for a token.
        std::thread::sleep(Duration::from_millis(1500));
        assert!(s.metric("comet_refused_unlingered_total") > 0, "{io}: no refusal went past the lingering bound");
    }
}

/// One connection of a reconnect storm: the status code of the answer to
/// its upgrade, or 0 when the server closed it unanswered.
fn storm_attempt(server: SocketAddr, source: &str) -> u16 {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&format!("{source}:0").parse::<SocketAddr>().unwrap().into()).unwrap();
    if sock.connect(&server.into()).is_err() {
        return 0;
    }
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    if s.write_all(common::upgrade_request("/ws/v=4&uuid=storm").as_bytes()).is_err() {
        return 0;
    }
    let mut head = [0u8; 12];
    match s.read_exact(&mut head) {
        Ok(()) => std::str::from_utf8(&head[9..12]).ok().and_then(|c| c.parse().ok()).unwrap_or(0),
        Err(_) => 0,
    }
}

#[test]
fn a_reconnect_storm_over_the_accept_rate_gets_503_and_connected_clients_keep_their_speed() {
    for io in BACKENDS {
        let rate = 100;
        let s = start(io, &["--max-accept-rate", &rate.to_string()]);
        // Connected before the storm (4 of the burst's 100 tokens).
        let mut sub = s.client("calm-sub");
        sub.subscribe(&["web_calm"]);
        let mut publisher = s.client("calm-pub");
        assert!(eventually(5, || {
            publisher.send("pipe_count\nweb_calm\nm\n");
            publisher.recv()["data"]["user_in_pipe"] == 1
        }));
        let before = bystander_round_trip(&s, "before");
        let t = Instant::now();
        let storm: Vec<_> = (0..4)
            .map(|i| {
                let addr = s.addr;
                std::thread::spawn(move || {
                    let mut codes = Vec::new();
                    while t.elapsed() < Duration::from_secs(2) {
                        codes.push(storm_attempt(addr, &format!("127.0.1.{}", i + 1)));
                    }
                    codes
                })
            })
            .collect();
        // While it rages, the calm clients are served.
        let mut slowest = Duration::ZERO;
        let mut n = 0;
        while t.elapsed() < Duration::from_millis(1800) {
            let sent = Instant::now();
            publisher.send(&format!("web_pipe2\nweb_calm\ne\n*\n{n}"));
            assert_eq!(sub.recv()["data"], n.to_string(), "{io}");
            slowest = slowest.max(sent.elapsed());
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        let codes: Vec<u16> = storm.into_iter().flat_map(|h| h.join().unwrap()).collect();
        let elapsed = t.elapsed().as_secs_f64();
        let upgraded = codes.iter().filter(|&&c| c == 101).count();
        let refused = codes.iter().filter(|&&c| c == 503).count();
        let unanswered = codes.iter().filter(|&&c| c == 0).count();
        assert_eq!(upgraded + refused + unanswered, codes.len(), "{io}: only 101, 503 or a close: {codes:?}");
        // The burst (less the 8 taken above) and the rate over the storm.
        let most = rate as f64 * (1.0 + elapsed) + 5.0;
        assert!(upgraded >= 50 && upgraded as f64 <= most, "{io}: {upgraded} upgraded in {elapsed:.2}s");
        assert!(refused >= 100, "{io}: {refused} refused with 503, {unanswered} unanswered of {}", codes.len());
        // /metrics on the frontend port is a new connection too: it is
        // answered once the bucket has refilled.
        std::thread::sleep(Duration::from_millis(1100));
        assert!(s.metric("comet_refused_rate_total") >= refused as i64, "{io}");
        assert!(
            slowest < Duration::from_millis(250) + before * 10,
            "{io}: a calm round trip took {slowest:?} during the storm ({before:?} before)"
        );
        eprintln!(
            "{io}: {} attempts in {elapsed:.2}s: {upgraded} upgraded, {refused} refused (503), {unanswered} unanswered; slowest calm round trip {slowest:?} ({n} sent)",
            codes.len()
        );
    }
}

#[test]
fn requests_waiting_for_answers_are_bounded_per_connection() {
    for io in BACKENDS {
        let s = start(io, &["--max-pending", "1"]);
        let mut c = s.client("asker");
        // Five questions in one write: the first waits for the other
        // shard's answer while the rest are read, so they are refused.
        let batch: Vec<u8> = (0..5)
            .flat_map(|i| {
                let text = format!("pipe_count\nweb_q\nm{i}\n");
                let mut f = vec![0x81, 0x80 | text.len() as u8, 0, 0, 0, 0];
                f.extend_from_slice(text.as_bytes());
                f
            })
            .collect();
        if let tungstenite::stream::MaybeTlsStream::Plain(t) = c.ws.get_mut() {
            t.write_all(&batch).unwrap();
        }
        let mut answers = 0;
        let mut refusals = 0;
        while answers + refusals < 5 {
            let m = c.recv();
            if m.to_string().contains("too many requests waiting") {
                refusals += 1;
            } else {
                answers += 1;
            }
        }
        assert!(answers >= 1 && refusals >= 1, "{io}: {answers} answered, {refusals} refused");
        // Once answered, the connection asks again freely.
        c.send("pipe_count\nweb_q\nagain\n");
        assert_eq!(c.recv()["data"]["user_in_pipe"], 0);
    }
}

#[test]
fn a_burst_of_big_publishes_past_the_mail_limit_pauses_reading_and_loses_nothing() {
    for io in BACKENDS {
        let s = start(
            io,
            &[
                "--mail-limit",
                "1048576",
                "--password",
                "s3cret",
                "--max-query-size",
                "4194304",
                "--outbound-limit",
                "16777216",
            ],
        );
        let mut subs: Vec<Client> = (0..4).map(|i| s.client(&format!("sub{i}"))).collect();
        for c in &mut subs {
            c.subscribe(&["web_big"]);
        }
        let mut p = s.client("pub");
        assert!(eventually(5, || {
            p.send("pipe_count\nweb_big\nm\n");
            p.recv()["data"]["user_in_pipe"] == 4
        }));
        // 100 messages of 300 KiB each go to the other shard: 60 MiB of
        // mail (frame and text) against a 1 MiB bound.
        let url = format!("mysql://root:s3cret@{}/CometQL_v1", s.backend);
        let mut db = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).unwrap();
        use mysql::prelude::Queryable;
        let big = "y".repeat(300 * 1024);
        let readers: Vec<_> = subs
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    if let tungstenite::stream::MaybeTlsStream::Plain(t) = c.ws.get_ref() {
                        t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    }
                    (0..100).map(|_| c.recv()["data"].as_str().map_or(0, str::len)).sum::<usize>()
                })
            })
            .collect();
        // Five rows per INSERT: each one mails 3 MiB to the other shard.
        let row = format!("('web_big', 'e', '{big}')");
        let query = format!("INSERT INTO pipes_messages VALUES {}", vec![row; 5].join(", "));
        let mut affected = 0;
        for _ in 0..20 {
            db.query_drop(&query).unwrap();
            affected += db.affected_rows();
        }
        assert_eq!(affected, 400, "{io}");
        for r in readers {
            assert_eq!(r.join().unwrap(), 100 * big.len(), "{io}: a subscriber lost messages");
        }
        assert!(s.metric("comet_mail_congestions_total") >= 1, "{io}: the bound was never reached");
    }
}

#[test]
fn errors_quote_at_most_256_characters_of_a_huge_value() {
    let s = Server::start(&["--io", "epoll"]);
    let mut c = s.client("big");
    let word = "w".repeat(60_000);
    c.send(&word);
    let e = c.recv()["data"]["error"].as_str().unwrap_or_default().to_string();
    assert!(e.len() < 400, "error of {} bytes", e.len());
    assert!(e.starts_with("Unknown command 'www") && e.ends_with("...' (60000 bytes)"), "{e}");
    c.send(&format!("pipe_count\n{word}\nm\n"));
    let e = c.recv()["data"]["error"].as_str().unwrap_or_default().to_string();
    assert!(e.len() < 400 && e.contains("(60000 bytes)"), "{e}");
}
