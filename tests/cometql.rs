//! CometQL over the MySQL protocol, against the real server, with real
//! clients: the `mysql` crate, the `mysql` command-line client (MariaDB),
//! PyMySQL, and raw packets for pipelining and bad input.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use common::{BACKENDS, Client, Server, eventually, packet, raw_login, raw_login_as, read_packet};
use mysql::prelude::Queryable;

fn start(io: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--io", io, "--shards", "2", "--password", "s3cret"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn connect(s: &Server) -> mysql::Conn {
    let url = format!("mysql://root:s3cret@{}/CometQL_v1", s.backend);
    mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).expect("mysql connect")
}

/// (code, message) of a failed query.
fn sql_err(r: mysql::Result<impl std::fmt::Debug>) -> (u16, String) {
    match r {
        Err(mysql::Error::MySqlError(e)) => (e.code, e.message),
        other => panic!("expected a MySQL error, got {other:?}"),
    }
}

fn wait_subscribers(c: &mut mysql::Conn, channel: &str, n: u64) {
    let ok = eventually(5, || {
        let users: Option<String> = c.query_first(format!("SELECT users FROM pipes WHERE name = '{channel}'")).unwrap();
        users.as_deref() == Some(n.to_string().as_str())
    });
    assert!(ok, "{channel} never had {n} subscribers");
}

#[test]
fn publish_reaches_websocket_subscribers_with_affected_rows_equal_to_deliveries() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut subs: Vec<Client> = (0..6).map(|i| s.client(&format!("s{i}"))).collect();
        for c in &mut subs {
            c.subscribe(&["news_feed"]);
        }
        let mut db = connect(&s);
        wait_subscribers(&mut db, "news_feed", 6);
        db.query_drop(
            r#"INSERT INTO pipes_messages (name, event, message) VALUES ('news_feed', 'update', '{\"a\":1}')"#,
        )
        .unwrap();
        assert_eq!(db.affected_rows(), 6, "{io}");
        for c in &mut subs {
            let m = c.recv();
            assert_eq!(m["data"], r#"{"a":1}"#, "{io}");
            assert_eq!(m["event"], "update");
            assert_eq!(m["pipe"], "news_feed");
            assert!(m.get("user_id").is_none(), "backend publishes carry no user_id");
        }
        // Multi-row VALUES publishes each row, in order.
        db.query_drop("INSERT INTO pipes_messages VALUES ('news_feed', 'e', 'one'), ('news_feed', 'e', 'two')")
            .unwrap();
        assert_eq!(db.affected_rows(), 12);
        for c in &mut subs {
            assert_eq!(c.recv()["data"], "one");
            assert_eq!(c.recv()["data"], "two");
        }
    }
}

#[test]
fn pipes_and_users_in_pipes_report_every_shard() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut subs: Vec<Client> = (0..10).map(|i| s.client(&format!("u{i}"))).collect();
        for c in &mut subs {
            c.subscribe(&["web_room", "track_room"]);
        }
        let mut db = connect(&s);
        wait_subscribers(&mut db, "web_room", 10);
        let rows: Vec<(String, String)> =
            db.query("SELECT name, users FROM pipes WHERE name IN ('web_room', 'track_room', 'empty_room')").unwrap();
        assert_eq!(
            rows,
            [("web_room".into(), "10".into()), ("track_room".into(), "10".into()), ("empty_room".into(), "0".into())],
            "{io}"
        );
        let mut uuids: Vec<String> = db.query("SELECT user_uuid FROM users_in_pipes WHERE name = 'web_room'").unwrap();
        uuids.sort();
        let mut want: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
        want.sort();
        assert_eq!(uuids, want, "{io}");
        let ips: Vec<String> = db.query("SELECT ip FROM users_in_pipes WHERE name = 'web_room' LIMIT 2").unwrap();
        assert_eq!(ips, ["127.0.0.1", "127.0.0.1"]);
    }
}

/// A history larger than a connection may have queued: `pipe_log` sends
/// the newest messages that fit in half of --outbound-limit, in order,
/// instead of closing the asker as a slow consumer every time.
#[test]
fn pipe_log_of_a_history_over_the_outbound_limit_sends_the_newest_that_fit() {
    for io in BACKENDS {
        let s = start(io, &["--outbound-limit", "262144"]);
        let mut db = connect(&s);
        db.query_drop("INSERT INTO pipes_settings (name, length) VALUES ('web_big', 100)").unwrap();
        let big = "h".repeat(10_000);
        for i in 0..40 {
            db.query_drop(format!("INSERT INTO pipes_messages VALUES ('web_big', 'ev', '{i:02}-{big}')")).unwrap();
        }
        let mut a = s.client("a");
        a.send("pipe_log\nweb_big\nmk\n");
        // Frames of about 10,100 bytes plus 64 counted: 12 fit in 131,072.
        let got: Vec<String> = (0..12).map(|_| a.recv()["data"].as_str().unwrap()[..2].to_string()).collect();
        let want: Vec<String> = (28..40).map(|i| format!("{i:02}")).collect();
        assert_eq!(got, want, "{io}");
        a.expect_silence(200);
        // The connection stays, and asks again.
        a.send("pipe_log\nweb_big\nmk2\n");
        assert_eq!(a.recv()["marker"], "mk2", "{io}");
        assert_eq!(s.metric("comet_slow_consumer_closes_total"), 0, "{io}");
    }
}

#[test]
fn history_settings_select_delete_and_pipe_log() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut db = connect(&s);
        db.query_drop("INSERT INTO pipes_settings (name, length) VALUES ('web_hist', 3)").unwrap();
        for i in 0..5 {
            db.query_drop(format!("INSERT INTO pipes_messages VALUES ('web_hist', 'ev', 'm{i}')")).unwrap();
        }
        let msgs: Vec<String> = db.query("SELECT message FROM pipes_messages WHERE name = 'web_hist'").unwrap();
        assert_eq!(msgs, ["m2", "m3", "m4"], "{io}: oldest dropped first");
        let limited: Vec<String> =
            db.query("SELECT message FROM pipes_messages WHERE name = 'web_hist' LIMIT 1, 1").unwrap();
        assert_eq!(limited, ["m3"], "standard LIMIT offset, count");
        let settings: Vec<(String, u32)> = db.query("SELECT name, length FROM pipes_settings").unwrap();
        assert_eq!(settings, [("web_hist".to_string(), 3)]);

        // A browser's web_pipe2 is stored with its sender id, and pipe_log
        // returns everything oldest first with history and marker.
        let mut a = s.client("a");
        a.send("web_pipe2\nweb_hist\nchat\n*\nfrom browser");
        assert_eq!(a.recv()["pipe"], "_answer_to_web_hist");
        a.send("pipe_log\nweb_hist\nmk7\n");
        let mut got = Vec::new();
        for _ in 0..3 {
            let m = a.recv();
            assert_eq!((m["history"].as_bool(), m["fromQueue"].as_bool()), (Some(true), Some(true)), "{m}");
            assert_eq!(m["marker"], "mk7");
            assert_eq!(m["pipe"], "web_hist");
            got.push(m["data"].as_str().unwrap().to_string());
        }
        assert_eq!(got, ["m3", "m4", "from browser"], "{io}");

        let ids: Vec<u64> = db.query("SELECT id FROM pipes_messages WHERE name = 'web_hist'").unwrap();
        // name AND id: that id in that channel only, never the whole channel.
        db.query_drop(format!("DELETE FROM pipes_messages WHERE name = 'web_other' AND id = {}", ids[0])).unwrap();
        assert_eq!(db.affected_rows(), 0, "{io}: the id is not in web_other");
        db.query_drop(format!("DELETE FROM pipes_messages WHERE name = 'web_hist' AND id = {}", ids[0])).unwrap();
        assert_eq!(db.affected_rows(), 1, "{io}: one entry, not the channel");
        db.query_drop(format!("DELETE FROM pipes_messages WHERE id = {}", ids[1])).unwrap();
        assert_eq!(db.affected_rows(), 1);
        db.query_drop("DELETE FROM pipes_messages WHERE name = 'web_hist'").unwrap();
        assert_eq!(db.affected_rows(), 1);
        let left: Vec<String> = db.query("SELECT message FROM pipes_messages WHERE name = 'web_hist'").unwrap();
        assert!(left.is_empty());
        db.query_drop("DELETE FROM pipes_settings WHERE name = 'web_hist'").unwrap();
        assert_eq!(db.affected_rows(), 1);
        let settings: Vec<(String, u32)> = db.query("SELECT name, length FROM pipes_settings").unwrap();
        assert!(settings.is_empty());
    }
}

#[test]
fn trust_channels_keep_100_messages_without_settings() {
    let s = start("uring", &[]);
    let mut db = connect(&s);
    let values: Vec<String> = (0..120).map(|i| format!("('trust_x', 'e', '{i}')")).collect();
    db.query_drop(format!("INSERT INTO pipes_messages VALUES {}", values.join(","))).unwrap();
    let msgs: Vec<String> = db.query("SELECT message FROM pipes_messages WHERE name = 'trust_x'").unwrap();
    assert_eq!(msgs.len(), 100);
    assert_eq!(msgs[0], "20");
    assert_eq!(msgs[99], "119");
}

#[test]
fn errors_carry_protocol_codes_and_name_the_bad_value() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut db = connect(&s);
        let cases: &[(&str, u16, &str)] = &[
            ("INSERT INTO pipes_messages VALUES ('a b', 'e', 'm')", 12, "'a b'"),
            ("SELECT * FROM nosuch", 15, "'nosuch'"),
            ("INSERT INTO pipes VALUES ('abc', 1)", 10, "'pipes'"),
            ("SELECT * FROM pipes WHERE users = 1", 13, "'users'"),
            ("SELECT bogus FROM pipes WHERE name = 'abc'", 14, "'bogus'"),
            ("INSERT INTO pipes_settings VALUES ('web_a', 5000)", 12, "'5000'"),
            ("SELEKT 1", 3, "'SELEKT'"),
            ("USE mysql", 15, "'mysql'"),
        ];
        for (sql, code, needle) in cases {
            let (c, m) = sql_err(db.query_drop(*sql));
            assert_eq!(c, *code, "{io}: {sql}: {m}");
            assert!(m.contains(needle), "{io}: {sql}: message {m:?} should name {needle}");
        }
        // The connection is still fine.
        let one: Option<String> = db.query_first("SELECT 1").unwrap();
        assert_eq!(one.as_deref(), Some("1"));
    }
}

#[test]
fn driver_connect_queries_and_show_commands() {
    let s = start("uring", &[]);
    let mut db = connect(&s);
    let v: Option<String> = db.query_first("SELECT @@version_comment LIMIT 1").unwrap();
    assert!(v.unwrap().contains("comet"));
    let v: Option<String> = db.query_first("SELECT VERSION()").unwrap();
    assert!(v.unwrap().starts_with("8.0"));
    let v: Option<String> = db.query_first("SELECT DATABASE()").unwrap();
    assert_eq!(v.as_deref(), Some("CometQL_v1"));
    db.query_drop("SET NAMES utf8mb4").unwrap();
    db.query_drop("SET autocommit=1").unwrap();
    let tables: Vec<String> = db.query("SHOW TABLES").unwrap();
    assert!(tables.contains(&"pipes_messages".to_string()) && tables.contains(&"revoked_tokens".to_string()));
    for t in &tables {
        let cols: Vec<mysql::Row> = db.query(format!("DESCRIBE {t}")).unwrap();
        assert!(!cols.is_empty(), "{t}");
    }
    let vars: Vec<(String, String)> = db.query("SHOW VARIABLES LIKE 'max_allowed_packet'").unwrap();
    assert_eq!(vars, [("max_allowed_packet".to_string(), "1048576".to_string())]);
    let status: Vec<(String, String)> = db.query("SHOW STATUS").unwrap();
    let get = |k: &str| status.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap();
    assert_eq!(get("Threads_connected"), "1");
    assert!(get("Questions").parse::<u64>().unwrap() >= 8);
    db.query_drop("USE db_0").unwrap();
    let dbs: Vec<String> = db.query("SHOW DATABASES").unwrap();
    assert_eq!(dbs, ["CometQL_v1"]);
    db.ping().unwrap();
    db.reset().unwrap();
}

#[test]
fn dev_ids_are_isolated_and_db_n_switches() {
    let s = start("epoll", &[]);
    let mut zero = s.client("z");
    zero.subscribe(&["shared_name"]);
    let mut one = Client::connect(&s.url("sesion=&myid=&devid=1&v=4.08&uuid=o"));
    one.recv();
    one.subscribe(&["shared_name"]);
    let mut db = connect(&s);
    assert!(eventually(5, || {
        let u: Option<String> = db.query_first("SELECT users FROM pipes WHERE name = 'shared_name'").unwrap();
        u.as_deref() == Some("1")
    }));
    db.query_drop("USE db_1").unwrap();
    assert!(eventually(5, || {
        let u: Option<String> = db.query_first("SELECT users FROM pipes WHERE name = 'shared_name'").unwrap();
        u.as_deref() == Some("1")
    }));
    db.query_drop("INSERT INTO pipes_messages VALUES ('shared_name', 'e', 'for dev 1')").unwrap();
    assert_eq!(db.affected_rows(), 1);
    assert_eq!(one.recv()["data"], "for dev 1");
    zero.expect_silence(300);
    // Login as dev_id 1 directly.
    let url = format!("mysql://1:s3cret@{}/CometQL_v1", s.backend);
    let mut d1 = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).unwrap();
    d1.query_drop("INSERT INTO pipes_messages VALUES ('shared_name', 'e', 'again')").unwrap();
    assert_eq!(one.recv()["data"], "again");
}

#[test]
fn per_dev_passwords_from_the_config_file() {
    let dir = std::env::temp_dir().join(format!("comet-pw-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("comet.toml");
    std::fs::write(&cfg, "[passwords]\n5 = \"five\"\n").unwrap();
    let s = start("uring", &["--config", cfg.to_str().unwrap()]);
    let ok = format!("mysql://5:five@{}/CometQL_v1", s.backend);
    mysql::Conn::new(mysql::Opts::from_url(&ok).unwrap()).expect("dev 5 with its own password");
    let bad = format!("mysql://5:s3cret@{}/CometQL_v1", s.backend);
    let (code, msg) = sql_err(mysql::Conn::new(mysql::Opts::from_url(&bad).unwrap()));
    assert_eq!(code, 16, "{msg}");
    // dev 0's login may not switch to dev 5's database.
    let mut db = connect(&s);
    assert_eq!(sql_err(db.query_drop("USE db_5")).0, 403);
}

#[test]
fn pipelined_queries_are_answered_in_order() {
    // --max-pending 1: the connection stops being read at every gather and
    // resumes from its buffer when the answer comes; nothing is lost.
    for (io, extra) in [("uring", &[][..]), ("epoll", &[][..]), ("uring", &["--max-pending", "1"][..])] {
        let s = start(io, extra);
        let (mut t, ok) = raw_login(&s, "s3cret");
        assert_eq!(ok[0], 0x00, "{io}: login");
        // 60 queries in one write: slow gathers (pipes counts, publishes)
        // mixed with immediate answers; each answer is tagged by its query.
        let mut out = Vec::new();
        for i in 0..60 {
            let q = match i % 3 {
                0 => format!("SELECT '{i}'"),
                1 => format!("SELECT name FROM pipes WHERE name = 'chan_{i}'"),
                _ => format!("INSERT INTO pipes_messages VALUES ('chan_{i}', 'e', 'x')"),
            };
            let mut p = vec![0x03];
            p.extend_from_slice(q.as_bytes());
            packet(&mut out, 0, &p);
        }
        t.write_all(&out).unwrap();
        for i in 0..60 {
            match i % 3 {
                2 => {
                    let (_, p) = read_packet(&mut t);
                    assert_eq!(p[0], 0x00, "{io}: query {i} should be an OK");
                }
                _ => {
                    // Result set: count, column, EOF, one row, EOF.
                    let (_, count) = read_packet(&mut t);
                    assert_eq!(count, [1], "{io}: query {i}");
                    read_packet(&mut t);
                    read_packet(&mut t);
                    let (_, row) = read_packet(&mut t);
                    let want = if i % 3 == 0 { i.to_string() } else { format!("chan_{i}") };
                    assert_eq!(&row[1..], want.as_bytes(), "{io}: answer {i} out of order");
                    let (_, eof) = read_packet(&mut t);
                    assert_eq!(eof[0], 0xFE);
                }
            }
        }
    }
}

#[test]
fn bad_input_gets_errors_and_leaves_everyone_else_alone() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut bystander = connect(&s);
        let mut sub = s.client("watch");
        sub.subscribe(&["web_safe"]);

        // Garbage instead of a handshake response: ERR, then closed.
        let mut g = TcpStream::connect(s.backend).unwrap();
        g.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        read_packet(&mut g);
        let mut out = Vec::new();
        packet(&mut out, 1, b"\xde\xad\xbe\xef garbage");
        g.write_all(&out).unwrap();
        let (_, e) = read_packet(&mut g);
        assert_eq!(e[0], 0xFF, "{io}");
        let mut rest = Vec::new();
        assert_eq!(g.read_to_end(&mut rest).unwrap_or(0), 0, "closed after the error");

        // Wrong password: ERR 16.
        let (_, e) = raw_login(&s, "wrong");
        assert_eq!(&e[..3], &[0xFF, 16, 0], "{io}");

        // A truncated packet, then the connection goes away: nothing breaks.
        let (mut t, _) = raw_login(&s, "s3cret");
        t.write_all(&[50, 0, 0, 0, 0x03, b'S']).unwrap();
        drop(t);

        // An unknown command and a 20 MiB query on an authenticated connection.
        let (mut t, _) = raw_login(&s, "s3cret");
        let mut out = Vec::new();
        packet(&mut out, 0, &[0x42]);
        t.write_all(&out).unwrap();
        let (_, e) = read_packet(&mut t);
        assert_eq!(u16::from_le_bytes([e[1], e[2]]), 1047, "{io}");
        let big = vec![b'x'; 20 << 20];
        let mut q = b"\x03SELECT '".to_vec();
        q.extend_from_slice(&big);
        q.extend_from_slice(b"'");
        let mut out = Vec::new();
        let mut rest = &q[..];
        let mut seq = 0u8;
        loop {
            let n = rest.len().min(0xFF_FFFF);
            packet(&mut out, seq, &rest[..n]);
            seq += 1;
            rest = &rest[n..];
            if n < 0xFF_FFFF {
                break;
            }
        }
        let mut ping = Vec::new();
        packet(&mut ping, 0, &[0x0E]);
        out.extend_from_slice(&ping);
        t.write_all(&out).unwrap();
        let (seq, e) = read_packet(&mut t);
        assert_eq!(u16::from_le_bytes([e[1], e[2]]), 11, "{io}: 20 MiB query");
        assert_eq!(seq, 2, "{io}: the error follows the query's two packets");
        assert!(String::from_utf8_lossy(&e).contains("max_query_size"));
        let (_, pong) = read_packet(&mut t);
        assert_eq!(pong[0], 0x00, "{io}: the connection still answers after the oversized query");

        // Everyone else is unaffected.
        bystander.query_drop("INSERT INTO pipes_messages VALUES ('web_safe', 'e', 'still here')").unwrap();
        assert_eq!(sub.recv()["data"], "still here", "{io}");
    }
}

#[test]
fn mysql_command_line_client_publishes_php_escaped_json() {
    let s = start("uring", &[]);
    let mut sub = s.client("cli");
    sub.subscribe(&["cli_chan"]);
    let mut db = connect(&s);
    wait_subscribers(&mut db, "cli_chan", 1);
    let port = s.backend.port().to_string();
    let run = |sql: &str| {
        let out = Command::new("mysql")
            .args(["-h", "127.0.0.1", "-P", &port, "-u", "root", "-ps3cret", "--batch", "-e", sql])
            .output()
            .expect("the mysql client (Debian mariadb-client) must be installed: tests/run installs it");
        assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let tables = run("SHOW TABLES");
    assert!(tables.contains("pipes_messages") && tables.contains("users_auth"), "{tables}");
    run(r#"INSERT INTO pipes_messages (name, event, message) VALUES ('cli_chan', 'ev', '{\"a\":1}')"#);
    let m = sub.recv_text();
    assert!(m.starts_with(r#"{"data":"{\"a\":1}","event":"ev","#), "{m}");
    let counts = run("SELECT name, users FROM pipes WHERE name = 'cli_chan'");
    assert_eq!(counts, "name\tusers\ncli_chan\t1\n");
}

#[test]
fn pymysql_logs_in_with_caching_sha2_password() {
    let s = start("epoll", &[]);
    let mut sub = s.client("py");
    sub.subscribe(&["py_chan"]);
    let mut db = connect(&s);
    wait_subscribers(&mut db, "py_chan", 1);
    let script = format!(
        r#"
import pymysql
c = pymysql.connect(host="127.0.0.1", port={port}, user="root", password="s3cret", database="CometQL_v1")
assert c._auth_plugin_name == "caching_sha2_password", c._auth_plugin_name
cur = c.cursor()
n = cur.execute("INSERT INTO pipes_messages (name, event, message) VALUES (%s, %s, %s)", ("py_chan", "ev", 'q"uo\'te'))
print(n)
cur.execute("SELECT name, users FROM pipes WHERE name = 'py_chan'")
print(cur.fetchall())
"#,
        port = s.backend.port()
    );
    let out =
        Command::new("python3").args(["-c", &script]).output().expect("python3 with PyMySQL: tests/run installs it");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n(('py_chan', '1'),)\n");
    assert_eq!(sub.recv()["data"], "q\"uo'te");
}

#[test]
fn a_backend_client_that_never_logs_in_is_dropped_after_the_handshake_time() {
    let s = start("epoll", &[]);
    let mut t = TcpStream::connect(s.backend).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let started = std::time::Instant::now();
    read_packet(&mut t); // the greeting; then say nothing
    let mut rest = Vec::new();
    let _ = t.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(9) && waited < Duration::from_secs(15), "closed after {waited:?}");
    // Logged-in connections are not timed out.
    let mut db = connect(&s);
    let one: Option<String> = db.query_first("SELECT 1").unwrap();
    assert_eq!(one.as_deref(), Some("1"));
}

#[test]
fn a_backend_client_that_never_reads_is_disconnected_not_buffered_forever() {
    // outbound limit 64 KiB and queries of at most 1 KiB -> CometQL bound
    // 1 MiB; past it the client is not read, and after --message-timeout
    // so it is disconnected.
    let s = start("uring", &["--outbound-limit", "65536", "--max-query-size", "1024", "--message-timeout", "2"]);
    let (mut t, ok) = raw_login(&s, "s3cret");
    assert_eq!(ok[0], 0);
    // Ask for SHOW VARIABLES (about 1 KiB each) 40,000 times without
    // reading: more than the sockets' buffers hold, so the server's own
    // queue stays over its bound.
    let mut out = Vec::new();
    for _ in 0..40_000 {
        packet(&mut out, 0, b"\x03SHOW VARIABLES");
    }
    t.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = t.write_all(&out);
    // Not read past its bound, then disconnected after --message-timeout.
    assert!(eventually(15, || s.metric("comet_unread_answer_closes_total") == 1));
    let mut rest = Vec::new();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server closes the connection (EOF, or a reset for the queries it
    // never read); a read that merely times out means it kept it open.
    if let Err(e) = t.read_to_end(&mut rest) {
        assert!(
            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "the server kept the connection open: {e}"
        );
    }
    assert!(rest.len() < 40_000 * 900, "the server stopped answering at its bound ({} bytes read)", rest.len());
    // The server is fine.
    let mut db = connect(&s);
    let one: Option<String> = db.query_first("SELECT 1").unwrap();
    assert_eq!(one.as_deref(), Some("1"));
}

/// Peak resident memory of a process so far (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Fills channel `name`'s history with `n` messages of `len` bytes, in
/// INSERTs of at most 4 KB.
fn fill_history(db: &mut mysql::Conn, name: &str, n: usize, len: usize) {
    db.query_drop(format!("INSERT INTO pipes_settings (name, length) VALUES ('{name}', {n})")).unwrap();
    let text = "H".repeat(len);
    let per = (3500 / len).max(1);
    for done in (0..n).step_by(per) {
        let rows: Vec<String> = (done..n.min(done + per)).map(|_| format!("('{name}', 'e', '{text}')")).collect();
        db.query_drop(format!("INSERT INTO pipes_messages (name, event, message) VALUES {}", rows.join(","))).unwrap();
    }
}

/// One query packing many SELECTs of a big history: their answers wait in
/// the server until the last has run, so past the connection's bound of
/// unread answers the next SELECT is refused by name, instead of every
/// answer being built at once (one 2 KB query of 40 SELECTs of a 4 MB
/// history held 160 MB). What ran is answered whole, although together
/// it passes the bound (the bound of queued answers is for answers not
/// read: a client that reads gets them).
#[test]
fn selects_packed_in_one_query_stop_at_the_bound_of_unread_answers() {
    for io in BACKENDS {
        // 4 x --max-query-size (1 MiB) = 4 MiB of unread answers, above
        // 16 x 64 KiB.
        let s = start(io, &["--outbound-limit", "65536"]);
        let mut db = connect(&s);
        fill_history(&mut db, "hist_many", 100, 10_000);
        let q = vec!["SELECT * FROM pipes_messages WHERE name = 'hist_many'"; 40].join(";");
        let mut sets = Vec::new();
        let mut failure = None;
        {
            let mut r = db.query_iter(q).unwrap();
            while let Some(set) = r.iter() {
                let mut n = 0;
                for row in set {
                    match row {
                        Ok(_) => n += 1,
                        Err(e) => failure = Some(e),
                    }
                }
                sets.push(n);
            }
        }
        let n = sets.iter().filter(|&&n| n == 100).count();
        // Each answer holds about 1.02 MB as rows: the sixth SELECT finds
        // 4 MiB held, and five answers (5 MB) go out.
        assert!((4..=6).contains(&n), "{io}: {n} whole answers before the refusal: {sets:?}");
        let Some(mysql::Error::MySqlError(e)) = failure else { panic!("{io}: no refusal after {sets:?}") };
        assert_eq!(e.code, 1041, "{io}: {}", e.message);
        assert!(e.message.contains("over the limit of 4194304 bytes"), "{io}: {}", e.message);
        // The connection goes on, and gathers rows again.
        let rows: Vec<String> = db.query("SELECT message FROM pipes_messages WHERE name = 'hist_many'").unwrap();
        assert_eq!(rows.len(), 100, "{io}");
    }
}

/// Reads one COM_QUERY answer (EOF packets, no DEPRECATE_EOF), every
/// result of a multi-statement query: rows as their first column's text,
/// "OK" or "ERR <code>".
fn read_answer(t: &mut TcpStream) -> Vec<Vec<String>> {
    fn lenenc(p: &[u8], i: usize) -> (usize, usize) {
        match p[i] {
            0xfc => (u16::from_le_bytes([p[i + 1], p[i + 2]]) as usize, i + 3),
            0xfd => (u32::from_le_bytes([p[i + 1], p[i + 2], p[i + 3], 0]) as usize, i + 4),
            0xfe => (u64::from_le_bytes(p[i + 1..i + 9].try_into().unwrap()) as usize, i + 9),
            n => (n as usize, i + 1),
        }
    }
    const MORE_RESULTS: u16 = 8;
    let mut sets = Vec::new();
    loop {
        let (_, p) = read_packet(t);
        let status = match p[0] {
            0xff => {
                sets.push(vec![format!("ERR {}", u16::from_le_bytes([p[1], p[2]]))]);
                return sets;
            }
            0x00 => {
                let (_, i) = lenenc(&p, 1);
                let (_, i) = lenenc(&p, i);
                sets.push(vec!["OK".to_string()]);
                u16::from_le_bytes([p[i], p[i + 1]])
            }
            _ => {
                let (columns, _) = lenenc(&p, 0);
                for _ in 0..=columns {
                    read_packet(t); // column definitions, then EOF
                }
                let mut rows = Vec::new();
                let status = loop {
                    let (_, p) = read_packet(t);
                    if p[0] == 0xfe && p.len() < 9 {
                        break u16::from_le_bytes([p[3], p[4]]);
                    }
                    let (n, i) = lenenc(&p, 0);
                    rows.push(String::from_utf8_lossy(&p[i..i + n]).into_owned());
                };
                sets.push(rows);
                status
            }
        };
        if status & MORE_RESULTS == 0 {
            return sets;
        }
    }
}

/// Statements that gather rows run one at a time per connection, and the
/// rest wait; with gathers answered on the spot (a user homed on the
/// connection's shard) and --max-pending reached, a pipelined later query
/// must still wait for the whole earlier one, and every answer must come.
#[test]
fn pipelined_queries_with_parked_statements_run_in_order() {
    let s = start("uring", &["--max-pending", "1"]);
    let mut db = connect(&s);
    db.query_drop("INSERT INTO pipes_settings (name, length) VALUES ('ch_x', 10)").unwrap();
    db.query_drop("INSERT INTO pipes_messages (name, event, message) VALUES ('ch_x', 'e', 'one')").unwrap();
    // One user homed on each shard: whichever shard takes the connection,
    // one of the two is answered on the spot.
    let a = (1..).find(|&u| comet::shard::home_shard(0, u, 2) == 0).unwrap();
    let b = (1..).find(|&u| comet::shard::home_shard(0, u, 2) == 1).unwrap();
    // Connections land on either shard: a few cover both.
    for round in 0..6 {
        let (mut t, ok) = raw_login(&s, "s3cret");
        assert_eq!(ok[0], 0);
        let mut out = Vec::new();
        let first = format!(
            "\x03SELECT message FROM pipes_messages WHERE name = 'ch_a'; SELECT id FROM users_auth WHERE id IN ({a}); \
             SELECT id FROM users_auth WHERE id IN ({b}); INSERT INTO pipes_messages (name, event, message) VALUES ('ch_x', 'e', 'r{round}')"
        );
        packet(&mut out, 0, first.as_bytes());
        packet(&mut out, 0, b"\x03SELECT message FROM pipes_messages WHERE name = 'ch_x'");
        packet(&mut out, 0, b"\x03SELECT message FROM pipes_messages WHERE name = 'ch_b'; SELECT 'last'");
        t.write_all(&out).unwrap();
        assert_eq!(read_answer(&mut t), [vec![], vec![], vec![], vec!["OK".to_string()]], "round {round}");
        let history = read_answer(&mut t);
        assert_eq!(
            history[0].last().map(String::as_str),
            Some(format!("r{round}").as_str()),
            "round {round}: {history:?}"
        );
        assert_eq!(read_answer(&mut t), [vec![], vec!["last".to_string()]], "round {round}");
    }
}

/// A client that pipelines big SELECTs and reads them more slowly than the
/// server answers gets every answer, in order: past the bound of unread
/// answers the server stops reading its queries until it caught up,
/// instead of disconnecting it.
#[test]
fn pipelined_big_selects_read_slowly_are_all_answered_in_order() {
    // 4 x --max-query-size (1 MiB) = 4 MiB of unread answers; 1 MB each.
    let s = start("uring", &["--outbound-limit", "65536"]);
    let mut db = connect(&s);
    fill_history(&mut db, "hist_slow", 100, 10_000);
    let (pid, before) = (s.child.id(), peak_rss_kib(s.child.id()));
    let (mut t, ok) = raw_login(&s, "s3cret");
    assert_eq!(ok[0], 0);
    let mut out = Vec::new();
    for i in 0..30 {
        packet(&mut out, 0, b"\x03SELECT id FROM pipes_messages WHERE name = 'hist_slow'");
        packet(
            &mut out,
            0,
            format!("\x03SELECT message FROM pipes_messages WHERE name = 'hist_slow'; SELECT 'm{i}'").as_bytes(),
        );
    }
    t.write_all(&out).unwrap();
    for i in 0..30 {
        assert_eq!(read_answer(&mut t)[0].len(), 100, "answer {i}");
        let both = read_answer(&mut t);
        assert_eq!((both[0].len(), both[1].as_slice()), (100, [format!("m{i}")].as_slice()), "answer {i}");
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(s.metric("comet_unread_answer_closes_total"), 0);
    // Meanwhile the server held the bound's worth of answers for it, not
    // what it could answer ahead (8.6 MB of peak growth here; 28.5 MB when
    // the queue does not hold its input back).
    let grew = peak_rss_kib(pid).saturating_sub(before);
    assert!(grew < 18 * 1024, "the server's peak memory grew by {grew} KiB");
}

/// A client pipelining SELECTs of a big history that it never reads: the
/// shards build one answer at a time for it, and its unread answers close
/// it at the bound, so the server's memory grows by a few answers, not by
/// --max-pending of them (64 of 4 MB grew it by hundreds of MB).
#[test]
fn pipelined_selects_never_read_build_one_answer_at_a_time() {
    for io in BACKENDS {
        // 256 KiB x 16 = 4 MiB of unread answers; each answer 3.6 MB.
        let s = start(io, &["--outbound-limit", "262144", "--max-query-size", "4096", "--message-timeout", "2"]);
        let mut db = connect(&s);
        fill_history(&mut db, "hist_big", 1000, 3500);
        let pid = s.child.id();
        let before = peak_rss_kib(pid);
        let (mut t, ok) = raw_login(&s, "s3cret");
        assert_eq!(ok[0], 0);
        let mut out = Vec::new();
        for _ in 0..64 {
            packet(&mut out, 0, b"\x03SELECT * FROM pipes_messages WHERE name = 'hist_big'");
        }
        t.write_all(&out).unwrap();
        // The server drops the client at its bound.
        let dropped = eventually(10, || {
            db.query_map("SHOW STATUS LIKE 'Threads_connected'", |(_, v): (String, String)| v).unwrap() == ["1"]
        });
        assert!(dropped, "{io}: the client that never reads is still connected");
        assert_eq!(s.metric("comet_unread_answer_closes_total"), 1, "{io}");
        let grew = peak_rss_kib(pid).saturating_sub(before);
        assert!(grew < 64 * 1024, "{io}: the server's peak memory grew by {grew} KiB");
        let one: Option<String> = db.query_first("SELECT 1").unwrap();
        assert_eq!(one.as_deref(), Some("1"), "{io}");
    }
}

/// `comet_answer_memory_bytes`, the process's one series.
fn answer_memory(s: &Server) -> i64 {
    let text = s.metrics_text();
    let line = text.lines().find(|l| l.starts_with("comet_answer_memory_bytes ")).expect("the gauge");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A backend client with a 4 KiB receive buffer that asks for a big
/// answer and reads only its first packet: `Ok` for rows, or the error
/// code and message.
fn ask_and_stall(s: &Server, sql: &str) -> (TcpStream, Result<(), (u16, String)>) {
    ask_with_buffer(s, sql, Some(4096))
}

/// [`ask_and_stall`] with the given receive buffer (`None`: the kernel's
/// default, which grows as the client reads).
fn ask_with_buffer(s: &Server, sql: &str, rcvbuf: Option<usize>) -> (TcpStream, Result<(), (u16, String)>) {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n).unwrap();
    }
    sock.connect(&s.backend.into()).unwrap();
    let (mut t, ok) = common::login_on(sock.into(), "s3cret", 0x10000, 45);
    assert_eq!(ok[0], 0);
    let mut out = Vec::new();
    packet(&mut out, 0, format!("\x03{sql}").as_bytes());
    t.write_all(&out).unwrap();
    let (_, p) = read_packet(&mut t);
    let first = match p[0] {
        0xff => Err((u16::from_le_bytes([p[1], p[2]]), String::from_utf8_lossy(&p[9..]).into_owned())),
        _ => Ok(()),
    };
    (t, first)
}

/// Reads the rest of a result set whose column count was read: the
/// column definitions and the rows, each list ending in an EOF packet.
fn read_rest_of_rows(t: &mut TcpStream) -> usize {
    let (mut eofs, mut rows) = (0, 0);
    while eofs < 2 {
        let (_, p) = read_packet(t);
        if p[0] == 0xfe && p.len() < 9 {
            eofs += 1;
        } else if eofs == 1 {
            rows += 1;
        }
    }
    rows
}

/// Every backend connection stays within its own bound of unread answers,
/// but many of them together would hold that bound many times over (256
/// connections x 16 MiB by default). The process counts the answers held
/// for all of them, from the shard that builds a part to the socket that
/// takes it, and a SELECT whose part would pass --answer-memory-limit gets
/// ERR 1037 before it is built; reading the answers, or closing the
/// connections that asked for them, gives the memory back.
#[test]
fn answers_held_for_all_backend_connections_stop_at_the_answer_memory_limit() {
    // Each connection's bound: 16 x 256 KiB = 4 MiB; the process's: 8 MiB.
    // Each answer holds about 3.6 MB.
    let limit = 8 << 20;
    let s = start(
        "uring",
        &["--outbound-limit", "262144", "--max-query-size", "4096", "--answer-memory-limit", &limit.to_string()],
    );
    let mut db = connect(&s);
    fill_history(&mut db, "hist_pool", 1000, 3500);
    let sql = "SELECT * FROM pipes_messages WHERE name = 'hist_pool'";
    let mut served = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..6 {
        match ask_and_stall(&s, sql) {
            (t, Ok(())) => served.push(t),
            (t, Err(e)) => refused.push((t, e)),
        }
        // Parts are built within a reservation, and what an answer holds
        // once encoded differs from its rows by a few bytes a row.
        let held = answer_memory(&s);
        assert!(held <= limit + (64 << 10), "{held} bytes of answers held, past the {limit}-byte limit");
    }
    // Two or three answers fit, whatever the sockets' buffers took of them
    // (a part is built only with a connection's bound free).
    assert!((2..=3).contains(&served.len()), "{} of 6 served", served.len());
    assert_eq!(s.metric("comet_answer_memory_refusals_total"), refused.len() as i64);
    for (_, (code, msg)) in &refused {
        assert_eq!(*code, 1037, "{msg}");
        assert!(msg.contains("--answer-memory-limit (8388608 bytes)"), "{msg}");
    }
    // A client that reads is refused as well while the memory is taken...
    let (code, msg) = sql_err(db.query::<mysql::Row, _>(sql).map(|rows| rows.len()));
    assert_eq!(code, 1037, "{msg}");
    // ...and small answers still fit.
    let one: Option<String> = db.query_first("SELECT 1").unwrap();
    assert_eq!(one.as_deref(), Some("1"));
    // The refused connections go on: their next SELECT is answered once
    // the answers were read.
    for t in &mut served {
        assert_eq!(read_rest_of_rows(t), 1000);
    }
    assert!(eventually(5, || answer_memory(&s) < 1 << 20), "{} bytes still held after the reads", answer_memory(&s));
    let rows: Vec<mysql::Row> = db.query(sql).unwrap();
    assert_eq!(rows.len(), 1000);
    let (mut t, _) = refused.pop().unwrap();
    let mut out = Vec::new();
    packet(&mut out, 0, format!("\x03{sql}").as_bytes());
    t.write_all(&out).unwrap();
    let (_, p) = read_packet(&mut t);
    assert_ne!(p[0], 0xff, "refused again: {}", String::from_utf8_lossy(&p));
    // An answer left unread is given back when its connection closes.
    assert!(eventually(5, || answer_memory(&s) > 1 << 20), "the answer is not counted");
    drop(t);
    assert!(eventually(5, || answer_memory(&s) == 0), "{} bytes held after the close", answer_memory(&s));
}

/// Reads the rest of a result set as [`read_rest_of_rows`] does, pausing
/// `pause` after each 28 KiB: a client that reads steadily, if not fast.
fn read_rest_of_rows_slowly(t: &mut TcpStream, pause: Duration) -> std::io::Result<usize> {
    let (mut eofs, mut rows, mut unpaused) = (0, 0, 0);
    while eofs < 2 {
        let mut h = [0u8; 4];
        t.read_exact(&mut h)?;
        let mut p = vec![0; u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize];
        t.read_exact(&mut p)?;
        unpaused += p.len();
        if unpaused >= 28 * 1024 {
            std::thread::sleep(pause);
            unpaused = 0;
        }
        if p[0] == 0xfe && p.len() < 9 {
            eofs += 1;
        } else if eofs == 1 {
            rows += 1;
        }
    }
    Ok(rows)
}

/// Clients that ask for big answers and never read them cannot keep the
/// answer memory from the others: while less than one connection's bound
/// is left, a connection that reads less than 64 KiB of its answers in
/// --message-timeout is disconnected, and the memory frees. One that reads
/// steadily keeps its answer, although its socket takes it in bursts.
#[test]
fn clients_that_never_read_give_the_answer_memory_back_after_the_message_timeout() {
    // Answers of 14.3 MB (much more than the sockets' buffers take), a
    // connection's bound of 16 MiB: three answers fit in 44 MB, and two
    // leave less than a bound free.
    let (bound, limit) = (16 << 20, 44_000_000);
    let s = start(
        "uring",
        &[
            "--outbound-limit",
            "1048576",
            "--max-query-size",
            "32768",
            "--answer-memory-limit",
            &limit.to_string(),
            "--message-timeout",
            "2",
        ],
    );
    let mut db = connect(&s);
    fill_history(&mut db, "hist_hoard", 1000, 14_000);
    let sql = "SELECT * FROM pipes_messages WHERE name = 'hist_hoard'";
    let (mut slow, first) = ask_and_stall(&s, sql);
    assert!(first.is_ok(), "{first:?}");
    // About 1.4 MB a second.
    let slow = std::thread::spawn(move || read_rest_of_rows_slowly(&mut slow, Duration::from_millis(20)));
    let mut stalled = Vec::new();
    while stalled.len() < 6 {
        let (t, first) = ask_and_stall(&s, sql);
        let refused = first.is_err();
        stalled.push(t);
        if refused {
            break;
        }
    }
    let (code, msg) = sql_err(db.query::<mysql::Row, _>(sql).map(|rows| rows.len()));
    assert_eq!(code, 1037, "the memory is not taken: {msg}");
    let served = stalled.len() as i64 - 1;
    // Within a few seconds of --message-timeout clients that hold answers
    // are closed until one connection's bound is free again, and no more;
    // the one refused stays, and a reader is answered.
    assert!(eventually(10, || s.metric("comet_unread_answer_closes_total") >= 1), "none closed");
    assert!(eventually(5, || answer_memory(&s) <= limit - bound), "{} bytes still held", answer_memory(&s));
    std::thread::sleep(Duration::from_secs(3));
    let closed = s.metric("comet_unread_answer_closes_total");
    assert!(closed <= served, "{closed} closed of {served} that never read");
    assert_eq!(slow.join().unwrap().expect("the steady reader was cut off"), 1000);
    let rows: Vec<mysql::Row> = db.query(sql).unwrap();
    assert_eq!(rows.len(), 1000);
    let mut last = stalled.pop().unwrap();
    let mut out = Vec::new();
    packet(&mut out, 0, b"\x03SELECT 1");
    last.write_all(&out).unwrap();
    assert_eq!(read_answer(&mut last), vec![vec!["1".to_string()]]);
}

/// Clients that read steadily, and together take all the answer memory,
/// keep their answers: what counts is what their end receives, not the
/// bursts in which the socket takes an answer (half its send buffer at a
/// time, which came seconds apart for a reader at 500 KB/s and cut it).
#[test]
fn steady_readers_that_fill_the_answer_memory_keep_their_answers() {
    // Answers of 7.1 MB, a connection's bound of 8 MiB: two answers fit in
    // 15 MB and leave less than a bound free.
    let s = start(
        "uring",
        &[
            "--outbound-limit",
            "524288",
            "--max-query-size",
            "32768",
            "--answer-memory-limit",
            "15000000",
            "--message-timeout",
            "2",
        ],
    );
    let mut db = connect(&s);
    fill_history(&mut db, "hist_steady", 1000, 7000);
    let sql = "SELECT * FROM pipes_messages WHERE name = 'hist_steady'";
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (mut t, first) = ask_with_buffer(&s, sql, None);
            assert!(first.is_ok(), "{first:?}");
            // About 500 KB a second: 14 s for the answer.
            std::thread::spawn(move || read_rest_of_rows_slowly(&mut t, Duration::from_millis(56)))
        })
        .collect();
    let (code, msg) = sql_err(db.query::<mysql::Row, _>(sql).map(|rows| rows.len()));
    assert_eq!(code, 1037, "the memory is not taken: {msg}");
    for r in readers {
        assert_eq!(r.join().unwrap().expect("a steady reader was cut off"), 1000);
    }
    assert_eq!(s.metric("comet_unread_answer_closes_total"), 0);
}

/// Listing every channel setting or every revoked token is held to a
/// connection's bound like the other tables: sized before anything is
/// built, 1104 past it (they were built and sent whole, and a few clients
/// that did not read held 12x --answer-memory-limit; the same sizing
/// refuses them with 1037 when the memory is short).
#[test]
fn listing_every_setting_or_revoked_token_is_held_to_a_connections_bound() {
    // 16 x 64 KiB = 1 MiB for one connection.
    let s = start("uring", &["--outbound-limit", "65536", "--max-query-size", "8192"]);
    let mut db = connect(&s);
    // 24,000 of each: about 1.2 MB of rows on each of the 2 shards.
    for batch in 0..480 {
        let names: Vec<String> = (0..50).map(|i| format!("('set_{batch}_{i}_{}', 5)", "x".repeat(48))).collect();
        db.query_drop(format!("INSERT INTO pipes_settings (name, length) VALUES {}", names.join(","))).unwrap();
        let tokens: Vec<String> = (0..50).map(|i| format!("('tok.{batch}.{i}.{}')", "y".repeat(56))).collect();
        db.query_drop(format!("INSERT INTO revoked_tokens (token) VALUES {}", tokens.join(","))).unwrap();
    }
    for table in ["pipes_settings", "revoked_tokens"] {
        let (code, msg) = sql_err(db.query::<mysql::Row, _>(format!("SELECT * FROM {table}")).map(|r| r.len()));
        assert_eq!(code, 1104, "{table}: {msg}");
    }
    // Named rows are answered.
    let one: Vec<(String, u32)> =
        db.query(format!("SELECT name, length FROM pipes_settings WHERE name = 'set_7_3_{}'", "x".repeat(48))).unwrap();
    assert_eq!(one.len(), 1);
    let tok = format!("tok.7.3.{}", "y".repeat(56));
    let one: Vec<String> = db.query(format!("SELECT token FROM revoked_tokens WHERE token = '{tok}'")).unwrap();
    assert_eq!(one, [tok]);
}

/// A SELECT whose answer alone would pass the bound of a connection's
/// unread answers is refused before anything is built (ERR 1104), and
/// with a LIMIT, which the channel's home shard applies first, it works.
#[test]
fn a_select_too_big_to_answer_is_refused_and_a_limit_gets_it() {
    for io in BACKENDS {
        // 64 KiB x 16 = 1 MiB; the history holds 1.6 MB.
        let s = start(io, &["--outbound-limit", "65536", "--max-query-size", "4096"]);
        let mut db = connect(&s);
        fill_history(&mut db, "hist_huge", 400, 4000);
        let sql = "SELECT id, message FROM pipes_messages WHERE name = 'hist_huge'";
        let (code, msg) = sql_err(db.query::<(u64, String), _>(sql));
        assert_eq!(code, 1104, "{io}: {msg}");
        assert!(msg.contains("more than 1048576 bytes"), "{io}: {msg}");
        let rows: Vec<(u64, String)> = db.query(format!("{sql} LIMIT 100, 100")).unwrap();
        assert_eq!(rows.len(), 100, "{io}");
        assert!(rows.windows(2).all(|w| w[0].0 < w[1].0), "{io}: oldest first");
        // The tail of the history, past the bound: the rows before the
        // offset are not built.
        let tail: Vec<(String, String)> =
            db.query("SELECT `index`, message FROM pipes_messages WHERE name = 'hist_huge' LIMIT 390, 10").unwrap();
        assert_eq!(tail.len(), 10, "{io}");
        assert_eq!(tail[0].0, "390", "{io}: positions kept");
        assert_eq!(tail[9].1.len(), 4000, "{io}");
        // A whole answer over the bound of queued answers still goes out
        // whole to a client that reads: the bound is for answers not read.
        let rows: Vec<(u64, String)> = db.query(format!("{sql} LIMIT 250")).unwrap();
        assert_eq!(rows.len(), 250, "{io}");
    }
}

/// The same bound holds for the users' tables: a SELECT of many users'
/// offline queues (each up to half of --outbound-limit) is refused before
/// anything is built; fewer users are answered. (Each shard's part is
/// held to the bound.)
#[test]
fn a_select_of_too_many_offline_queues_is_refused() {
    // Queues of at most 32 KiB; answers of at most 4 MiB (4 x 1 MiB
    // queries) from each of the 2 shards: 400 x 30 KB is 6 MB a shard.
    let s = start("epoll", &["--outbound-limit", "65536"]);
    let mut db = connect(&s);
    let text = "q".repeat(30_000);
    for uid in 1..=400 {
        db.query_drop(format!("INSERT INTO users_messages (id, event, message) VALUES ({uid}, 'e', '{text}')"))
            .unwrap();
    }
    let ids = |n: u64| (1..=n).map(|u| u.to_string()).collect::<Vec<_>>().join(",");
    let (code, msg) = sql_err(
        db.query::<(u64, String), _>(format!("SELECT id, message FROM users_messages WHERE id IN ({})", ids(400))),
    );
    assert_eq!(code, 1104, "{msg}");
    let rows: Vec<(u64, String)> =
        db.query(format!("SELECT id, message FROM users_messages WHERE id IN ({})", ids(20))).unwrap();
    assert_eq!(rows.len(), 20);
}

/// `users_in_pipes` rows are held to the bound too: a channel whose
/// subscribers' rows (with their User-Agent texts) pass it is refused.
#[test]
fn users_in_pipes_of_too_many_subscribers_is_refused() {
    use tungstenite::client::IntoClientRequest;
    // 4 KiB x 16 = 64 KiB for a shard's part; 38 rows of 4 KB are 152 KB.
    let s = start("uring", &["--outbound-limit", "4096", "--max-outbound-message", "4096", "--max-query-size", "4096"]);
    let mut clients = Vec::new();
    for i in 0..40 {
        let mut req = s.url(&format!("v=4&uuid=rows{i}")).into_client_request().unwrap();
        req.headers_mut().insert("User-Agent", "u".repeat(4000).parse().unwrap());
        let (ws, _) = tungstenite::connect(req).unwrap();
        let mut c = Client::from_ws(ws);
        assert_eq!(c.recv()["event"], "serverInfo");
        c.subscribe(&[if i < 2 { "web_few" } else { "web_rows" }]);
        clients.push(c);
    }
    let mut db = connect(&s);
    wait_subscribers(&mut db, "web_rows", 38);
    let (code, msg) = sql_err(db.query::<String, _>("SELECT user_uuid FROM users_in_pipes WHERE name = 'web_rows'"));
    assert_eq!(code, 1104, "{msg}");
    let mut few: Vec<String> = db.query("SELECT user_uuid FROM users_in_pipes WHERE name = 'web_few'").unwrap();
    few.sort();
    assert_eq!(few, ["rows0", "rows1"]);
}

/// Connections that never log in cannot lock the backends out: with every
/// slot taken, a new backend connection takes the slot of its shard's
/// oldest connection that has not logged in (or idle HTTP API one);
/// logged-in connections are never closed for another.
#[test]
fn connections_that_never_log_in_give_their_slot_to_a_new_one() {
    for io in BACKENDS {
        let s = Server::start(&["--io", io, "--shards", "1", "--password", "s3cret", "--max-backend-connections", "3"]);
        let mut first = connect(&s);
        let silent = |addr| {
            let t = TcpStream::connect(addr).unwrap();
            t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            t
        };
        let mut junk = silent(s.backend);
        let _ = read_packet(&mut junk); // the greeting: it holds a slot
        // An HTTP API client that starts a request head and stops.
        let mut idle_api = silent(s.api.unwrap());
        idle_api.write_all(b"GET /api/pipes").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // Both give way: to a CometQL login, and to an HTTP API request
        // with a good key.
        let mut second = connect(&s);
        let mut api = silent(s.api.unwrap());
        let get = b"GET /api/pipes?name=web_x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n";
        api.write_all(get).unwrap();
        let mut head = [0u8; 12];
        api.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "{io}");
        assert_eq!((s.metric("comet_evicted_backend_total"), s.metric("comet_refused_backend_total")), (2, 0), "{io}");
        for t in [&mut junk, &mut idle_api] {
            let mut rest = Vec::new();
            assert!(t.read_to_end(&mut rest).is_ok(), "{io}: an evicted connection is closed");
        }
        // The HTTP API connection showed a good key: it is proven, as a
        // CometQL login is, and idle between requests it keeps its slot.
        // Three proven: the next is refused, and nobody was closed for it.
        let url = format!("mysql://root:s3cret@{}/CometQL_v1", s.backend);
        let e = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).err().map(|e| e.to_string());
        assert!(e.as_deref().is_some_and(|e| e.contains("1040")), "{io}: {e:?}");
        assert_eq!(s.metric("comet_refused_backend_total"), 1, "{io}");
        assert_eq!(s.metric("comet_evicted_backend_total"), 2, "{io}");
        for db in [&mut first, &mut second] {
            let one: Option<String> = db.query_first("SELECT 1").unwrap();
            assert_eq!(one.as_deref(), Some("1"), "{io}");
        }
    }
}

#[test]
fn queries_and_answers_over_16_mib_span_several_packets() {
    // 17 MiB each way: the query arrives as two packets (sequence 0 and 1)
    // and is assembled; the answer continues the sequence from 2, and its
    // one row leaves as two packets.
    let s = start("uring", &["--max-query-size", "20971520"]);
    let (mut t, ok) = raw_login(&s, "s3cret");
    assert_eq!(ok[0], 0);
    t.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let big = vec![b'x'; 17 << 20];
    let mut q = b"\x03SELECT '".to_vec();
    q.extend_from_slice(&big);
    q.push(b'\'');
    let mut out = Vec::new();
    packet(&mut out, 0, &q[..0xFF_FFFF]);
    packet(&mut out, 1, &q[0xFF_FFFF..]);
    t.write_all(&out).unwrap();
    let mut seqs = Vec::new();
    let mut next = |t: &mut TcpStream| {
        let mut h = [0u8; 4];
        t.read_exact(&mut h).unwrap();
        let mut p = vec![0u8; u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize];
        t.read_exact(&mut p).unwrap();
        seqs.push(h[3]);
        p
    };
    assert_eq!(next(&mut t), [1], "one column");
    next(&mut t); // column definition
    assert_eq!(next(&mut t)[0], 0xFE, "EOF after the columns");
    let mut row = next(&mut t);
    assert_eq!(row.len(), 0xFF_FFFF, "the row fills a first packet");
    row.extend(next(&mut t));
    assert_eq!(next(&mut t)[0], 0xFE, "EOF after the rows");
    assert_eq!(seqs, [2, 3, 4, 5, 6, 7]);
    // lenenc header (0xFE + 8 bytes) then the value.
    assert_eq!(row.len(), 9 + big.len());
    assert!(row[9..].iter().all(|&b| b == b'x'));
    // Still in step.
    let mut out = Vec::new();
    packet(&mut out, 0, &[0x0E]);
    t.write_all(&out).unwrap();
    let (seq, pong) = read_packet(&mut t);
    assert_eq!((seq, pong[0]), (1, 0x00));
}

#[test]
fn multi_statement_queries_run_in_order_and_stop_at_the_first_bad_one() {
    let s = start("epoll", &[]);
    let mut sub = s.client("multi");
    sub.subscribe(&["multi_chan"]);
    let mut db = connect(&s);
    wait_subscribers(&mut db, "multi_chan", 1);
    let script = format!(
        r#"
import pymysql
from pymysql.constants import CLIENT
c = pymysql.connect(host="127.0.0.1", port={port}, user="root", password="s3cret", client_flag=CLIENT.MULTI_STATEMENTS)
cur = c.cursor()
cur.execute("SELECT 'one'; INSERT INTO pipes_messages VALUES ('multi_chan', 'e', 'sent'); SELECT 'three'")
sets = [cur.fetchall()]
while cur.nextset():
    sets.append(cur.fetchall())
print(sets)
try:
    cur.execute("SELECT 'before'; SELEKT 2; INSERT INTO pipes_messages VALUES ('multi_chan', 'e', 'never')")
    print(cur.fetchall())
    cur.nextset()
except pymysql.err.MySQLError as e:
    print("error", e.args[0])
cur.execute("SELECT 'after'")
print(cur.fetchall())
"#,
        port = s.backend.port()
    );
    let out = Command::new("python3").args(["-c", &script]).output().expect("python3 with PyMySQL");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "[(('one',),), [], (('three',),)]\n(('before',),)\nerror 3\n(('after',),)\n"
    );
    assert_eq!(sub.recv()["data"], "sent");
    sub.expect_silence(300);
}

#[test]
fn prepared_statements_from_a_driver_publish_select_and_bind_every_type() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut sub = s.client("prep");
        sub.subscribe(&["prep_chan"]);
        let mut db = connect(&s);
        wait_subscribers(&mut db, "prep_chan", 1);
        // The mysql crate's exec* use COM_STMT_PREPARE / EXECUTE (binary protocol).
        db.exec_drop(
            "INSERT INTO pipes_messages (name, event, message) VALUES (?, ?, ?)",
            ("prep_chan", "ev", r#"{"x":"it's \"quoted\" \\ and ?"}"#),
        )
        .unwrap();
        assert_eq!(db.affected_rows(), 1, "{io}");
        assert_eq!(sub.recv()["data"], r#"{"x":"it's \"quoted\" \\ and ?"}"#, "{io}");
        let rows: Vec<(String, u64)> = db.exec("SELECT name, users FROM pipes WHERE name = ?", ("prep_chan",)).unwrap();
        assert_eq!(rows, [("prep_chan".to_string(), 1)], "{io}");
        // One statement, executed several times with different types.
        let stmt = db.prep("INSERT INTO pipes_messages VALUES (?, 'e', ?)").unwrap();
        db.exec_drop(&stmt, ("prep_chan", 42i64)).unwrap();
        db.exec_drop(&stmt, ("prep_chan", -7i8)).unwrap();
        db.exec_drop(&stmt, ("prep_chan", 1.5f64)).unwrap();
        db.exec_drop(&stmt, ("prep_chan", u64::MAX)).unwrap();
        for want in ["42", "-7", "1.5", &u64::MAX.to_string()] {
            assert_eq!(sub.recv()["data"], want, "{io}");
        }
        db.close(stmt).unwrap();
        // NULL and user tables through prepared statements.
        let n: Option<Option<String>> = db.exec_first("SELECT ?", (None::<String>,)).unwrap();
        assert_eq!(n, Some(None));
        db.exec_drop("INSERT INTO users_auth (id, hash) VALUES (?, ?)", (77u64, "k77")).unwrap();
        assert_eq!(db.last_insert_id(), 77);
        let keys: Vec<(u64, String)> = db.exec("SELECT id, hash FROM users_auth WHERE id IN (?, ?)", (77, 78)).unwrap();
        assert_eq!(keys, [(77, "k77".to_string())]);
        // Errors keep their codes and values.
        let (code, msg) = sql_err(db.exec_drop("INSERT INTO pipes_messages VALUES (?, 'e', 'm')", ("a b",)));
        assert_eq!(code, 12, "{msg}");
        assert!(msg.contains("'a b'"), "{msg}");
    }
}

#[test]
fn failed_logins_are_counted_and_an_address_that_keeps_failing_is_refused_for_a_while() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let bad = format!("mysql://root:wrong@{}/CometQL_v1", s.backend);
        for i in 0..21 {
            let (code, msg) = sql_err(mysql::Conn::new(mysql::Opts::from_url(&bad).unwrap()));
            assert_eq!(code, 16, "{io}: attempt {i}: {msg}");
        }
        // The 22nd connection is refused before any password is checked,
        // even with the right one.
        let good = format!("mysql://root:s3cret@{}/CometQL_v1", s.backend);
        let (code, msg) = sql_err(mysql::Conn::new(mysql::Opts::from_url(&good).unwrap()));
        assert_eq!(code, 1129, "{io}: {msg}");
        assert!(msg.contains("127.0.0.1") && msg.contains("blocked"), "{msg}");
        assert!(s.metric("comet_auth_failures_total") >= 21);
        assert!(s.metric("comet_auth_refusals_total") >= 1);
        // The log is read by another thread: wait for the line a little.
        let mut log = Vec::new();
        assert!(
            eventually(5, || {
                log.extend(s.drain_log());
                log.iter().any(|l| l.contains("blocked") && l.contains("127.0.0.1"))
            }),
            "{io}: the block is logged: {log:?}"
        );
    }
}

/// Sends one command packet (sequence 0) and reads the first answer packet.
fn command(t: &mut TcpStream, payload: &[u8]) -> (u8, Vec<u8>) {
    let mut out = Vec::new();
    packet(&mut out, 0, payload);
    t.write_all(&out).unwrap();
    read_packet(t)
}

#[test]
fn com_set_option_from_a_raw_client_switches_multi_statements_for_a_batch() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut sub = s.client("batch");
        sub.subscribe(&["batch_chan"]);
        let mut db = connect(&s);
        wait_subscribers(&mut db, "batch_chan", 1);
        // No CLIENT_MULTI_STATEMENTS at login, as Connector/J connects.
        let (mut t, ok) = raw_login_as(&s, "s3cret", 0, 45);
        assert_eq!(ok[0], 0x00, "{io}: logged in");
        let batch: String =
            (1..=5).map(|i| format!("INSERT INTO pipes_messages VALUES ('batch_chan', 'e', 'm{i}');")).collect();
        let mut q = vec![0x03];
        q.extend_from_slice(batch.as_bytes());
        let (_, e) = command(&mut t, &q);
        assert_eq!(e[0], 0xFF, "{io}: several statements need the option");
        // COM_SET_OPTION MYSQL_OPTION_MULTI_STATEMENTS_ON: answered with an
        // EOF packet, sequence 1.
        let (seq, eof) = command(&mut t, &[0x1b, 0x00, 0x00]);
        assert_eq!((seq, eof), (1, vec![0xfe, 0x00, 0x00, 0x02, 0x00]), "{io}");
        let mut out = Vec::new();
        packet(&mut out, 0, &q);
        t.write_all(&out).unwrap();
        for i in 1..=5u8 {
            let (seq, ok) = read_packet(&mut t);
            assert_eq!((seq, ok[0], ok[1]), (i, 0x00, 1), "{io}: OK {i} with affected 1");
            let more = u16::from_le_bytes([ok[3], ok[4]]) & 0x08 != 0;
            assert_eq!(more, i < 5, "{io}: MORE_RESULTS on all but the last");
        }
        for i in 1..=5 {
            assert_eq!(sub.recv()["data"], format!("m{i}"), "{io}");
        }
        // ..._OFF: refused again. An unknown option: ERR 1047 (08S01).
        assert_eq!(command(&mut t, &[0x1b, 0x01, 0x00]).1, [0xfe, 0x00, 0x00, 0x02, 0x00]);
        assert_eq!(command(&mut t, &q).1[0], 0xFF);
        let (_, e) = command(&mut t, &[0x1b, 0x09, 0x00]);
        assert_eq!(&e[..9], &[0xFF, 0x17, 0x04, b'#', b'0', b'8', b'S', b'0', b'1'], "{io}");
        // The connection is still usable.
        assert_eq!(command(&mut t, &[0x0e]).1[0], 0x00);
        sub.expect_silence(200);
    }
}

#[test]
fn latin1_on_the_prepared_path_with_long_data_reaches_websockets_as_utf8() {
    let s = start("epoll", &[]);
    let mut sub = s.client("lat");
    sub.subscribe(&["latin_chan"]);
    let mut db = connect(&s);
    wait_subscribers(&mut db, "latin_chan", 1);
    // Collation 8: latin1_swedish_ci.
    let (mut t, ok) = raw_login_as(&s, "s3cret", 0, 8);
    assert_eq!(ok[0], 0x00);
    // PREPARE with a latin1 literal in the statement text.
    let (_, prep) = command(&mut t, b"\x16INSERT INTO pipes_messages VALUES ('latin_chan', ?, 'pr\xe9par\xe9')");
    assert_eq!(prep[0], 0x00, "PREPARE_OK: {prep:?}");
    read_packet(&mut t); // one parameter definition
    read_packet(&mut t); // EOF
    let mut p = vec![0x17, prep[1], prep[2], prep[3], prep[4], 0, 1, 0, 0, 0, 0, 1, 0xfd, 0, 2];
    p.extend_from_slice(b"ev");
    assert_eq!(command(&mut t, &p).1[0], 0x00);
    assert_eq!(sub.recv()["data"], "préparé");
    let (_, prep) = command(&mut t, b"\x16INSERT INTO pipes_messages VALUES ('latin_chan', ?, ?)");
    assert_eq!(prep[0], 0x00, "PREPARE_OK: {prep:?}");
    let id = [prep[1], prep[2], prep[3], prep[4]];
    for _ in 0..3 {
        read_packet(&mut t); // two parameter definitions and EOF
    }
    // The message goes as COM_STMT_SEND_LONG_DATA in two pieces, in latin1.
    for piece in [&b"caf\xe9 "[..], &b"\x80 d\xe9j\xe0"[..]] {
        let mut p = vec![0x18];
        p.extend_from_slice(&id);
        p.extend_from_slice(&1u16.to_le_bytes());
        p.extend_from_slice(piece);
        let mut out = Vec::new();
        packet(&mut out, 0, &p);
        t.write_all(&out).unwrap();
    }
    // EXECUTE: parameter 0 (the event) inline, parameter 1 from long data.
    let mut p = vec![0x17];
    p.extend_from_slice(&id);
    p.extend_from_slice(&[0, 1, 0, 0, 0]);
    p.push(0); // NULL bitmap
    p.push(1); // types follow
    p.extend_from_slice(&[0xfd, 0, 0xfc, 0]);
    p.push(2);
    p.extend_from_slice(b"ev");
    let (_, ok) = command(&mut t, &p);
    assert_eq!((ok[0], ok[1]), (0x00, 1), "{ok:?}");
    assert_eq!(sub.recv()["data"], "café € déjà");
    // The same bytes on a utf8mb4 connection are refused, not published
    // as U+FFFD.
    let (mut u, _) = raw_login_as(&s, "s3cret", 0, 45);
    let (_, e) = command(&mut u, b"\x03INSERT INTO pipes_messages VALUES ('latin_chan', 'e', 'caf\xe9')");
    assert_eq!(&e[..3], &[0xFF, 0x14, 0x05], "ERR 1300: {:?}", String::from_utf8_lossy(&e));
    assert!(String::from_utf8_lossy(&e).contains("byte 0xE9"));
    sub.expect_silence(200);
}

#[test]
fn an_unsupported_charset_is_refused_by_name_at_login_and_in_set_names() {
    let s = start("epoll", &[]);
    // Collation 28: gbk_chinese_ci.
    let (_, e) = raw_login_as(&s, "s3cret", 0, 28);
    assert_eq!(&e[..3], &[0xFF, 0x5B, 0x04], "ERR 1115");
    let msg = String::from_utf8_lossy(&e[9..]).into_owned();
    assert!(msg.contains("'gbk' (collation 28)"), "{msg}");
    let mut db = connect(&s);
    let (code, msg) = sql_err(db.query_drop("SET NAMES gbk"));
    assert_eq!(code, 1115);
    assert!(msg.contains("'gbk'"), "{msg}");
    let (code, msg) = sql_err(db.query_drop("SET NAMES 'no_such_set'"));
    assert_eq!((code, msg.as_str()), (1115, "Unknown character set: 'no_such_set'"));
    db.query_drop("SET NAMES utf8mb4").unwrap();
}

#[test]
fn pymysql_with_charset_latin1_publishes_and_reads_back_e_acute() {
    let s = start("epoll", &[]);
    let mut sub = s.client("pylat");
    sub.subscribe(&["pylat_chan"]);
    let mut db = connect(&s);
    wait_subscribers(&mut db, "pylat_chan", 1);
    db.query_drop("INSERT INTO pipes_settings (name, length) VALUES ('pylat_chan', 10)").unwrap();
    let script = format!(
        r#"
import pymysql
c = pymysql.connect(host="127.0.0.1", port={port}, user="root", password="s3cret", charset="latin1")
cur = c.cursor()
print(cur.execute("INSERT INTO pipes_messages (name, event, message) VALUES (%s, %s, %s)", ("pylat_chan", "ev", "café é")))
cur.execute("SELECT message FROM pipes_messages WHERE name = 'pylat_chan'")
print(cur.fetchall())
cur.execute("SELECT 'ü'")
print(cur.fetchall())
"#,
        port = s.backend.port()
    );
    let out = Command::new("python3").args(["-c", &script]).output().expect("python3 with PyMySQL");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n(('café é',),)\n(('ü',),)\n");
    assert_eq!(sub.recv()["data"], "café é");
    // A character latin1 has no byte for comes back as '?', as MySQL sends it.
    db.query_drop("INSERT INTO pipes_messages (name, event, message) VALUES ('pylat_chan', 'ev', '中é')").unwrap();
    assert_eq!(sub.recv()["data"], "中é");
    let script = format!(
        r#"
import pymysql
c = pymysql.connect(host="127.0.0.1", port={port}, user="root", password="s3cret", charset="latin1")
cur = c.cursor()
cur.execute("SELECT message FROM pipes_messages WHERE name = 'pylat_chan'")
print(cur.fetchall())
"#,
        port = s.backend.port()
    );
    let out = Command::new("python3").args(["-c", &script]).output().expect("python3 with PyMySQL");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "(('café é',), ('?é',))\n");
}

#[test]
fn long_data_is_bounded_per_connection_by_max_query_size() {
    let s = start("epoll", &["--max-query-size", "4096"]);
    let (mut t, ok) = raw_login_as(&s, "s3cret", 0, 45);
    assert_eq!(ok[0], 0x00);
    // Two statements, each fed long data: together they may not pass the
    // bound, even though each alone stays under it.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (_, prep) = command(&mut t, b"\x16SELECT ?");
        assert_eq!(prep[0], 0x00);
        read_packet(&mut t);
        read_packet(&mut t);
        ids.push([prep[1], prep[2], prep[3], prep[4]]);
    }
    let mut out = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        for _ in 0..(if i == 0 { 3 } else { 400 }) {
            let mut p = vec![0x18];
            p.extend_from_slice(id);
            p.extend_from_slice(&0u16.to_le_bytes());
            p.extend_from_slice(&[b'x'; 1000]);
            packet(&mut out, 0, &p);
        }
    }
    t.write_all(&out).unwrap();
    // The second statement passed the bound: its EXECUTE gets ERR 11.
    let exec = |id: &[u8; 4]| [&[0x17][..], id, &[0, 1, 0, 0, 0, 0, 1, 0xfd, 0]].concat();
    let (_, e) = command(&mut t, &exec(&ids[1]));
    assert_eq!(&e[..3], &[0xFF, 11, 0], "{}", String::from_utf8_lossy(&e));
    assert!(String::from_utf8_lossy(&e).contains("--max-query-size"));
    // The first one kept its 3000 bytes and runs.
    let mut out = Vec::new();
    packet(&mut out, 0, &exec(&ids[0]));
    t.write_all(&out).unwrap();
    let (_, cols) = read_packet(&mut t);
    assert_eq!(cols, [1], "one column");
    read_packet(&mut t); // column definition
    read_packet(&mut t); // EOF
    let (_, row) = read_packet(&mut t);
    assert_eq!(row.len(), 1 + 1 + 3 + 3000, "header, null bitmap, length, 3000 bytes");
    read_packet(&mut t); // EOF
    assert_eq!(command(&mut t, &[0x0e]).1[0], 0x00, "the connection is still usable");
}
