//! The CometQL tables' rows: typed records in, text rows out, one function
//! per table, each writing its values in the column order [`tables`]
//! declares. This is the only place that order is spelled out; the shards
//! answer each other with the typed records (`shard::mail::Records`) and the
//! shard glue picks the function here once every shard has answered.
//!
//! The records the shards have no type of their own for ([`Subscriber`],
//! [`ChannelHistory`]) are defined here rather than in `shard`, so that this
//! sans-IO layer never depends on the shard layer that drives it.
//!
//! What does not live here: which columns a SELECT keeps and its LIMIT
//! ([`super::exec::Projection`]), and the MySQL encoding of the rows
//! ([`super::packet`]).
//!
//! [`tables`]: super::tables

use std::sync::Arc;

use crate::users::{Presence, Queued};

/// One result row: a text value or NULL per column of the table.
pub type TextRow = Vec<Option<String>>;

/// One `users_in_pipes` record: a connection subscribed to a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscriber {
    pub channel: Arc<str>,
    /// 0 for an anonymous connection.
    pub user_id: u64,
    pub uuid: String,
    /// The request's `User-Agent`; `None` (NULL) for a connection that has
    /// no handshake details (kept once its WebSocket upgrade is done).
    pub user_agent: Option<String>,
    /// The client address: forwarded by a trusted proxy, else the peer's.
    pub ip: String,
    /// The request's `Origin`; `None` as for `user_agent`.
    pub origin: Option<String>,
    /// The request's `Accept-Language`; `None` as for `user_agent`.
    pub language: Option<String>,
}

/// A message kept in a channel's history, as `pipes_messages` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: u64,
    /// Unix time it was published.
    pub time: i64,
    pub event: String,
    pub message: String,
    /// The browser sender's id; `None` (NULL) for a backend publish.
    pub user_id: Option<u64>,
}

/// One channel's history, oldest first: a message's position here is its
/// `index` column, so the index needs no field of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelHistory {
    pub channel: Arc<str>,
    pub messages: Vec<StoredMessage>,
}

/// `pipes_messages`: `id, time, name, index, event, message, user_id`.
pub fn pipes_messages(history: Vec<ChannelHistory>) -> Vec<TextRow> {
    let mut rows = Vec::with_capacity(history.iter().map(|h| h.messages.len()).sum());
    for h in history {
        for (index, m) in h.messages.into_iter().enumerate() {
            rows.push(vec![
                Some(m.id.to_string()),
                Some(m.time.to_string()),
                Some(h.channel.to_string()),
                Some(index.to_string()),
                Some(m.event),
                Some(m.message),
                m.user_id.map(|u| u.to_string()),
            ]);
        }
    }
    rows
}

/// `pipes`: `name, users`, one row per asked channel; `counts[i]` is the
/// subscriber count of `names[i]` (0 when missing).
pub fn pipes(names: Vec<String>, counts: &[u64]) -> Vec<TextRow> {
    names
        .into_iter()
        .enumerate()
        .map(|(i, name)| vec![Some(name), Some(counts.get(i).copied().unwrap_or(0).to_string())])
        .collect()
}

/// `users_in_pipes`: `name, user_id, user_uuid, user_agent, ip, origin, language`.
pub fn users_in_pipes(subscribers: Vec<Subscriber>) -> Vec<TextRow> {
    subscribers
        .into_iter()
        .map(|s| {
            vec![
                Some(s.channel.to_string()),
                Some(s.user_id.to_string()),
                Some(s.uuid),
                s.user_agent,
                Some(s.ip),
                s.origin,
                s.language,
            ]
        })
        .collect()
}

/// `pipes_settings`: `name, length`, from (channel, history length).
pub fn pipes_settings(settings: Vec<(String, u32)>) -> Vec<TextRow> {
    settings.into_iter().map(|(name, length)| vec![Some(name), Some(length.to_string())]).collect()
}

/// `users_messages`: `id, index, event, message`, from each user's offline
/// queue, oldest first (the position is the `index` column).
pub fn users_messages(queues: Vec<(u64, Vec<Queued>)>) -> Vec<TextRow> {
    let mut rows = Vec::with_capacity(queues.iter().map(|(_, q)| q.len()).sum());
    for (user_id, queue) in queues {
        for (index, m) in queue.iter().enumerate() {
            rows.push(vec![
                Some(user_id.to_string()),
                Some(index.to_string()),
                Some(m.event().to_string()),
                Some(m.message().to_string()),
            ]);
        }
    }
    rows
}

/// `users_auth`: `id, hash`, from (user id, key).
pub fn users_auth(keys: Vec<(u64, String)>) -> Vec<TextRow> {
    id_text(keys)
}

/// `users_time`: `id, time`; the time is 0 online, the unix time the user
/// went offline, or -1 unknown ([`Presence::time`]).
pub fn users_time(presences: Vec<(u64, Presence)>) -> Vec<TextRow> {
    presences.into_iter().map(|(u, p)| vec![Some(u.to_string()), Some(p.time().to_string())]).collect()
}

/// `users_data`: `id, data`, from (user id, data text).
pub fn users_data(data: Vec<(u64, String)>) -> Vec<TextRow> {
    id_text(data)
}

/// `revoked_tokens`: `token`.
pub fn revoked_tokens(tokens: Vec<String>) -> Vec<TextRow> {
    tokens.into_iter().map(|t| vec![Some(t)]).collect()
}

/// The two-column tables keyed by user id whose second column is text.
fn id_text(v: Vec<(u64, String)>) -> Vec<TextRow> {
    v.into_iter().map(|(u, text)| vec![Some(u.to_string()), Some(text)]).collect()
}

#[cfg(test)]
mod tests {
    use super::super::tables;
    use super::*;

    /// The rows of `table` as (column name, value) pairs, checking that
    /// every row has exactly the table's columns.
    fn named(table: &str, rows: Vec<TextRow>) -> Vec<Vec<(&'static str, Option<String>)>> {
        let t = tables::find(table).unwrap();
        rows.into_iter()
            .map(|r| {
                assert_eq!(r.len(), t.columns.len(), "{table}: a row has one value per column: {r:?}");
                t.columns.iter().copied().zip(r).collect()
            })
            .collect()
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn pipes_messages_in_column_order_with_index_per_channel_and_null_user_for_backend_publishes() {
        let m = |id, user_id| StoredMessage { id, time: 1700, event: "ev".into(), message: "hi".into(), user_id };
        let rows = pipes_messages(vec![
            ChannelHistory { channel: "web_a".into(), messages: vec![m(3, None), m(5, Some(12))] },
            ChannelHistory { channel: "web_b".into(), messages: vec![m(4, None)] },
        ]);
        assert_eq!(
            named("pipes_messages", rows),
            [
                [
                    ("id", s("3")),
                    ("time", s("1700")),
                    ("name", s("web_a")),
                    ("index", s("0")),
                    ("event", s("ev")),
                    ("message", s("hi")),
                    ("user_id", None),
                ],
                [
                    ("id", s("5")),
                    ("time", s("1700")),
                    ("name", s("web_a")),
                    ("index", s("1")),
                    ("event", s("ev")),
                    ("message", s("hi")),
                    ("user_id", s("12")),
                ],
                [
                    ("id", s("4")),
                    ("time", s("1700")),
                    ("name", s("web_b")),
                    ("index", s("0")),
                    ("event", s("ev")),
                    ("message", s("hi")),
                    ("user_id", None),
                ],
            ]
        );
    }

    #[test]
    fn pipes_counts_every_asked_channel() {
        let rows = pipes(vec!["web_a".into(), "web_b".into()], &[7]);
        assert_eq!(
            named("pipes", rows),
            [[("name", s("web_a")), ("users", s("7"))], [("name", s("web_b")), ("users", s("0"))]]
        );
    }

    #[test]
    fn users_in_pipes_has_null_request_details_when_none_were_kept() {
        let rows = users_in_pipes(vec![
            Subscriber {
                channel: "web_a".into(),
                user_id: 9,
                uuid: "u-1".into(),
                user_agent: s("Firefox"),
                ip: "10.0.0.1".into(),
                origin: s("https://x"),
                language: s("fr"),
            },
            Subscriber {
                channel: "web_a".into(),
                user_id: 0,
                uuid: "u-2".into(),
                user_agent: None,
                ip: "::1".into(),
                origin: None,
                language: None,
            },
        ]);
        assert_eq!(
            named("users_in_pipes", rows),
            [
                [
                    ("name", s("web_a")),
                    ("user_id", s("9")),
                    ("user_uuid", s("u-1")),
                    ("user_agent", s("Firefox")),
                    ("ip", s("10.0.0.1")),
                    ("origin", s("https://x")),
                    ("language", s("fr")),
                ],
                [
                    ("name", s("web_a")),
                    ("user_id", s("0")),
                    ("user_uuid", s("u-2")),
                    ("user_agent", None),
                    ("ip", s("::1")),
                    ("origin", None),
                    ("language", None),
                ],
            ]
        );
    }

    #[test]
    fn pipes_settings_name_then_length() {
        assert_eq!(
            named("pipes_settings", pipes_settings(vec![("web_h".into(), 10)])),
            [[("name", s("web_h")), ("length", s("10"))]]
        );
    }

    #[test]
    fn users_messages_index_each_users_queue_from_zero() {
        let q = |m: &str| Queued::new(5, "ev", m);
        let rows = users_messages(vec![(3, vec![q("a"), q("b")]), (4, vec![q("c")])]);
        assert_eq!(
            named("users_messages", rows),
            [
                [("id", s("3")), ("index", s("0")), ("event", s("ev")), ("message", s("a"))],
                [("id", s("3")), ("index", s("1")), ("event", s("ev")), ("message", s("b"))],
                [("id", s("4")), ("index", s("0")), ("event", s("ev")), ("message", s("c"))],
            ]
        );
    }

    #[test]
    fn user_tables_id_first() {
        assert_eq!(named("users_auth", users_auth(vec![(1, "h4sh".into())])), [[("id", s("1")), ("hash", s("h4sh"))]]);
        assert_eq!(named("users_data", users_data(vec![(2, "{}".into())])), [[("id", s("2")), ("data", s("{}"))]]);
        assert_eq!(
            named(
                "users_time",
                users_time(vec![(1, Presence::Online), (2, Presence::Offline(99)), (3, Presence::Unknown)])
            ),
            [
                [("id", s("1")), ("time", s("0"))],
                [("id", s("2")), ("time", s("99"))],
                [("id", s("3")), ("time", s("-1"))],
            ]
        );
        assert_eq!(named("revoked_tokens", revoked_tokens(vec!["t.o.k".into()])), [[("token", s("t.o.k"))]]);
    }
}
