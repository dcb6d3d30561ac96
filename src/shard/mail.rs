//! What shards say to each other through their mailboxes.
//!
//! A publish is encoded once on the shard where it starts: the WebSocket
//! frame bytes live in an `Arc<[u8]>` that every shard writes, unchanged, to
//! each of its local subscribers. Questions that need every shard's answer
//! (how many were reached, who is subscribed) carry a request id and the
//! asking shard; the answers come back as [`Mail::Reply`] and are gathered in
//! `Shard::pending`.

use std::sync::{Arc, OnceLock};

use socket2::Socket;

use crate::frontend::message::{ChannelMessage, Delivery};
use crate::ws;

use super::ConnId;

/// A channel message ready to be written: encoded once, shared by all shards.
#[derive(Debug)]
pub struct Publication {
    pub dev_id: u32,
    pub msg: ChannelMessage,
    /// The WebSocket text frame for clients of API major version >= 4.
    pub frame: Arc<[u8]>,
    /// The frame with `event_name`, for older clients; built on first need.
    legacy: OnceLock<Arc<[u8]>>,
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
        Publication { dev_id, msg, frame, legacy: OnceLock::new(), exclude, store }
    }

    /// The frame for a client that wants `event_name` too.
    pub fn legacy_frame(&self) -> &Arc<[u8]> {
        self.legacy.get_or_init(|| {
            encode_text_frame(|out| {
                self.msg.encode(Delivery { legacy: true, history_marker: None, from_queue: false }, out)
            })
        })
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
}

/// Weight of a message before its variable parts: the enum and its boxes.
const MAIL_BASE: usize = 64;

fn strs<'a>(v: impl IntoIterator<Item = &'a Arc<str>>) -> usize {
    v.into_iter().map(|s| s.len() + 16).sum()
}

impl Query {
    /// Bytes this question holds, for the mailbox bound.
    fn weight(&self) -> usize {
        use crate::users::UserQuery as U;
        match self {
            Query::Count(n) | Query::Members(n) | Query::Log(n) => n.len(),
            Query::Counts(v) | Query::Subscribers(v) | Query::History(v) | Query::SettingsDelete(v) => strs(v),
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
            Reply::Rows(rows) => rows.iter().flatten().map(|c| c.as_ref().map_or(0, String::len) + 24).sum(),
            Reply::Log(l) => l.iter().map(|e| e.event.len() + e.message.len() + 80).sum(),
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
                Mail::Handoff(h) => h.head.len(),
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
    /// `pipes_messages` rows of these channels (from their home shards).
    History(Vec<Arc<str>>),
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

/// A row of text values (a CometQL result row).
pub type Row = Vec<Option<String>>;

/// An answer to a scattered question.
#[derive(Debug)]
pub enum Reply {
    /// Connections written to, subscribers counted, or rows affected.
    Count(u64),
    /// Presence members: (user_id, uuid).
    Members(Vec<(u64, String)>),
    /// Counts per asked channel, in order.
    Counts(Vec<u64>),
    /// Result rows.
    Rows(Vec<Row>),
    /// History entries for `pipe_log`.
    Log(Vec<super::history::Entry>),
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
