//! Users end to end: every user operation driven through a real MySQL
//! driver, every check observed by a real WebSocket client.

mod common;

use std::time::Duration;

use common::{BACKENDS, Client, Server, eventually};
use mysql::prelude::Queryable;
use serde_json::json;

fn start(io: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--io", io, "--shards", "2", "--password", "pw"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn db(s: &Server) -> mysql::Conn {
    let url = format!("mysql://root:pw@{}/CometQL_v1", s.backend);
    mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).expect("mysql connect")
}

/// Connects user `uid` with `key`; returns the client and its serverInfo.
fn user(s: &Server, dev: u32, uid: u64, key: &str) -> (Client, serde_json::Value) {
    let mut c = Client::connect(&s.url(&format!("sesion={key}&myid={uid}&devid={dev}&v=4.08&uuid=d{uid}&api=js")));
    let info = c.recv();
    assert_eq!(info["event"], "serverInfo", "{info}");
    (c, info)
}

fn set_key(db: &mut mysql::Conn, uid: u64, key: &str) {
    db.query_drop(format!("INSERT INTO users_auth (id, hash) VALUES ({uid}, '{key}')")).unwrap();
    assert_eq!(db.affected_rows(), 1);
    assert_eq!(db.last_insert_id(), uid);
}

fn send(db: &mut mysql::Conn, uid: u64, event: &str, text: &str) -> u64 {
    db.query_drop(format!("INSERT INTO users_messages (id, event, message) VALUES ({uid}, '{event}', '{text}')"))
        .unwrap();
    assert_eq!(db.last_insert_id(), uid);
    db.affected_rows()
}

#[test]
fn users_on_both_shards_authorize_receive_private_messages_and_count_as_online() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut d = db(&s);
        let mut clients = Vec::new();
        for uid in 1..=12u64 {
            set_key(&mut d, uid, &format!("key{uid}"));
            let (c, info) = user(&s, 0, uid, &format!("key{uid}"));
            assert_eq!(info["authorized"], true, "{io}: user {uid}");
            assert_eq!(info["data"], format!("key{uid}"));
            clients.push((uid, c));
        }
        assert!(s.metric("comet_handoffs_total") > 0, "{io}: some users live on the other shard");
        for (uid, c) in &mut clients {
            assert_eq!(send(&mut d, *uid, "private", &format!("hello {uid}")), 1, "{io}");
            let m = c.recv_text();
            assert_eq!(m, format!(r#"{{"data":"hello {uid}","event":"private","pipe":"msg"}}"#), "{io}");
        }
        let times: Vec<(u64, i64)> = d.query("SELECT id, time FROM users_time WHERE id IN (1, 5, 12, 99)").unwrap();
        let mut times = times;
        times.sort();
        assert_eq!(times, [(1, 0), (5, 0), (12, 0), (99, -1)], "{io}: online users read 0, unknown -1");
        let keys: Vec<(u64, String)> = d.query("SELECT id, hash FROM users_auth WHERE id = 3").unwrap();
        assert_eq!(keys, [(3, "key3".to_string())]);
    }
}

#[test]
fn wrong_or_missing_key_stays_anonymous_with_anonymous_rights() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut d = db(&s);
        set_key(&mut d, 4, "right");
        let (mut anon, info) = user(&s, 0, 4, "wrong");
        assert_eq!((info["authorized"].as_bool(), info["data"].as_str()), (Some(false), Some("")), "{io}");
        let (mut no_key, info) = user(&s, 0, 4, "");
        assert_eq!(info["authorized"], false);
        // Anonymous: private_ is not joined, webauth_ publishing refused.
        anon.subscribe(&["private_room", "web_room"]);
        anon.send("pipe_count\nweb_room\nm\n");
        assert_eq!(anon.recv()["data"]["user_in_pipe"], 1);
        let n: Option<String> = d.query_first("SELECT users FROM pipes WHERE name = 'private_room'").unwrap();
        assert_eq!(n.as_deref(), Some("0"), "{io}: anonymous must not join private_");
        anon.send("web_pipe2\nwebauth_room\ne\n*\nx");
        assert_eq!(anon.recv()["event"], "error");
        // A private message to user 4 reaches no anonymous connection.
        assert_eq!(send(&mut d, 4, "e", "secret"), 1, "queued for the (offline) user");
        anon.expect_silence(200);
        no_key.expect_silence(50);
        // The authorized user may join private_ and publish to webauth_.
        let (mut me, _) = user(&s, 0, 4, "right");
        assert_eq!(me.recv()["data"], "secret", "{io}: queued message delivered on authorization");
        me.subscribe(&["private_room", "webauth_room"]);
        let ok = eventually(5, || {
            let n: Option<String> = d.query_first("SELECT users FROM pipes WHERE name = 'private_room'").unwrap();
            n.as_deref() == Some("1")
        });
        assert!(ok, "{io}");
        me.send("web_pipe2\nwebauth_room\ne\n*\nauthorized post");
        let report = me.recv();
        assert_eq!(report["pipe"], "_answer_to_webauth_room", "{io}: {report}");
    }
}

#[test]
fn sixteen_devices_receive_and_a_seventeenth_replaces_the_oldest_with_4009() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut d = db(&s);
        set_key(&mut d, 77, "k77");
        let mut devices: Vec<Client> = (0..16).map(|_| user(&s, 0, 77, "k77").0).collect();
        assert_eq!(send(&mut d, 77, "e", "to all 16"), 1);
        for c in &mut devices {
            assert_eq!(c.recv()["data"], "to all 16", "{io}");
        }
        let (mut seventeenth, info) = user(&s, 0, 77, "k77");
        assert_eq!(info["authorized"], true);
        let oldest = &mut devices[0];
        let e = oldest.recv();
        assert_eq!(e["data"]["error"], "device limit reached: replaced by a newer connection", "{io}: {e}");
        assert_eq!(oldest.expect_close(), 4009, "{io}");
        assert_eq!(send(&mut d, 77, "e", "after"), 1);
        for c in devices.iter_mut().skip(1) {
            assert_eq!(c.recv()["data"], "after", "{io}");
        }
        assert_eq!(seventeenth.recv()["data"], "after");
    }
}

#[test]
fn offline_queue_delivers_everything_in_order_once() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut d = db(&s);
        set_key(&mut d, 5, "k5");
        for i in 0..5 {
            assert_eq!(send(&mut d, 5, "ev", &format!("m{i}")), 1, "{io}");
        }
        let queued: Vec<(u64, u32, String, String)> =
            d.query("SELECT id, index, event, message FROM users_messages WHERE id = 5").unwrap();
        assert_eq!(queued.len(), 5);
        assert_eq!(queued[4], (5, 4, "ev".to_string(), "m4".to_string()));
        let (mut c, _) = user(&s, 0, 5, "k5");
        for i in 0..5 {
            let m = c.recv();
            assert_eq!(m["data"], format!("m{i}"), "{io}");
            assert_eq!(m["fromQueue"], true);
            assert_eq!(m["pipe"], "msg");
            assert!(m["message_send_time"].as_i64().unwrap() > 1_600_000_000);
        }
        let left: Vec<mysql::Row> = d.query("SELECT * FROM users_messages WHERE id = 5").unwrap();
        assert!(left.is_empty(), "{io}: the queue is emptied by delivery");
        drop(c);
        // DELETE empties a queue.
        assert!(eventually(5, || {
            let t: Option<i64> = d.query_first("SELECT time FROM users_time WHERE id = 5").unwrap();
            t.unwrap_or(0) > 0
        }));
        send(&mut d, 5, "ev", "x");
        d.query_drop("DELETE FROM users_messages WHERE id = 5").unwrap();
        assert_eq!(d.affected_rows(), 1);
        let (mut c, _) = user(&s, 0, 5, "k5");
        c.expect_silence(300);
    }
}

#[test]
fn full_queue_drops_the_oldest_and_reports_affected_zero() {
    let s = start("uring", &["--offline-queue-size", "3"]);
    let mut d = db(&s);
    set_key(&mut d, 8, "k8");
    let affected: Vec<u64> = (0..5).map(|i| send(&mut d, 8, "e", &format!("m{i}"))).collect();
    assert_eq!(affected, [1, 1, 1, 0, 0]);
    assert_eq!(s.metric("comet_offline_dropped_total"), 2);
    let (mut c, _) = user(&s, 0, 8, "k8");
    let got: Vec<String> = (0..3).map(|_| c.recv()["data"].as_str().unwrap().to_string()).collect();
    assert_eq!(got, ["m2", "m3", "m4"]);
    c.expect_silence(200);
}

/// An offline queue is bounded in bytes too, to half of --outbound-limit:
/// a user whose queue filled with big messages gets the newest that fit,
/// every one of them, when a device connects. Before, the whole queue
/// went into the device's outbound queue at once, past the limit: the
/// device was closed as a slow consumer and the queue was lost.
#[test]
fn a_queue_of_big_messages_keeps_the_newest_that_fit_and_delivers_them_all() {
    for io in BACKENDS {
        let s = start(io, &["--outbound-limit", "262144"]);
        let mut d = db(&s);
        set_key(&mut d, 9, "k9");
        let big = "x".repeat(17_000);
        let affected: Vec<u64> = (0..20).map(|i| send(&mut d, 9, "big", &format!("{i:02}-{big}"))).collect();
        // Each costs its 17,006 bytes of text, the event again and 224:
        // seven fit in 131,072. Past them each INSERT drops the oldest.
        assert_eq!(affected, [[1; 7].as_slice(), &[0; 13]].concat(), "{io}");
        assert_eq!(s.metric("comet_offline_dropped_total"), 13, "{io}");
        let (mut c, _) = user(&s, 0, 9, "k9");
        let got: Vec<String> = (0..7).map(|_| c.recv()["data"].as_str().unwrap()[..2].to_string()).collect();
        assert_eq!(got, ["13", "14", "15", "16", "17", "18", "19"], "{io}");
        c.expect_silence(200);
        assert_eq!(s.metric("comet_slow_consumer_closes_total"), 0, "{io}");
        // A message over the whole bound is not queued (affected 0).
        drop(c);
        assert!(eventually(5, || s.metric("comet_websockets") == 0));
        assert_eq!(send(&mut d, 9, "big", &"y".repeat(140_000)), 0, "{io}");
        let queued: Vec<mysql::Row> = d.query("SELECT * FROM users_messages WHERE id = 9").unwrap();
        assert!(queued.is_empty(), "{io}");
    }
}

/// The bound is measured again on the frames when a device connects: a
/// queue stored under a larger --outbound-limit, loaded by a comet with a
/// smaller one, delivers the newest messages that fit and counts the
/// oldest as dropped, instead of closing the device as a slow consumer.
#[test]
fn a_queue_stored_under_a_larger_limit_delivers_the_newest_that_fit_after_a_restart() {
    let dir = std::env::temp_dir().join(format!("comet-queue-limit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = format!("--data-dir={}", dir.display());
    {
        let s = start("uring", &[&data]);
        let mut d = db(&s);
        set_key(&mut d, 4, "k4");
        let big = "z".repeat(17_000);
        for i in 0..20 {
            assert_eq!(send(&mut d, 4, "big", &format!("{i:02}-{big}")), 1);
        }
    }
    let s = start("uring", &[&data, "--outbound-limit", "262144"]);
    let (mut c, _) = user(&s, 0, 4, "k4");
    let got: Vec<String> = (0..7).map(|_| c.recv()["data"].as_str().unwrap()[..2].to_string()).collect();
    assert_eq!(got, ["13", "14", "15", "16", "17", "18", "19"]);
    c.expect_silence(200);
    assert_eq!(s.metric("comet_offline_dropped_total"), 13);
    assert_eq!(s.metric("comet_slow_consumer_closes_total"), 0);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn expired_queue_entries_are_never_delivered() {
    let s = start("epoll", &["--offline-queue-ttl", "1"]);
    let mut d = db(&s);
    set_key(&mut d, 9, "k9");
    send(&mut d, 9, "e", "stale");
    std::thread::sleep(Duration::from_millis(2200));
    send(&mut d, 9, "e", "fresh");
    let (mut c, _) = user(&s, 0, 9, "k9");
    assert_eq!(c.recv()["data"], "fresh");
    c.expect_silence(300);
}

#[test]
fn user_status_channel_users_time_and_the_user_status_command() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut d = db(&s);
        set_key(&mut d, 12, "k12");
        let mut watcher = s.client("w");
        watcher.subscribe(&["user_status_12"]);
        assert!(eventually(5, || {
            let n: Option<String> = d.query_first("SELECT users FROM pipes WHERE name = 'user_status_12'").unwrap();
            n.as_deref() == Some("1")
        }));
        watcher.send("user_status\n12");
        let a = watcher.recv();
        assert_eq!(a["pipe"], "_answer_user_status", "{a}");
        assert_eq!(a["data"], json!({"last_online_time": -1, "status": "unknown", "user_id": 12}), "{io}");
        let (first, _) = user(&s, 0, 12, "k12");
        assert_eq!(watcher.recv_text(), r#"{"data":"online","event":"online","pipe":"user_status_12"}"#, "{io}");
        let (second, _) = user(&s, 0, 12, "k12");
        drop(first);
        // A second device keeps the user online: no event.
        watcher.send("user_status\n12");
        let a = watcher.recv();
        assert_eq!(a["data"]["status"], "online", "{io}: {a}");
        assert_eq!(a["event"], "user_status_12");
        drop(second);
        assert_eq!(watcher.recv_text(), r#"{"data":"offline","event":"offline","pipe":"user_status_12"}"#, "{io}");
        let t: Option<i64> = d.query_first("SELECT time FROM users_time WHERE id = 12").unwrap();
        assert!(t.unwrap() > 1_600_000_000, "{io}: offline time");
        watcher.send("user_status\n12");
        let a = watcher.recv();
        assert_eq!(a["data"]["status"], "offline");
        assert_eq!(a["data"]["last_online_time"], t.unwrap());
    }
}

#[test]
fn deleting_a_key_closes_every_device_with_4001() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut d = db(&s);
        set_key(&mut d, 21, "k21");
        let mut a = user(&s, 0, 21, "k21").0;
        let mut b = user(&s, 0, 21, "k21").0;
        d.query_drop("DELETE FROM users_auth WHERE id = 21").unwrap();
        assert_eq!(d.affected_rows(), 1);
        for c in [&mut a, &mut b] {
            assert_eq!(c.recv()["event"], "error", "{io}");
            assert_eq!(c.expect_close(), 4001, "{io}");
        }
        let (_, info) = user(&s, 0, 21, "k21");
        assert_eq!(info["authorized"], false);
        let keys: Vec<(u64, String)> = d.query("SELECT id, hash FROM users_auth WHERE id = 21").unwrap();
        assert!(keys.is_empty());
    }
}

#[test]
fn jwt_keys_valid_expired_forged_and_revoked() {
    use comet::users::jwt;
    let s = start("uring", &[]);
    let mut d = db(&s);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let secret = b"pw0"; // password + dev_id 0
    let valid = jwt::sign(&json!({"user_id": 31, "exp": now + 600}), secret);
    let (mut dev, info) = user(&s, 0, 31, &valid);
    assert_eq!(info["authorized"], true);
    assert_eq!(info["data"], valid.as_str());
    let cases = [
        ("expired", jwt::sign(&json!({"user_id": 31, "exp": now - 10}), secret)),
        ("wrong secret", jwt::sign(&json!({"user_id": 31, "exp": now + 600}), b"nope0")),
        ("alg none", jwt::sign_with_header(&json!({"alg": "none"}), &json!({"user_id": 31, "exp": now + 600}), secret)),
        ("wrong user", jwt::sign(&json!({"user_id": 32, "exp": now + 600}), secret)),
    ];
    for (what, token) in &cases {
        let (_, info) = user(&s, 0, 31, token);
        assert_eq!(info["authorized"], false, "{what}");
    }
    // dev_id 1's secret is "pw1": a dev 0 token does not open dev 1.
    let (_, info) = user(&s, 1, 31, &valid);
    assert_eq!(info["authorized"], false, "token of another dev_id");
    d.query_drop(format!("INSERT INTO revoked_tokens (token) VALUES ('{valid}')")).unwrap();
    assert_eq!(d.affected_rows(), 1);
    assert_eq!(dev.recv()["event"], "error");
    assert_eq!(dev.expect_close(), 4001, "revoking a valid token closes the user's devices");
    let (_, info) = user(&s, 0, 31, &valid);
    assert_eq!(info["authorized"], false, "revoked");
    let listed: Vec<String> = d.query("SELECT token FROM revoked_tokens").unwrap();
    assert_eq!(listed, std::slice::from_ref(&valid));
    d.query_drop(format!("DELETE FROM revoked_tokens WHERE token = '{valid}'")).unwrap();
    assert_eq!(d.affected_rows(), 1);
    let (_, info) = user(&s, 0, 31, &valid);
    assert_eq!(info["authorized"], true, "un-revoked");
}

#[test]
fn user_data_is_readable_by_its_own_user_only() {
    let s = start("epoll", &[]);
    let mut d = db(&s);
    set_key(&mut d, 41, "k41");
    d.query_drop(r#"INSERT INTO users_data (id, data) VALUES (41, '{\"name\":\"Ann\"}')"#).unwrap();
    let rows: Vec<(u64, String)> = d.query("SELECT id, data FROM users_data WHERE id = 41").unwrap();
    assert_eq!(rows, [(41, r#"{"name":"Ann"}"#.to_string())]);
    let (mut me, _) = user(&s, 0, 41, "k41");
    me.send("user_data\nmk\n41");
    let a = me.recv();
    assert_eq!(a["pipe"], "_answer");
    assert_eq!(a["marker"], "mk");
    assert_eq!(a["data"], json!({"user_data": r#"{"name":"Ann"}"#, "user_id": 41}));
    let mut other = s.client("o");
    other.send("user_data\nmk\n41");
    assert_eq!(other.recv()["data"]["error"], "user_data is only available for your own user id");
    d.query_drop("DELETE FROM users_data WHERE id = 41").unwrap();
    assert_eq!(d.affected_rows(), 1);
}

#[test]
fn track_events_carry_the_real_user_id_and_dev_ids_are_isolated() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut d = db(&s);
        set_key(&mut d, 50, "k50");
        let mut watcher = s.client("w");
        watcher.subscribe(&["track_lobby"]);
        assert!(eventually(5, || {
            let n: Option<String> = d.query_first("SELECT users FROM pipes WHERE name = 'track_lobby'").unwrap();
            n.as_deref() == Some("1")
        }));
        let (mut u, _) = user(&s, 0, 50, "k50");
        u.subscribe(&["track_lobby"]);
        let ev = watcher.recv();
        assert_eq!(ev["data"], json!({"user_id": 50, "uuid": "d50"}), "{io}");
        // Same user id and key in dev_id 1: a different user.
        d.query_drop("USE db_1").unwrap();
        set_key(&mut d, 50, "k50");
        let (mut other_dev, info) = user(&s, 1, 50, "k50");
        assert_eq!(info["authorized"], true);
        assert_eq!(send(&mut d, 50, "e", "dev one only"), 1);
        assert_eq!(other_dev.recv()["data"], "dev one only", "{io}");
        u.expect_silence(300);
    }
}
