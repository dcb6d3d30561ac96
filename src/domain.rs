//! The bottom layer: small domain types and helpers that every other layer
//! may use. This module imports nothing from the crate, so depending on it
//! can never close a module cycle.
//!
//! What lives here: [`ConnId`] (how a connection is named across shards),
//! [`ct_eq`] (secret comparison), [`clip`] (how a client value is quoted in
//! an error), and channel names with their [`ChannelKind`] parsed once
//! (docs/protocol.md, "Channels"). What does not: anything with state, I/O or a wire
//! encoding; those belong to the layers above.

use std::fmt;

/// Names one connection on one shard: a slab index plus the slot's
/// generation, so an id that outlived its connection misses instead of
/// reaching the next connection that got the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub index: u32,
    pub generation: u32,
}

/// A client's address, packed: every connection keeps one, and
/// `SocketAddr` spends 32 bytes on flow info and scope ids no client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    ip: std::net::IpAddr,
    port: u16,
}

impl Peer {
    pub fn ip(&self) -> std::net::IpAddr {
        self.ip
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.ip, self.port)
    }
}

impl From<std::net::SocketAddr> for Peer {
    fn from(a: std::net::SocketAddr) -> Peer {
        Peer { ip: a.ip(), port: a.port() }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr().fmt(f)
    }
}

/// Constant-time equality: no early exit on the first difference, so the
/// time taken does not tell an attacker how much of a key or scramble was
/// right. Lengths are not secret (a length mismatch returns at once).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Characters of a client value an error message quotes before cutting.
pub const CLIP_CHARS: usize = 256;

/// A client value quoted for an error message: see [`clip`].
#[derive(Debug, Clone, Copy)]
pub struct Clipped<'a>(&'a str);

/// Quotes a client value for an error message, cut to [`CLIP_CHARS`]
/// characters.
///
/// Errors name the offending value (STYLE.md), but a hostile client sends
/// values of megabytes, and echoing them whole makes every error as large
/// as the attack (a 16 MiB value even split one ERR over two packets). So a
/// value of up to 256 characters is shown whole as `'value'`, and a longer
/// one as its first 256 characters, `...` and its length in bytes:
/// `'aaaa...' (4194304 bytes)`. The cut falls on a character boundary. The
/// marker is ASCII so that it reads the same whatever character set the
/// client declared.
pub fn clip(value: &str) -> Clipped<'_> {
    Clipped(value)
}

impl Clipped<'_> {
    /// The part of the value that is shown.
    pub fn shown(&self) -> &str {
        match self.0.char_indices().nth(CLIP_CHARS) {
            Some((cut, _)) => &self.0[..cut],
            None => self.0,
        }
    }

    /// Whether the value was cut.
    pub fn is_cut(&self) -> bool {
        self.shown().len() < self.0.len()
    }
}

impl fmt::Display for Clipped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = self.shown();
        if shown.len() < self.0.len() {
            write!(f, "'{shown}...' ({} bytes)", self.0.len())
        } else {
            write!(f, "'{shown}'")
        }
    }
}

/// Shortest channel name (docs/protocol.md, "Channels"; CometQL asks for 3, see
/// `cometql::exec::check_channel`).
pub const MIN_CHANNEL_LEN: usize = 2;
/// Longest channel name.
pub const MAX_CHANNEL_LEN: usize = 64;

/// Characters allowed in channel (and event) names: `[A-Za-z0-9_-]`.
pub fn is_name_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Why a string is not a channel name. It borrows the name, so refusing a
/// 4 MiB name copies nothing; the messages quote it through [`clip`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelError<'a> {
    /// Shorter than [`MIN_CHANNEL_LEN`].
    TooShort(&'a str),
    /// Longer than [`MAX_CHANNEL_LEN`].
    TooLong(&'a str),
    /// A character outside `[A-Za-z0-9_-]`.
    BadChar(&'a str),
}

impl fmt::Display for ChannelError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelError::TooShort(n) => {
                write!(f, "Channel name {} is shorter than {MIN_CHANNEL_LEN} characters", clip(n))
            }
            ChannelError::TooLong(n) => {
                write!(f, "Channel name {} is longer than {MAX_CHANNEL_LEN} characters", clip(n))
            }
            ChannelError::BadChar(n) => write!(f, "Channel name {} may contain only A-Za-z0-9_-", clip(n)),
        }
    }
}

impl std::error::Error for ChannelError<'_> {}

/// What a channel name means (docs/protocol.md, "Channels"), decided by its prefix once
/// instead of by `starts_with` at every place that cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// `web_*`: browsers may publish; `pipe_count` allowed.
    Web,
    /// `webauth_*`: only authorized browsers may publish.
    WebAuth,
    /// `track_*`: presence events; `pipe_count` and `track_pipe_users` allowed.
    Track,
    /// `trust_*`: every message is kept in history without a setting.
    Trust,
    /// `private_*`: anonymous connections cannot subscribe.
    Private,
    /// `user_status_<id>`: the server publishes `online`/`offline` of user
    /// `<id>`. Only the form the server itself writes counts (a positive
    /// decimal id without leading zeros); anything else is [`Plain`](Self::Plain),
    /// since no event would ever reach it.
    UserStatus(u64),
    /// `_answer*`: server-to-client replies only.
    Answer,
    /// `sys`: server-to-client errors only.
    Sys,
    /// `msg`: not a channel, the private messages of the connection's user.
    Msg,
    /// Any other name: public; only the backend publishes.
    Plain,
}

impl ChannelKind {
    /// The kind of `name`, from its prefix. It does not check that the name
    /// is valid: see [`check_channel`].
    pub fn of(name: &str) -> ChannelKind {
        if name == "sys" {
            ChannelKind::Sys
        } else if name == "msg" {
            ChannelKind::Msg
        } else if name.starts_with("_answer") {
            ChannelKind::Answer
        } else if name.starts_with("web_") {
            ChannelKind::Web
        } else if name.starts_with("webauth_") {
            ChannelKind::WebAuth
        } else if name.starts_with("track_") {
            ChannelKind::Track
        } else if name.starts_with("trust_") {
            ChannelKind::Trust
        } else if name.starts_with("private_") {
            ChannelKind::Private
        } else if let Some(id) = name.strip_prefix("user_status_").and_then(canonical_id) {
            ChannelKind::UserStatus(id)
        } else {
            ChannelKind::Plain
        }
    }

    /// Names only the server writes to (`sys`, `_answer*`) or that are not
    /// channels at all (`msg`): nobody subscribes to or publishes on them.
    pub fn is_reserved(self) -> bool {
        matches!(self, ChannelKind::Sys | ChannelKind::Msg | ChannelKind::Answer)
    }

    /// Whether browsers may publish with `web_pipe2` (docs/protocol.md); `WebAuth` also
    /// needs an authorized connection.
    pub fn browser_may_publish(self) -> bool {
        matches!(self, ChannelKind::Web | ChannelKind::WebAuth)
    }

    /// Whether the frontend's `pipe_count` is allowed.
    pub fn allows_pipe_count(self) -> bool {
        matches!(self, ChannelKind::Web | ChannelKind::Track)
    }
}

/// A user id as the server formats it: decimal, positive, no sign, no
/// leading zero.
fn canonical_id(s: &str) -> Option<u64> {
    if s.is_empty() || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Checks a channel name (2..64 characters of `[A-Za-z0-9_-]`) and returns
/// its kind. At most 65 bytes are looked at, so a huge name costs nothing to
/// refuse; the characters are checked before the length so that "longer
/// than 64 characters" is never said of 40 two-byte characters.
pub fn check_channel(name: &str) -> Result<ChannelKind, ChannelError<'_>> {
    let head = &name.as_bytes()[..name.len().min(MAX_CHANNEL_LEN + 1)];
    if !head.iter().all(|&b| is_name_char(b)) {
        return Err(ChannelError::BadChar(name));
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong(name));
    }
    if name.len() < MIN_CHANNEL_LEN {
        return Err(ChannelError::TooShort(name));
    }
    Ok(ChannelKind::of(name))
}

/// Whether `name` is a valid channel name (2..64 characters of `[A-Za-z0-9_-]`).
pub fn is_valid_channel(name: &str) -> bool {
    check_channel(name).is_ok()
}

/// The hidden-sender form of a browser publish (docs/protocol.md): `@web_NAME` publishes
/// to `web_NAME` with `user_id` 0. Returns the channel name and whether the
/// sender is hidden; the `@` is accepted only before `web_`, so `@track_x`
/// comes back unchanged (and then fails the name check).
pub fn publish_target(name: &str) -> (&str, bool) {
    match name.strip_prefix('@') {
        Some(rest) if rest.starts_with("web_") => (rest, true),
        _ => (name, false),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn peer_keeps_address_and_port() {
        for a in ["203.0.113.9:8087", "[2001:db8::1]:443"] {
            let addr: std::net::SocketAddr = a.parse().unwrap();
            let p = super::Peer::from(addr);
            assert_eq!((p.addr(), p.ip(), p.to_string()), (addr, addr.ip(), a.to_string()));
        }
        assert!(std::mem::size_of::<super::Peer>() <= 20);
    }

    use super::*;

    #[test]
    fn ct_eq_compares_whole_slices() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"Secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secret1"));
    }

    #[test]
    fn short_values_are_quoted_whole() {
        assert_eq!(clip("a b").to_string(), "'a b'");
        assert_eq!(clip("").to_string(), "''");
        let exact = "x".repeat(CLIP_CHARS);
        assert_eq!(clip(&exact).to_string(), format!("'{exact}'"));
        assert!(!clip(&exact).is_cut());
    }

    #[test]
    fn long_values_are_cut_with_their_length() {
        let big = "a".repeat(4 << 20);
        let s = clip(&big).to_string();
        assert_eq!(s, format!("'{}...' (4194304 bytes)", "a".repeat(CLIP_CHARS)));
        let one_over = "y".repeat(CLIP_CHARS + 1);
        assert_eq!(clip(&one_over).to_string(), format!("'{}...' (257 bytes)", "y".repeat(CLIP_CHARS)));
    }

    #[test]
    fn cutting_counts_characters_and_keeps_them_whole() {
        // 300 three-byte characters: 256 are shown, none split.
        let wide = "✓".repeat(300);
        let c = clip(&wide);
        assert!(c.is_cut());
        assert_eq!(c.shown().chars().count(), CLIP_CHARS);
        assert_eq!(c.shown().len(), CLIP_CHARS * 3);
        assert_eq!(c.to_string(), format!("'{}...' (900 bytes)", "✓".repeat(CLIP_CHARS)));
        // 256 multi-byte characters are more than 256 bytes but not cut.
        let fits = "é".repeat(CLIP_CHARS);
        assert!(!clip(&fits).is_cut());
    }

    #[test]
    fn kinds_of_each_prefix() {
        let cases = [
            ("web_chat", ChannelKind::Web),
            ("webauth_room", ChannelKind::WebAuth),
            ("track_online", ChannelKind::Track),
            ("trust_log", ChannelKind::Trust),
            ("private_x", ChannelKind::Private),
            ("user_status_12", ChannelKind::UserStatus(12)),
            ("user_status_18446744073709551615", ChannelKind::UserStatus(u64::MAX)),
            ("_answer", ChannelKind::Answer),
            ("_answer_to_web_chat", ChannelKind::Answer),
            ("sys", ChannelKind::Sys),
            ("msg", ChannelKind::Msg),
            ("simplechat", ChannelKind::Plain),
            // Near misses are plain channels.
            ("web", ChannelKind::Plain),
            ("Web_chat", ChannelKind::Plain),
            ("webauth", ChannelKind::Plain),
            ("system", ChannelKind::Plain),
            ("msgs", ChannelKind::Plain),
            ("answer", ChannelKind::Plain),
            ("user_status_", ChannelKind::Plain),
            ("user_status_0", ChannelKind::Plain),
            ("user_status_007", ChannelKind::Plain),
            ("user_status_12a", ChannelKind::Plain),
            ("user_status_-1", ChannelKind::Plain),
            ("user_status_18446744073709551616", ChannelKind::Plain),
        ];
        for (name, kind) in cases {
            assert_eq!(ChannelKind::of(name), kind, "{name}");
        }
    }

    #[test]
    fn kind_properties() {
        for k in [ChannelKind::Sys, ChannelKind::Msg, ChannelKind::Answer] {
            assert!(k.is_reserved(), "{k:?}");
        }
        assert!(!ChannelKind::Web.is_reserved());
        assert!(ChannelKind::Web.browser_may_publish() && ChannelKind::WebAuth.browser_may_publish());
        assert!(!ChannelKind::Track.browser_may_publish() && !ChannelKind::Plain.browser_may_publish());
        assert!(ChannelKind::Web.allows_pipe_count() && ChannelKind::Track.allows_pipe_count());
        assert!(!ChannelKind::WebAuth.allows_pipe_count() && !ChannelKind::Plain.allows_pipe_count());
    }

    #[test]
    fn channel_names_are_checked_for_length_and_characters() {
        assert_eq!(check_channel("ab"), Ok(ChannelKind::Plain));
        assert_eq!(check_channel(&format!("web_{}", "x".repeat(60))), Ok(ChannelKind::Web));
        assert_eq!(check_channel("a-b_C9"), Ok(ChannelKind::Plain));
        assert_eq!(check_channel("a"), Err(ChannelError::TooShort("a")));
        assert_eq!(check_channel(""), Err(ChannelError::TooShort("")));
        let long = "x".repeat(65);
        assert_eq!(check_channel(&long), Err(ChannelError::TooLong(&long)));
        assert_eq!(check_channel("a b"), Err(ChannelError::BadChar("a b")));
        assert_eq!(check_channel("@web_x"), Err(ChannelError::BadChar("@web_x")));
        assert_eq!(check_channel("мир"), Err(ChannelError::BadChar("мир")));
        let wide = "ж".repeat(40);
        assert_eq!(check_channel(&wide), Err(ChannelError::BadChar(&wide)), "80 bytes but 40 characters");
        let late = format!("{} x", "a".repeat(70));
        assert_eq!(check_channel(&late), Err(ChannelError::TooLong(&late)), "only 65 bytes are looked at");
        assert!(is_valid_channel("web_chat"));
        assert!(!is_valid_channel("web chat"));
        assert_eq!(check_channel("a b").unwrap_err().to_string(), "Channel name 'a b' may contain only A-Za-z0-9_-");
        // A huge name is refused by length and its message stays small.
        let huge = "a".repeat(4 << 20);
        let msg = check_channel(&huge).unwrap_err().to_string();
        assert!(msg.len() < 400 && msg.contains("(4194304 bytes)"), "{}", msg.len());
    }

    #[test]
    fn hidden_sender_form() {
        assert_eq!(publish_target("@web_chat"), ("web_chat", true));
        assert_eq!(publish_target("web_chat"), ("web_chat", false));
        assert_eq!(publish_target("@webauth_x"), ("@webauth_x", false));
        assert_eq!(publish_target("@track_x"), ("@track_x", false));
        assert_eq!(publish_target("@"), ("@", false));
    }
}
