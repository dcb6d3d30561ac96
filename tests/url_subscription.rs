//! `subscription` in the upgrade URL (comet's extension, docs/protocol.md):
//! the channels a client joins with its handshake, under the rules of the
//! `subscription` command, against the real server on both I/O backends.

mod common;

use common::{BACKENDS, Client, Server, eventually, http_request, upgrade_request};
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

/// Subscribers of `channel` on the whole server, through CometQL.
fn subscribers(d: &mut mysql::Conn, channel: &str) -> u64 {
    let n: Option<String> = d.query_first(format!("SELECT users FROM pipes WHERE name = '{channel}'")).unwrap();
    n.and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Publishes through CometQL; returns the connections written.
fn publish(d: &mut mysql::Conn, channel: &str, text: &str) -> u64 {
    d.query_drop(format!("INSERT INTO pipes_messages (name, event, message) VALUES ('{channel}', 'ev', '{text}')"))
        .unwrap();
    d.affected_rows()
}

/// Connects with `params` and consumes serverInfo; returns it too.
fn connect(s: &Server, params: &str) -> (Client, serde_json::Value) {
    let mut c = Client::connect(&s.url(params));
    let info = c.recv();
    assert_eq!(info["event"], "serverInfo", "{info}");
    (c, info)
}

#[test]
fn anonymous_clients_subscribe_with_the_path_or_the_query_form() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut d = db(&s);
        // Eight clients, so both shards hold some, and no command is sent.
        let mut clients = Vec::new();
        for i in 0..8 {
            let params = if i % 2 == 0 {
                format!("sesion=&myid=&devid=0&v=4.08&uuid=p{i}&api=js&subscription=news,web_chat")
            } else {
                format!("?subscription=news%2Cweb_chat&v=4.08&uuid=q{i}")
            };
            let url = format!("ws://{}/ws{}{params}", s.addr, if i % 2 == 0 { "/" } else { "" });
            let mut c = Client::connect(&url);
            let info = c.recv();
            assert_eq!(info["event"], "serverInfo", "{io}");
            // The server says it read the list, so that comet.js need not
            // send it again (a server that ignores it says nothing).
            assert_eq!(info["subscribed"], true, "{io}: {info}");
            clients.push(c);
        }
        // The subscription was in place before serverInfo left.
        assert_eq!(subscribers(&mut d, "news"), 8, "{io}");
        assert_eq!(subscribers(&mut d, "web_chat"), 8, "{io}");
        assert_eq!(publish(&mut d, "news", "hello"), 8, "{io}");
        for c in &mut clients {
            let m = c.recv();
            assert_eq!((&m["pipe"], &m["data"]), (&json!("news"), &json!("hello")), "{io}: {m}");
        }
        // A later `subscription` command replaces the URL's set, as usual.
        clients[0].subscribe(&["web_chat"]);
        clients[0].send("pipe_count\nweb_chat\nm\n");
        assert_eq!(clients[0].recv()["data"]["user_in_pipe"], 8, "{io}");
        assert_eq!(subscribers(&mut d, "news"), 7, "{io}");
    }
}

#[test]
fn private_channels_need_an_authorized_user_and_apply_on_the_home_shard() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut d = db(&s);
        // Users 1..=4 land on both shards of two, so some are handed over.
        for uid in 1..=4 {
            d.query_drop(format!("INSERT INTO users_auth (id, hash) VALUES ({uid}, 'k{uid}')")).unwrap();
        }
        let mut users = Vec::new();
        for uid in 1..=4 {
            let (c, info) = connect(
                &s,
                &format!(
                    "sesion=k{uid}&myid={uid}&devid=0&v=4.08&uuid=u{uid}&api=js&subscription=private_{uid},common"
                ),
            );
            assert_eq!(info["authorized"], true, "{io}");
            users.push(c);
        }
        // A wrong key: anonymous, so its private_ name is ignored silently.
        let (mut wrong, info) =
            connect(&s, "sesion=bad&myid=1&devid=0&v=4.08&uuid=w&api=js&subscription=private_1,common");
        assert_eq!(info["authorized"], false, "{io}");
        // And an anonymous one.
        let (mut anon, _) = connect(&s, "v=4.08&uuid=a&subscription=private_2,common");
        assert_eq!(subscribers(&mut d, "common"), 6, "{io}");
        for uid in 1..=4 {
            assert_eq!(subscribers(&mut d, &format!("private_{uid}")), 1, "{io}: private_{uid}");
            assert_eq!(publish(&mut d, &format!("private_{uid}"), &format!("for {uid}")), 1, "{io}");
        }
        for (i, c) in users.iter_mut().enumerate() {
            assert_eq!(c.recv()["data"], format!("for {}", i + 1), "{io}");
        }
        wrong.expect_silence(200);
        anon.expect_silence(50);
    }
}

#[test]
fn too_many_and_bad_names_get_the_commands_error_frames() {
    for io in BACKENDS {
        let s = start(io, &["--max-subscriptions", "3"]);
        let mut d = db(&s);
        let (mut c, _) =
            connect(&s, "v=4.08&uuid=e&subscription=web_1,web_2,web_3,web_4,x,sys,_answer_pipe_count,private_p,web_1");
        let mut errors = Vec::new();
        for _ in 0..4 {
            let m = c.recv();
            assert_eq!((&m["pipe"], &m["event"]), (&json!("sys"), &json!("error")), "{io}: {m}");
            errors.push(m["data"]["error"].as_str().unwrap().to_string());
        }
        assert!(errors.iter().any(|e| e.contains("'x'") && e.contains("2..64")), "{io}: {errors:?}");
        assert!(errors.iter().any(|e| e.contains("'sys'")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("'_answer_pipe_count'")), "{errors:?}");
        assert!(errors.iter().any(|e| e.contains("at most 3")), "{errors:?}");
        c.expect_silence(200);
        assert_eq!((subscribers(&mut d, "web_3"), subscribers(&mut d, "web_4")), (1, 0), "{io}");
        // A name longer than 64 characters.
        let long = "a".repeat(65);
        let (mut c, _) = connect(&s, &format!("v=4.08&subscription={long},web_ok"));
        let e = c.recv();
        assert!(e["data"]["error"].as_str().unwrap().contains("2..64"), "{io}: {e}");
        assert_eq!(subscribers(&mut d, "web_ok"), 1, "{io}");
    }
}

/// The list is bounded by the request head (16 KiB): a head full of names
/// keeps `--max-subscriptions` of them and says so once; a longer head is
/// refused before anything is parsed.
#[test]
fn a_head_full_of_names_is_held_to_the_limit_and_a_longer_one_is_refused() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut d = db(&s);
        let names: Vec<String> = (0..2500).map(|i| format!("c{i:04}")).collect();
        let list = names.join(",");
        assert!(list.len() > 14_000 && list.len() < 15_500, "{}", list.len());
        let (mut c, _) = connect(&s, &format!("v=4.08&uuid=big&subscription={list}"));
        let e = c.recv();
        assert!(e["data"]["error"].as_str().unwrap().contains("at most 32"), "{io}: {e}");
        c.expect_silence(200);
        assert_eq!(subscribers(&mut d, "c0031"), 1, "{io}");
        assert_eq!(subscribers(&mut d, "c0032"), 0, "{io}");
        let huge = format!("/ws/v=4.08&subscription={}", "ab,".repeat(6000));
        let (status, body) = http_request(s.addr, &upgrade_request(&huge));
        assert!(status.starts_with("HTTP/1.1 400"), "{io}: {status}");
        assert!(body.contains("16384"), "{io}: {body}");
        // A head full of refused names: a few errors and a count, not a
        // frame per name.
        let (mut bad, _) = connect(&s, &format!("v=4.08&subscription={}web_kept", "x,".repeat(7000)));
        let mut errors = Vec::new();
        for _ in 0..4 {
            errors.push(bad.recv()["data"]["error"].as_str().unwrap().to_string());
        }
        assert!(errors[..3].iter().all(|e| e.contains("'x'") && e.contains("2..64")), "{io}: {errors:?}");
        assert_eq!(errors[3], "6997 more refused channel names were ignored", "{io}");
        bad.expect_silence(200);
        assert_eq!(subscribers(&mut d, "web_kept"), 1, "{io}");
        let (mut ok, info) = connect(&s, "v=4.08&subscription=web_after");
        assert_eq!(info["subscribed"], true, "{io}");
        ok.send("pipe_count\nweb_after\nm\n");
        assert_eq!(ok.recv()["data"]["user_in_pipe"], 1, "{io}: the server still serves");
        let (_, info) = connect(&s, "v=4.08");
        assert!(info.get("subscribed").is_none(), "{io}: no list, CppComet's frame: {info}");
    }
}

#[test]
fn track_channels_announce_a_url_subscriber_with_its_user_id() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut d = db(&s);
        d.query_drop("INSERT INTO users_auth (id, hash) VALUES (7, 'k7')").unwrap();
        let (mut watcher, _) = connect(&s, "v=4.08&uuid=watcher&subscription=track_room");
        // The watcher's own join is not echoed to it.
        watcher.send("track_pipe_users\ntrack_room\nm0\n");
        assert_eq!(watcher.recv()["marker"], "m0", "{io}");
        let (mut u, info) = connect(&s, "sesion=k7&myid=7&devid=0&v=4.08&uuid=seven&subscription=track_room,web_x");
        assert_eq!(info["authorized"], true);
        let ev = watcher.recv();
        assert_eq!(ev["event"], "subscription", "{io}: {ev}");
        assert_eq!(ev["pipe"], "track_room");
        assert_eq!(ev["data"], json!({"user_id": 7, "uuid": "seven"}));
        // Re-subscribing by command while keeping track_room emits nothing.
        u.subscribe(&["track_room"]);
        u.send("track_pipe_users\ntrack_room\nm1\n");
        let list = u.recv();
        assert_eq!(list["marker"], "m1", "{io}: {list}");
        assert_eq!(list["data"].as_array().map(|a| a.len()), Some(2));
        watcher.expect_silence(200);
        drop(u);
        let ev = watcher.recv();
        assert_eq!((&ev["event"], &ev["data"]["user_id"]), (&json!("unsubscription"), &json!(7)), "{io}: {ev}");
        assert!(eventually(5, || subscribers(&mut d, "web_x") == 0), "{io}");
    }
}
