//! Server → client messages (docs/protocol.md, "Messages"), encoded by hand.
//!
//! Every message is one JSON object whose keys are in alphabetical (byte)
//! order, as the reference server emitted them, so byte-level fixtures stay
//! stable. [`Obj`] writes keys in the order it is given and checks that order
//! in debug builds; each message kind is one function here so the fixtures in
//! the tests below cover all of them.

/// Writes one JSON object; keys must come in sorted order.
pub struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    #[cfg(debug_assertions)]
    last_key: &'static str,
}

impl<'a> Obj<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Obj<'a> {
        out.push(b'{');
        Obj {
            out,
            first: true,
            #[cfg(debug_assertions)]
            last_key: "",
        }
    }

    fn key(&mut self, k: &'static str) {
        #[cfg(debug_assertions)]
        {
            debug_assert!(self.last_key < k || self.first, "keys out of order: {} then {k}", self.last_key);
            self.last_key = k;
        }
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(k.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    pub fn str(mut self, k: &'static str, v: &str) -> Self {
        self.key(k);
        json_string(v, self.out);
        self
    }

    pub fn num(mut self, k: &'static str, v: i64) -> Self {
        self.key(k);
        write_int(v, self.out);
        self
    }

    pub fn bool(mut self, k: &'static str, v: bool) -> Self {
        self.key(k);
        self.out.extend_from_slice(if v { b"true" } else { b"false" });
        self
    }

    /// A value that is already JSON (a nested object or array).
    pub fn raw(mut self, k: &'static str, json: &[u8]) -> Self {
        self.key(k);
        self.out.extend_from_slice(json);
        self
    }

    /// A nested object written by `f`.
    pub fn obj(mut self, k: &'static str, f: impl FnOnce(Obj<'_>) -> Obj<'_>) -> Self {
        self.key(k);
        f(Obj::new(self.out)).end();
        self
    }

    pub fn end(self) {
        self.out.push(b'}');
    }
}

/// Appends the decimal digits of `v` without going through `fmt`.
pub fn write_int(v: i64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 20];
    let mut n = v.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&buf[i..]);
}

/// Appends `s` as a JSON string literal (quotes, backslash, control chars escaped).
pub fn json_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0C => b"\\f",
            0..=0x1F => {
                out.extend_from_slice(&bytes[start..i]);
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// A message published on a channel: by the backend, by a browser
/// (`web_pipe2`, with `user_id`), or by the server (presence events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelMessage {
    pub pipe: String,
    pub event: String,
    /// The payload: a JSON string on the wire, or, for presence events,
    /// already-encoded JSON (see `data_is_json`).
    pub data: String,
    /// `data` is raw JSON to embed as is (presence `{user_id, uuid}`).
    pub data_is_json: bool,
    /// `message_send_time`; `None` for messages that carry none (private
    /// messages and user status events, as docs/protocol.md shows).
    pub time: Option<i64>,
    /// Sender's id for browser publishes; `None` for backend publishes.
    pub user_id: Option<u64>,
}

/// Extra keys some deliveries of a channel message carry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delivery<'a> {
    /// Clients whose API major version is below 4 also get `event_name`.
    pub legacy: bool,
    /// `history` + `marker` + `fromQueue` for `pipe_log` answers.
    pub history_marker: Option<&'a str>,
    /// `fromQueue` alone, for messages from a user's offline queue.
    pub from_queue: bool,
}

impl ChannelMessage {
    /// Encodes the JSON text of this message.
    pub fn encode(&self, d: Delivery<'_>, out: &mut Vec<u8>) {
        let mut o = Obj::new(out);
        o = if self.data_is_json { o.raw("data", self.data.as_bytes()) } else { o.str("data", &self.data) };
        o = o.str("event", &self.event);
        if d.legacy {
            o = o.str("event_name", &self.event);
        }
        if let Some(m) = d.history_marker {
            o = o.bool("fromQueue", true).bool("history", true).str("marker", m);
        } else if d.from_queue {
            o = o.bool("fromQueue", true);
        }
        if let Some(t) = self.time {
            o = o.num("message_send_time", t);
        }
        o = o.str("pipe", &self.pipe);
        if let Some(u) = self.user_id {
            o = o.num("user_id", u as i64);
        }
        o.end();
    }
}

/// `serverInfo` on `sys`, sent once right after the handshake.
///
/// `url_subscription`: the connection URL carried a `subscription` list
/// (comet's extension), which the frame confirms with `"subscribed":true`
/// so that a client can fall back to the command against a server that
/// ignores the parameter. CppComet's clients never send it: their frame is
/// unchanged.
pub fn server_info(
    authorized: bool,
    key: &str,
    time: i64,
    server: &str,
    legacy: bool,
    url_subscription: bool,
    out: &mut Vec<u8>,
) {
    let mut o = Obj::new(out).bool("authorized", authorized).str("data", key).str("event", "serverInfo");
    if legacy {
        o = o.str("event_name", "serverInfo");
    }
    o = o.num("message_send_time", time).str("pipe", "sys").str("server", server);
    if url_subscription {
        o = o.bool("subscribed", true);
    }
    o.end();
}

/// A non-fatal `error` on `sys`; the connection stays open.
pub fn error(text: &str, time: i64, legacy: bool, out: &mut Vec<u8>) {
    let mut o = Obj::new(out).obj("data", |d| d.str("error", text).num("number_messages", -1)).str("event", "error");
    if legacy {
        o = o.str("event_name", "error");
    }
    o.num("message_send_time", time).str("pipe", "sys").end();
}

/// The `error` sent before a fatal close with code 4000 + `code`.
pub fn fatal_error(code: u16, text: &str, time: i64, legacy: bool, out: &mut Vec<u8>) {
    let msg = format!("Error code {code}({text})");
    let mut o = Obj::new(out)
        .obj("data", |d| {
            d.str("error", &msg).num("error_code", code as i64).str("info", "Closed due to error. See last message.")
        })
        .str("event", "error");
    if legacy {
        o = o.str("event_name", "error");
    }
    o.num("message_send_time", time).str("pipe", "sys").end();
}

/// The delivery report on `_answer_to_<pipe>` after a `web_pipe2`.
pub fn delivery_report(pipe: &str, message: &str, count: u64, time: i64, legacy: bool, out: &mut Vec<u8>) {
    let mut o = Obj::new(out)
        .obj("data", |d| d.str("message", message).num("number_messages", count as i64))
        .str("event", "answer");
    if legacy {
        o = o.str("event_name", "answer");
    }
    let mut answer_pipe = String::with_capacity(pipe.len() + 11);
    answer_pipe.push_str("_answer_to_");
    answer_pipe.push_str(pipe);
    o.num("message_send_time", time).str("pipe", &answer_pipe).end();
}

/// The `pipe_count` answer on `_answer_pipe_count`.
pub fn pipe_count(count: u64, marker: &str, time: i64, legacy: bool, out: &mut Vec<u8>) {
    let mut o = Obj::new(out).obj("data", |d| d.num("user_in_pipe", count as i64)).str("event", "user_in_pipe");
    if legacy {
        o = o.str("event_name", "user_in_pipe");
    }
    o.str("marker", marker).num("message_send_time", time).str("pipe", "_answer_pipe_count").end();
}

/// The `track_pipe_users` answer on `_answer`: `members` are (user_id, uuid).
pub fn track_users(members: &[(u64, String)], marker: &str, time: i64, legacy: bool, out: &mut Vec<u8>) {
    let mut list = Vec::with_capacity(members.len() * 32 + 2);
    list.push(b'[');
    for (i, (user, uuid)) in members.iter().enumerate() {
        if i > 0 {
            list.push(b',');
        }
        Obj::new(&mut list).num("user_id", *user as i64).str("uuid", uuid).end();
    }
    list.push(b']');
    let mut o = Obj::new(out).raw("data", &list).str("event", "answer");
    if legacy {
        o = o.str("event_name", "answer");
    }
    o.str("marker", marker).num("message_send_time", time).str("pipe", "_answer").end();
}

/// The `user_status` answer on `_answer_user_status`.
pub fn user_status_answer(user_id: u64, status: &str, last_online: i64, time: i64, legacy: bool, out: &mut Vec<u8>) {
    let event = format!("user_status_{user_id}");
    let mut o = Obj::new(out)
        .obj("data", |d| d.num("last_online_time", last_online).str("status", status).num("user_id", user_id as i64))
        .str("event", &event);
    if legacy {
        o = o.str("event_name", &event);
    }
    o.num("message_send_time", time).str("pipe", "_answer_user_status").end();
}

/// The `user_data` answer on `_answer`.
pub fn user_data_answer(user_id: u64, data: &str, marker: &str, time: i64, legacy: bool, out: &mut Vec<u8>) {
    let mut o =
        Obj::new(out).obj("data", |d| d.str("user_data", data).num("user_id", user_id as i64)).str("event", "answer");
    if legacy {
        o = o.str("event_name", "answer");
    }
    o.str("marker", marker).num("message_send_time", time).str("pipe", "_answer").end();
}

/// The `{user_id, uuid}` payload of presence events.
pub fn presence_data(user_id: u64, uuid: &str) -> String {
    let mut v = Vec::with_capacity(32 + uuid.len());
    Obj::new(&mut v).num("user_id", user_id as i64).str("uuid", uuid).end();
    String::from_utf8(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1700000000;

    fn s(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut v = Vec::new();
        f(&mut v);
        String::from_utf8(v).unwrap()
    }

    fn msg(pipe: &str, event: &str, data: &str, user_id: Option<u64>) -> ChannelMessage {
        ChannelMessage {
            pipe: pipe.into(),
            event: event.into(),
            data: data.into(),
            data_is_json: false,
            time: Some(T),
            user_id,
        }
    }

    // Fixtures as in docs/protocol.md ("serverInfo", "Messages").
    #[test]
    fn protocol_md_channel_message_fixtures() {
        assert_eq!(
            s(|o| msg("simplechat", "newMessage", r#"{"text":"hi"}"#, None).encode(Delivery::default(), o)),
            r#"{"data":"{\"text\":\"hi\"}","event":"newMessage","message_send_time":1700000000,"pipe":"simplechat"}"#
        );
        assert_eq!(
            s(|o| msg("web_chat", "newMessage", r#"{"text":"hi"}"#, Some(42)).encode(Delivery::default(), o)),
            r#"{"data":"{\"text\":\"hi\"}","event":"newMessage","message_send_time":1700000000,"pipe":"web_chat","user_id":42}"#
        );
    }

    #[test]
    fn protocol_md_delivery_report_fixture() {
        assert_eq!(
            s(|o| delivery_report("web_chat", r#"{"text":"hi"}"#, 3, T, false, o)),
            r#"{"data":{"message":"{\"text\":\"hi\"}","number_messages":3},"event":"answer","message_send_time":1700000000,"pipe":"_answer_to_web_chat"}"#
        );
    }

    #[test]
    fn protocol_md_presence_fixtures() {
        let mut m = msg("track_online", "subscription", &presence_data(5, "q1W2e3"), None);
        m.data_is_json = true;
        assert_eq!(
            s(|o| m.encode(Delivery::default(), o)),
            r#"{"data":{"user_id":5,"uuid":"q1W2e3"},"event":"subscription","message_send_time":1700000000,"pipe":"track_online"}"#
        );
        m.event = "unsubscription".into();
        assert_eq!(
            s(|o| m.encode(Delivery::default(), o)),
            r#"{"data":{"user_id":5,"uuid":"q1W2e3"},"event":"unsubscription","message_send_time":1700000000,"pipe":"track_online"}"#
        );
    }

    #[test]
    fn protocol_md_error_fixtures() {
        assert_eq!(
            s(|o| error("The channel name can only contain characters A-Za-z0-9_-", T, false, o)),
            r#"{"data":{"error":"The channel name can only contain characters A-Za-z0-9_-","number_messages":-1},"event":"error","message_send_time":1700000000,"pipe":"sys"}"#
        );
        assert_eq!(
            s(|o| fatal_error(418, "Invalid request Not assigned client api version", T, false, o)),
            r#"{"data":{"error":"Error code 418(Invalid request Not assigned client api version)","error_code":418,"info":"Closed due to error. See last message."},"event":"error","message_send_time":1700000000,"pipe":"sys"}"#
        );
    }

    #[test]
    fn protocol_md_server_info_fixtures() {
        assert_eq!(
            s(|o| server_info(false, "", T, "comet 0.1.0", false, false, o)),
            r#"{"authorized":false,"data":"","event":"serverInfo","message_send_time":1700000000,"pipe":"sys","server":"comet 0.1.0"}"#
        );
        assert_eq!(
            s(|o| server_info(true, "abc", T, "x", false, false, o)),
            r#"{"authorized":true,"data":"abc","event":"serverInfo","message_send_time":1700000000,"pipe":"sys","server":"x"}"#
        );
        // comet's extension: only for a URL that carried `subscription`.
        assert_eq!(
            s(|o| server_info(false, "", T, "x", false, true, o)),
            r#"{"authorized":false,"data":"","event":"serverInfo","message_send_time":1700000000,"pipe":"sys","server":"x","subscribed":true}"#
        );
    }

    #[test]
    fn protocol_md_private_and_user_status_fixtures() {
        let mut m = msg("msg", "event1", "message text", None);
        m.time = None;
        assert_eq!(s(|o| m.encode(Delivery::default(), o)), r#"{"data":"message text","event":"event1","pipe":"msg"}"#);
        m.time = Some(T);
        let q = Delivery { from_queue: true, ..Delivery::default() };
        assert_eq!(
            s(|o| m.encode(q, o)),
            r#"{"data":"message text","event":"event1","fromQueue":true,"message_send_time":1700000000,"pipe":"msg"}"#
        );
        let mut on = msg("user_status_12", "online", "online", None);
        on.time = None;
        assert_eq!(
            s(|o| on.encode(Delivery::default(), o)),
            r#"{"data":"online","event":"online","pipe":"user_status_12"}"#
        );
    }

    #[test]
    fn user_answers() {
        assert_eq!(
            s(|o| user_status_answer(12, "offline", 1699999999, T, false, o)),
            r#"{"data":{"last_online_time":1699999999,"status":"offline","user_id":12},"event":"user_status_12","message_send_time":1700000000,"pipe":"_answer_user_status"}"#
        );
        assert_eq!(
            s(|o| user_data_answer(3, "{\"n\":1}", "m", T, false, o)),
            r#"{"data":{"user_data":"{\"n\":1}","user_id":3},"event":"answer","marker":"m","message_send_time":1700000000,"pipe":"_answer"}"#
        );
    }

    #[test]
    fn history_and_legacy_keys_stay_sorted() {
        let d = Delivery { legacy: true, history_marker: Some("m1"), from_queue: false };
        assert_eq!(
            s(|o| msg("trust_x", "e", "t", Some(3)).encode(d, o)),
            r#"{"data":"t","event":"e","event_name":"e","fromQueue":true,"history":true,"marker":"m1","message_send_time":1700000000,"pipe":"trust_x","user_id":3}"#
        );
    }

    #[test]
    fn answers_to_queries() {
        assert_eq!(
            s(|o| pipe_count(7, "mk", T, false, o)),
            r#"{"data":{"user_in_pipe":7},"event":"user_in_pipe","marker":"mk","message_send_time":1700000000,"pipe":"_answer_pipe_count"}"#
        );
        assert_eq!(
            s(|o| track_users(&[(0, "a".into()), (5, "b".into())], "mk", T, false, o)),
            r#"{"data":[{"user_id":0,"uuid":"a"},{"user_id":5,"uuid":"b"}],"event":"answer","marker":"mk","message_send_time":1700000000,"pipe":"_answer"}"#
        );
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        assert_eq!(s(|o| json_string("a\"b\\c\nd\u{1}é", o)), "\"a\\\"b\\\\c\\nd\\u0001é\"");
        let v: serde_json::Value = serde_json::from_str(&s(|o| json_string("x\u{1f}\t\"", o))).unwrap();
        assert_eq!(v, "x\u{1f}\t\"");
    }
}
