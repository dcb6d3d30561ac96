//! Client → server commands (docs/protocol.md, "Commands").
//!
//! A command is a word, `\n`, then `\n`-separated arguments. Parsing borrows
//! from the message bytes and never fails: what it cannot read becomes
//! [`Command::Unknown`] or a named problem the connection reports as an
//! `error` frame.

use super::channel_names;

/// One parsed client command; channel names are still wire names (`pipe`).
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// `subscription`: the complete new subscription set (raw pieces; the
    /// shard checks lengths, kinds and the limit).
    Subscribe(Vec<&'a str>),
    /// `web_pipe2`: a browser publish.
    WebPipe { pipe: &'a str, event: &'a str, message: &'a str },
    /// `pipe_log`: the channel's history.
    PipeLog { pipe: &'a str, marker: &'a str },
    /// `pipe_count`: subscriber count of a `web_`/`track_` channel.
    PipeCount { pipe: &'a str, marker: &'a str },
    /// `track_pipe_users`: the presence list of a `track_` channel.
    TrackPipeUsers { pipe: &'a str, marker: &'a str },
    /// `user_data`: a user's data text.
    UserData { marker: &'a str, user_id: &'a str },
    /// `user_status`: a user's last-online time.
    UserStatus { user_id: &'a str },
    /// `statistics`: accepted and ignored.
    Statistics,
    /// Anything else: answered with an `error` frame, connection kept.
    Unknown(&'a str),
}

/// Parses one client text message.
pub fn parse(text: &str) -> Command<'_> {
    let (word, rest) = text.split_once('\n').unwrap_or((text, ""));
    let word = word.trim_end_matches('\r');
    let mut args = rest.split('\n');
    let mut next = || args.next().unwrap_or("").trim_end_matches('\r');
    match word {
        "subscription" => Command::Subscribe(channel_names(rest).collect()),
        "web_pipe2" => {
            let mut parts = rest.splitn(4, '\n');
            let pipe = parts.next().unwrap_or("");
            let event = parts.next().unwrap_or("");
            let _auth = parts.next();
            let message = parts.next().unwrap_or("");
            Command::WebPipe { pipe, event, message }
        }
        "pipe_log" => {
            let pipe = next();
            Command::PipeLog { pipe, marker: next() }
        }
        "pipe_count" => {
            let pipe = next();
            Command::PipeCount { pipe, marker: next() }
        }
        "track_pipe_users" => {
            let pipe = next();
            Command::TrackPipeUsers { pipe, marker: next() }
        }
        "user_data" => {
            let marker = next();
            Command::UserData { marker, user_id: next() }
        }
        "user_status" => Command::UserStatus { user_id: next() },
        "statistics" => Command::Statistics,
        other => Command::Unknown(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_splits_on_any_foreign_character() {
        assert_eq!(
            parse("subscription\nweb_chat\ntrack_x,msg.event  news\n\n"),
            Command::Subscribe(vec!["web_chat", "track_x", "msg", "event", "news"])
        );
        assert_eq!(parse("subscription\n"), Command::Subscribe(vec![]));
        assert_eq!(parse("subscription\nа_b"), Command::Subscribe(vec!["_b"]));
    }

    #[test]
    fn web_pipe2_message_keeps_its_newlines() {
        assert_eq!(
            parse("web_pipe2\nweb_chat\nev\n*\nline1\nline2"),
            Command::WebPipe { pipe: "web_chat", event: "ev", message: "line1\nline2" }
        );
    }

    #[test]
    fn queries_with_markers() {
        assert_eq!(parse("pipe_log\nweb_x\nm1\n"), Command::PipeLog { pipe: "web_x", marker: "m1" });
        assert_eq!(parse("pipe_count\ntrack_y\nm2\n"), Command::PipeCount { pipe: "track_y", marker: "m2" });
        assert_eq!(parse("track_pipe_users\ntrack_y\nm3"), Command::TrackPipeUsers { pipe: "track_y", marker: "m3" });
        assert_eq!(parse("user_data\nm4\n15"), Command::UserData { marker: "m4", user_id: "15" });
        assert_eq!(parse("user_status\n15"), Command::UserStatus { user_id: "15" });
        assert_eq!(parse("statistics\n{\"a\":1}"), Command::Statistics);
    }

    #[test]
    fn anything_else_is_unknown() {
        assert_eq!(parse("hello"), Command::Unknown("hello"));
        assert_eq!(parse(""), Command::Unknown(""));
    }
}
