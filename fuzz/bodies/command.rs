//! Fuzz body for client commands (`comet::frontend::command`, docs/protocol.md
//! "Commands") and the JSON answers that echo their arguments ("Messages").
//!
//! The input is one text message. The parsed command must borrow only from
//! it, carry no separator in a single-line argument, and parse to itself
//! again when written back as the JS client would send it. Whatever a client
//! sent that the server echoes (message text, markers, the unknown word)
//! must come out as valid JSON holding exactly that text.

use comet::frontend::command::{Command, parse};
use comet::frontend::message::{self, ChannelMessage, Delivery};
use comet::frontend::{is_name_char, is_valid_channel};

pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let cmd = parse(&text);
    // (An empty argument may be the parser's own `""`: nothing to borrow.)
    let inside = |s: &str| {
        if s.is_empty() {
            return;
        }
        let (a, b) = (text.as_ptr() as usize, s.as_ptr() as usize);
        assert!(b >= a && b + s.len() <= a + text.len(), "{s:?} is not borrowed from the message");
    };
    let one_line = |s: &str| {
        inside(s);
        assert!(!s.contains('\n') && !s.ends_with('\r'), "argument {s:?} spans lines");
    };
    match &cmd {
        Command::Subscribe(names) => {
            for n in names {
                inside(n);
                assert!(!n.is_empty() && n.bytes().all(is_name_char), "channel piece {n:?}");
            }
        }
        Command::WebPipe { pipe, event, message } => {
            inside(pipe);
            inside(event);
            inside(message);
            assert!(!pipe.contains('\n') && !event.contains('\n'));
            assert!(text.ends_with(message), "the message is the rest of the text");
            check_publish(pipe, event, message);
        }
        Command::PipeLog { pipe, marker }
        | Command::PipeCount { pipe, marker }
        | Command::TrackPipeUsers { pipe, marker } => {
            one_line(pipe);
            one_line(marker);
            check_marker(marker);
        }
        Command::UserData { marker, user_id } => {
            one_line(marker);
            one_line(user_id);
            check_marker(marker);
        }
        Command::UserStatus { user_id } => one_line(user_id),
        Command::Statistics => {}
        Command::Unknown(word) => {
            one_line(word);
            let mut out = Vec::new();
            message::error(&format!("Unknown command '{word}'"), 1_700_000_000, false, &mut out);
            json(&out);
        }
    }
    let again = render(&cmd);
    assert_eq!(parse(&again), cmd, "written back as {again:?}");
}

/// The command as the JS client would send it.
fn render(cmd: &Command<'_>) -> String {
    match cmd {
        Command::Subscribe(names) => format!("subscription\n{}", names.join("\n")),
        Command::WebPipe { pipe, event, message } => format!("web_pipe2\n{pipe}\n{event}\n*\n{message}"),
        Command::PipeLog { pipe, marker } => format!("pipe_log\n{pipe}\n{marker}\n"),
        Command::PipeCount { pipe, marker } => format!("pipe_count\n{pipe}\n{marker}\n"),
        Command::TrackPipeUsers { pipe, marker } => format!("track_pipe_users\n{pipe}\n{marker}"),
        Command::UserData { marker, user_id } => format!("user_data\n{marker}\n{user_id}"),
        Command::UserStatus { user_id } => format!("user_status\n{user_id}"),
        Command::Statistics => "statistics\n{}".to_string(),
        Command::Unknown(word) => word.to_string(),
    }
}

/// A browser publish reaches subscribers and the sender's delivery report
/// with the text exactly as sent (docs/protocol.md, "web_pipe2": no MySQL escaping).
fn check_publish(pipe: &str, event: &str, text: &str) {
    let m = ChannelMessage {
        pipe: pipe.to_string(),
        event: event.to_string(),
        data: text.to_string(),
        data_is_json: false,
        time: Some(1_700_000_000),
        user_id: Some(42),
    };
    for d in [
        Delivery::default(),
        Delivery { legacy: true, history_marker: Some(event), from_queue: true },
        Delivery { legacy: false, history_marker: None, from_queue: true },
    ] {
        let mut out = Vec::new();
        m.encode(d, &mut out);
        let v = json(&out);
        assert_eq!(v["data"].as_str(), Some(text));
        assert_eq!(v["event"].as_str(), Some(event));
        assert_eq!(v["pipe"].as_str(), Some(pipe));
        assert_eq!(v["user_id"].as_u64(), Some(42));
    }
    if is_valid_channel(pipe) {
        let mut out = Vec::new();
        message::delivery_report(pipe, text, 3, 1_700_000_000, false, &mut out);
        let v = json(&out);
        assert_eq!(v["data"]["message"].as_str(), Some(text));
        assert_eq!(v["pipe"].as_str().map(|p| p.strip_prefix("_answer_to_")), Some(Some(pipe)));
    }
}

/// Markers come back verbatim in every answer that carries one.
fn check_marker(marker: &str) {
    let mut out = Vec::new();
    message::pipe_count(7, marker, 1_700_000_000, true, &mut out);
    assert_eq!(json(&out)["marker"].as_str(), Some(marker));
    out.clear();
    message::user_data_answer(5, marker, marker, 1_700_000_000, false, &mut out);
    let v = json(&out);
    assert_eq!(v["marker"].as_str(), Some(marker));
    assert_eq!(v["data"]["user_data"].as_str(), Some(marker));
    out.clear();
    message::track_users(&[(5, marker.to_string())], marker, 1_700_000_000, false, &mut out);
    assert_eq!(json(&out)["data"][0]["uuid"].as_str(), Some(marker));
}

/// Parses one server message; it must be a JSON object.
fn json(bytes: &[u8]) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("invalid JSON ({e}): {:?}", String::from_utf8_lossy(bytes)));
    assert!(v.is_object());
    v
}
