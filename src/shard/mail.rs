//! What shards say to each other through their mailboxes.
//!
//! A publish is encoded once on the shard where it starts: the WebSocket
//! frame bytes live in an `Arc<[u8]>` that every shard writes, unchanged, to
//! each of its local subscribers. Questions that need every shard's answer
//! (how many were reached, who is subscribed) carry a request id and the
//! asking shard; the answers come back as [`Mail::Reply`] and are gathered in
//! `ShardCore::pending`. Answers stay typed ([`Reply`], [`Records`]) until the
//! asker has them all: a CometQL table's text rows are made only in
//! `cometql::rows`.

use std::sync::{Arc, OnceLock};

use socket2::Socket;

use crate::cometql::rows::{ChannelHistory, Subscriber};
use crate::frontend::message::{ChannelMessage, Delivery};
use crate::users::{Presence, Queued};
use crate::ws;

use super::ConnId;
use super::answer_memory::Charge;

/// A channel message ready to be written: encoded once, shared by all shards.
#[derive(Debug)]
pub struct Publication {
    pub dev_id: u32,
    pub msg: ChannelMessage,
    /// The WebSocket text frame for clients of API major version >= 4.
    pub frame: Arc<[u8]>,
    /// The frame with `event_name`, for older clients; built on first need.
    legacy: OnceLock<Arc<[u8]>>,
    /// The two frames compressed (permessage-deflate, RSV1), built the first
    /// time a shard delivers to a connection that negotiated it; `None`
    /// inside: under the threshold or not smaller. Shards share the
    /// publication, so each variant is compressed once per publish.
    deflated: [OnceLock<Option<Arc<[u8]>>>; 2],
    /// The connection that published it (a browser's `web_pipe2`, or the
    /// subscriber whose presence this announces): it does not receive it.
    pub exclude: Option<(usize, ConnId)>,
    /// Kept in the channel's history (if it keeps one) by its home shard;
    /// false for presence events.
    pub store: bool,
}

impl Publication {
    pub fn new(dev_id: u32, msg: ChannelMessage, exclude: Option<(usize, ConnId)>) -> Publication {
        let frame = encode_text_frame(|out| msg.encode(Delivery::default(), out));
        let store = !msg.data_is_json;
        Publication { dev_id, msg, frame, legacy: OnceLock::new(), deflated: Default::default(), exclude, store }
    }

    /// The frame for a client that wants `event_name` too.
    pub fn legacy_frame(&self) -> &Arc<[u8]> {
        self.legacy.get_or_init(|| {
            encode_text_frame(|out| {
                self.msg.encode(Delivery { legacy: true, history_marker: None, from_queue: false }, out)
            })
        })
    }

    /// The compressed frame for a connection that negotiated
    /// permessage-deflate, if compressing is worth it.
    pub fn deflated_frame(&self, legacy: bool, deflater: &mut ws::deflate::Deflater) -> Option<&Arc<[u8]>> {
        self.deflated[legacy as usize]
            .get_or_init(|| {
                let plain = if legacy { self.legacy_frame() } else { &self.frame };
                deflater.frame(plain).map(Arc::from)
            })
            .as_ref()
    }

    /// Size of the frame on the wire.
    pub fn wire_len(&self) -> usize {
        self.frame.len()
    }
}

/// Builds a complete server text frame around the JSON `write` produces.
pub fn encode_text_frame(write: impl FnOnce(&mut Vec<u8>)) -> Arc<[u8]> {
    let mut json = Vec::with_capacity(256);
    write(&mut json);
    let mut frame = Vec::with_capacity(json.len() + 10);
    ws::frame_header(ws::Opcode::Text, json.len(), &mut frame);
    frame.extend_from_slice(&json);
    frame.into()
}

/// A socket moving to another shard, with the bytes already read from it.
#[derive(Debug)]
pub struct Handoff {
    pub sock: Socket,
    pub peer: std::net::SocketAddr,
    /// The request head (and anything after it) read by the accepting shard.
    pub head: Vec<u8>,
    /// The connection's TLS state, when it came in over TLS (`head` is
    /// then plaintext already).
    pub tls: Option<Box<crate::tls::TlsConn>>,
}

/// Weight of a message before its variable parts: the enum and its boxes.
const MAIL_BASE: usize = 64;

fn strs<'a>(v: impl IntoIterator<Item = &'a Arc<str>>) -> usize {
    v.into_iter().map(|s| s.len() + 16).sum()
}

impl Query {
    /// Whether its answer is a backend's rows built within a budget
    /// (`ShardCore::answer_room`): the parts that can be big.
    pub fn builds_within_room(&self) -> bool {
        use crate::users::UserQuery as U;
        matches!(
            self,
            Query::History { .. }
                | Query::Subscribers(_)
                | Query::SettingsSelect(_)
                | Query::User(U::AuthSelect(_) | U::QueueSelect(_) | U::DataSelect(_) | U::RevokedSelect(_))
        )
    }

    /// Bytes this question holds, for the mailbox bound.
    fn weight(&self) -> usize {
        use crate::users::UserQuery as U;
        match self {
            Query::Count(n) | Query::Members(n) | Query::Log(n) => n.len(),
            Query::Counts(v) | Query::Subscribers(v) | Query::History { names: v, .. } | Query::SettingsDelete(v) => {
                strs(v)
            }
            Query::HistoryDelete { names, ids } => strs(names) + ids.len() * 8,
            Query::SettingsSet(v) => strs(v.iter().map(|(n, _)| n)) + v.len() * 8,
            Query::SettingsSelect(v) => v.as_ref().map_or(0, strs),
            Query::User(q) => match q {
                U::AuthSet(v) | U::DataSet(v) => v.iter().map(|(_, s)| s.len() + 32).sum(),
                U::Send(v) => v.iter().map(|(_, e, m)| e.len() + m.len() + 56).sum(),
                U::AuthSelect(v)
                | U::AuthDelete(v)
                | U::QueueSelect(v)
                | U::QueueDelete(v)
                | U::Time(v)
                | U::DataSelect(v)
                | U::DataDelete(v) => v.len() * 8,
                U::Revoke(v) | U::Unrevoke(v) => v.iter().map(|s| s.len() + 24).sum(),
                U::RevokedSelect(v) => v.as_ref().map_or(0, |v| v.iter().map(|s| s.len() + 24).sum()),
                U::Status(_) | U::Data(_) => 0,
            },
        }
    }
}

impl Reply {
    /// Bytes this answer holds, for the mailbox bound.
    fn weight(&self) -> usize {
        match self {
            Reply::Count(_) => 0,
            Reply::Members(m) => m.iter().map(|(_, u)| u.len() + 32).sum(),
            Reply::Counts(c) => c.len() * 8,
            Reply::Log(l) => l.iter().map(|e| weigh::history_entry(&e.event, &e.message)).sum(),
            Reply::Records(r) | Reply::Charged(r, _) => r.weight(),
            Reply::Failed(e) => e.len(),
        }
    }
}

/// What one record weighs, for [`Records::weight`] and for the shards that
/// hold a reply to the bound of a backend connection's unread answers as
/// they build it (so that the two count alike).
pub mod weigh {
    /// A history entry: its texts and its fixed fields.
    pub fn history_entry(event: &str, message: &str) -> usize {
        event.len() + message.len() + 80
    }

    /// One user's offline queue: a slot, and each entry's texts.
    pub fn queue(q: &[crate::users::Queued]) -> usize {
        32 + q.iter().map(|m| m.event().len() + m.message().len() + 32).sum::<usize>()
    }

    /// A (user id, text) row: `users_auth`, `users_data`.
    pub fn text(t: &str) -> usize {
        t.len() + 32
    }

    /// A `users_in_pipes` row, from the lengths of its texts.
    pub fn subscriber(texts: usize) -> usize {
        texts + 160
    }

    /// A `pipes_settings` row: the channel's name and its length.
    pub fn setting(name: &str) -> usize {
        name.len() + 32
    }

    /// A `revoked_tokens` row.
    pub fn token(t: &str) -> usize {
        t.len() + 24
    }
}

impl Records {
    /// Bytes these records hold: their strings, plus a small constant per
    /// record for its fixed fields and the vector slot ([`weigh`]).
    pub fn weight(&self) -> usize {
        let texts = |v: &[(u64, String)]| v.iter().map(|(_, t)| weigh::text(t)).sum::<usize>();
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        match self {
            Records::None => 0,
            Records::History(h) => h
                .iter()
                .map(|c| {
                    c.channel.len()
                        + 40
                        + c.messages.iter().map(|m| weigh::history_entry(&m.event, &m.message)).sum::<usize>()
                })
                .sum(),
            Records::Subscribers(s) => s
                .iter()
                .map(|s| {
                    weigh::subscriber(
                        s.channel.len()
                            + s.uuid.len()
                            + s.ip.len()
                            + opt(&s.user_agent)
                            + opt(&s.origin)
                            + opt(&s.language),
                    )
                })
                .sum(),
            Records::Settings(v) => v.iter().map(|(n, _)| weigh::setting(n)).sum(),
            Records::Keys(v) | Records::Data(v) => texts(v),
            Records::Queues(v) => v.iter().map(|(_, q)| weigh::queue(q)).sum(),
            Records::Presences(v) => v.len() * 24,
            Records::Tokens(v) => v.iter().map(|t| weigh::token(t)).sum(),
            Records::TooBig(_) | Records::Busy { .. } => 16,
        }
    }

    /// Adds another shard's records to these, after them. Every shard
    /// answers one question with records of one kind, so the kinds match;
    /// `None` (no answer yet) takes whatever comes. A mismatch would be a
    /// bug: debug builds panic, release builds keep the first kind.
    pub fn append(&mut self, other: Records) {
        if matches!(self, Records::None) {
            *self = other;
            return;
        }
        match (self, other) {
            (_, Records::None) | (Records::TooBig(_), _) => {}
            (a, b @ Records::TooBig(_)) => *a = b,
            (Records::Busy { .. }, _) => {}
            (a, b @ Records::Busy { .. }) => *a = b,
            (Records::History(a), Records::History(b)) => a.extend(b),
            (Records::Subscribers(a), Records::Subscribers(b)) => a.extend(b),
            (Records::Settings(a), Records::Settings(b)) => a.extend(b),
            (Records::Keys(a), Records::Keys(b)) | (Records::Data(a), Records::Data(b)) => a.extend(b),
            (Records::Queues(a), Records::Queues(b)) => a.extend(b),
            (Records::Presences(a), Records::Presences(b)) => a.extend(b),
            (Records::Tokens(a), Records::Tokens(b)) => a.extend(b),
            (a, b) => debug_assert!(false, "one question answered with {} and {} records", a.kind(), b.kind()),
        }
    }

    /// The variant's name, for the message of a mismatch.
    fn kind(&self) -> &'static str {
        match self {
            Records::None => "no",
            Records::History(_) => "history",
            Records::Subscribers(_) => "subscriber",
            Records::Settings(_) => "settings",
            Records::Keys(_) => "key",
            Records::Data(_) => "user data",
            Records::Queues(_) => "offline queue",
            Records::Presences(_) => "presence",
            Records::Tokens(_) => "revoked token",
            Records::TooBig(_) => "too big",
            Records::Busy { .. } => "busy",
        }
    }
}

impl crate::mailbox::Weigh for Mail {
    /// Deterministic (sender and receiver compute it alike) and cheap: a
    /// publication counts its frame, which every destination keeps alive.
    fn weight(&self) -> usize {
        MAIL_BASE
            + match self {
                Mail::Deliver { publication, .. } => publication.frame.len() + publication.msg.data.len(),
                Mail::Ask { query, .. } => query.weight(),
                Mail::Reply { reply, .. } => reply.weight(),
                Mail::Handoff(h) => {
                    h.head.len()
                        + h.tls.as_ref().map_or(0, |t| std::mem::size_of::<crate::tls::TlsConn>() + t.buffered())
                }
            }
    }
}

/// A question asked of every shard about its part of the state.
#[derive(Debug)]
pub enum Query {
    /// Local subscribers of one channel.
    Count(Arc<str>),
    /// Local presence members of one channel.
    Members(Arc<str>),
    /// Local subscriber counts of several channels, in order.
    Counts(Vec<Arc<str>>),
    /// `users_in_pipes` rows of the local subscribers of these channels.
    Subscribers(Vec<Arc<str>>),
    /// `pipes_messages` rows of these channels (from their home shards):
    /// at most `rows` of each (a LIMIT's offset and count), the first
    /// `skip` of them (a LIMIT's offset, for one channel) as placeholders
    /// without their texts, which the LIMIT drops; and at most the bound
    /// of a backend connection's unread answers in all, or what is left of
    /// the process's answer memory if less ([`Records::TooBig`] or
    /// [`Records::Busy`] past them).
    History { names: Vec<Arc<str>>, rows: u64, skip: u64 },
    /// Clear these channels' history and remove entries with these ids.
    HistoryDelete { names: Vec<Arc<str>>, ids: Vec<u64> },
    /// Set history lengths (on the channels' home shards).
    SettingsSet(Vec<(Arc<str>, u32)>),
    /// `pipes_settings` rows, all or only these channels.
    SettingsSelect(Option<Vec<Arc<str>>>),
    /// Remove settings and history.
    SettingsDelete(Vec<Arc<str>>),
    /// A channel's history entries, for `pipe_log`.
    Log(Arc<str>),
    /// An operation on users homed on the receiving shard.
    User(crate::users::UserQuery),
}

/// An answer to a scattered question.
#[derive(Debug)]
pub enum Reply {
    /// Connections written to, subscribers counted, or rows affected.
    Count(u64),
    /// Presence members: (user_id, uuid).
    Members(Vec<(u64, String)>),
    /// Counts per asked channel, in order.
    Counts(Vec<u64>),
    /// History entries for `pipe_log`.
    Log(Vec<super::history::Entry>),
    /// Typed records: what a CometQL SELECT or a frontend user question
    /// asked for.
    Records(Records),
    /// Records as they travel: counted in the process's answer memory
    /// from the moment they were built ([`super::answer_memory`]).
    Charged(Records, Charge),
    /// The change was made in memory but could not be stored: why.
    Failed(Arc<str>),
}

/// Records a shard answers from its own state, typed by what they are.
/// They stay typed across shards and are merged by concatenation
/// ([`Records::append`]); only once all are in does the asker turn them
/// into a table's text rows (`cometql::rows`) or a frontend answer.
#[derive(Debug, Default)]
pub enum Records {
    /// Nothing gathered yet (or no shard was asked).
    #[default]
    None,
    /// `pipes_messages`: the history of the asked channels homed here.
    History(Vec<ChannelHistory>),
    /// `users_in_pipes`: the local subscribers of the asked channels.
    Subscribers(Vec<Subscriber>),
    /// `pipes_settings`: (channel, history length).
    Settings(Vec<(String, u32)>),
    /// `users_auth`: (user id, key) of the asked users that have one.
    Keys(Vec<(u64, String)>),
    /// `users_data` and the `user_data` command: (user id, data text) of
    /// the asked users that have some.
    Data(Vec<(u64, String)>),
    /// `users_messages`: (user id, offline queue, oldest first) of the
    /// asked users with queued messages.
    Queues(Vec<(u64, Vec<Queued>)>),
    /// `users_time` and the `user_status` command: (user id, presence).
    Presences(Vec<(u64, Presence)>),
    /// `revoked_tokens`: the revoked tokens asked for.
    Tokens(Vec<String>),
    /// A shard's part would have taken more than this many bytes, so it
    /// was not built.
    TooBig(usize),
    /// A shard's part would have passed `--answer-memory-limit` (`limit`
    /// bytes, `used` of them held when it was asked), so it was not built.
    Busy { used: usize, limit: usize },
}

/// A message between shards.
#[derive(Debug)]
pub enum Mail {
    /// Write to local subscribers; when `req` is set, answer with the count.
    Deliver { publication: Arc<Publication>, req: Option<(usize, u64)> },
    /// Answer a question about local state.
    Ask { dev_id: u32, query: Arc<Query>, req: (usize, u64) },
    /// The answer to request `req`.
    Reply { req: u64, reply: Reply },
    /// A connection whose user lives on the receiving shard.
    Handoff(Handoff),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::Weigh;

    fn data(v: &[(u64, &str)]) -> Records {
        Records::Data(v.iter().map(|(u, t)| (*u, t.to_string())).collect())
    }

    #[test]
    fn a_publication_is_compressed_once_per_variant() {
        let msg = |data: String| ChannelMessage {
            pipe: "web_z".into(),
            event: "e".into(),
            data,
            data_is_json: false,
            time: Some(1),
            user_id: None,
        };
        let p = Publication::new(0, msg("compressible text ".repeat(50)), None);
        let mut d = ws::deflate::Deflater::default();
        let a = p.deflated_frame(false, &mut d).unwrap().clone();
        let b = p.deflated_frame(false, &mut ws::deflate::Deflater::default()).unwrap();
        assert!(Arc::ptr_eq(&a, b), "the second subscriber (or shard) reuses the first compression");
        assert_eq!(a[0], 0xC1);
        assert!(a.len() < p.frame.len() / 4);
        let legacy = p.deflated_frame(true, &mut d).unwrap();
        assert!(!Arc::ptr_eq(&a, legacy));
        // Under the threshold: no compressed variant, every time.
        let small = Publication::new(0, msg("hi".into()), None);
        assert!(small.deflated_frame(false, &mut d).is_none());
        assert!(small.deflated_frame(false, &mut d).is_none());
    }

    #[test]
    fn records_from_several_shards_are_concatenated_in_arrival_order() {
        let mut gathered = Records::None;
        gathered.append(data(&[(1, "a")]));
        gathered.append(Records::None);
        gathered.append(data(&[(2, "b"), (3, "c")]));
        let Records::Data(v) = gathered else { panic!("{gathered:?}") };
        assert_eq!(v, [(1, "a".to_string()), (2, "b".to_string()), (3, "c".to_string())]);
    }

    #[test]
    fn a_reply_weighs_its_strings_plus_a_little_per_record() {
        let weigh = |r: Records| Mail::Reply { req: 1, reply: Reply::Records(r) }.weight();
        let empty = weigh(Records::None);
        let big = weigh(data(&[(1, &"x".repeat(100_000))]));
        assert!((100_000..100_000 + empty + 256).contains(&big), "{big}");
        let subscriber = Subscriber {
            channel: "web_a".into(),
            user_id: 1,
            uuid: "u".repeat(32),
            user_agent: Some("y".repeat(5000)),
            ip: "127.0.0.1".into(),
            origin: None,
            language: None,
        };
        let many = weigh(Records::Subscribers(vec![subscriber; 10]));
        assert!(many >= 10 * (5000 + 32), "{many}");
        let history = ChannelHistory {
            channel: "web_h".into(),
            messages: vec![
                crate::cometql::rows::StoredMessage {
                    id: 1,
                    time: 2,
                    event: "e".into(),
                    message: "z".repeat(70_000),
                    user_id: None,
                };
                3
            ],
        };
        assert!(weigh(Records::History(vec![history])) >= 3 * 70_000);
    }
}
