//! Connection parameters from the upgrade URL (docs/protocol.md, "Connecting").
//!
//! CppComet read them by position; comet reads them by name, from either the
//! path form `/ws/sesion=..&myid=..` or a query string `/ws?sesion=..`, under
//! the `/ws` and `/comet-server/ws` prefixes with one or two leading slashes.
//!
//! `subscription` is comet's own: the channels to join with the upgrade
//! (`subscription=news,web_chat`), so that a client needs no `subscription`
//! command after `serverInfo` and the server no second wake-up for it.
//! CppComet clients never send it.

/// What the client said about itself when it connected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectParams {
    /// `sesion`: the user's key (stored hash or JWT); may be empty.
    pub key: String,
    /// `myid`: 0 means anonymous (missing, empty, 0 or not a number).
    pub user_id: u64,
    /// `devid`: tenant; missing or invalid means 0.
    pub dev_id: u32,
    /// Major version from `v`; `None` when `v` is missing or unreadable.
    pub api_major: Option<u32>,
    /// `uuid`: up to 32 characters of `[A-Za-z0-9_-]`, else empty.
    pub uuid: String,
    /// `subscription`: the channels to join at once, as the `subscription`
    /// command lists them (split by [`super::channel_names`]); empty when
    /// absent. Bounded by the request head (`ws::handshake::MAX_HEAD`).
    pub subscription: String,
}

/// The path prefixes under which the WebSocket endpoint lives.
const WS_PREFIXES: [&str; 4] = ["//comet-server/ws", "/comet-server/ws", "//ws", "/ws"];

/// If `path` is a comet WebSocket path, returns its parameter string.
pub fn ws_params(path: &str) -> Option<&str> {
    for p in WS_PREFIXES {
        if let Some(rest) = path.strip_prefix(p) {
            if rest.is_empty() {
                return Some("");
            }
            if let Some(r) = rest.strip_prefix('/').or_else(|| rest.strip_prefix('?')) {
                return Some(r.strip_prefix('?').unwrap_or(r));
            }
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the parameter string returned by [`ws_params`].
pub fn parse_params(params: &str) -> ConnectParams {
    let mut p = ConnectParams::default();
    for pair in params.split(['&', '?']) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match name {
            "sesion" => p.key = value,
            "myid" => p.user_id = value.trim().parse().unwrap_or(0),
            "devid" => p.dev_id = value.trim().parse().unwrap_or(0),
            "v" => {
                p.api_major = value.split('.').next().and_then(|m| m.trim().parse().ok());
            }
            "uuid"
                if value.len() <= 32 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
            {
                p.uuid = value;
            }
            "subscription" => p.subscription = value,
            _ => {}
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_path_forms_are_recognised() {
        for path in [
            "/ws/sesion=k&myid=1&devid=0&v=4.08&uuid=abc&api=js",
            "//ws/sesion=k&myid=1&devid=0&v=4.08&uuid=abc&api=js",
            "/comet-server/ws/sesion=k&myid=1&devid=0&v=4.08&uuid=abc&api=js",
            "//comet-server/ws/sesion=k&myid=1&devid=0&v=4.08&uuid=abc&api=js",
            "/ws?sesion=k&myid=1&devid=0&v=4.08&uuid=abc&api=js",
        ] {
            let p = parse_params(ws_params(path).expect(path));
            assert_eq!(
                p,
                ConnectParams {
                    key: "k".into(),
                    user_id: 1,
                    dev_id: 0,
                    api_major: Some(4),
                    uuid: "abc".into(),
                    subscription: String::new()
                },
                "{path}"
            );
        }
        assert_eq!(ws_params("/info"), None);
        assert_eq!(ws_params("/wsx"), None);
    }

    #[test]
    fn parameters_are_read_by_name_in_any_order() {
        let p = parse_params("uuid=Z_9&v=3.2&devid=7&myid=12&sesion=a/b+c=");
        assert_eq!(p.key, "a/b+c=");
        assert_eq!((p.user_id, p.dev_id, p.api_major), (12, 7, Some(3)));
        assert_eq!(p.uuid, "Z_9");
    }

    #[test]
    fn bad_values_mean_anonymous_tenant_zero_and_no_version() {
        let p = parse_params("myid=undefined&devid=x&v=&uuid=has space");
        assert_eq!((p.user_id, p.dev_id, p.api_major), (0, 0, None));
        assert_eq!(p.uuid, "");
        assert_eq!(parse_params("uuid=abcdefghijabcdefghijabcdefghijabc").uuid, "");
    }

    #[test]
    fn percent_escapes_are_decoded() {
        assert_eq!(parse_params("sesion=a%2Bb%3D").key, "a+b=");
        assert_eq!(parse_params("sesion=50%").key, "50%");
    }

    #[test]
    fn subscription_in_the_path_and_in_the_query() {
        for path in [
            "/ws/sesion=&myid=&devid=0&v=4.08&uuid=u1&api=js&subscription=news,web_chat",
            "/ws?subscription=news%2Cweb_chat&v=4.08",
            "//comet-server/ws/subscription=news%0Aweb_chat&v=4",
        ] {
            let p = parse_params(ws_params(path).expect(path));
            let names: Vec<&str> = crate::frontend::channel_names(&p.subscription).collect();
            assert_eq!(names, ["news", "web_chat"], "{path}");
            assert_eq!(p.api_major, Some(4), "{path}");
        }
        assert_eq!(parse_params("v=4.08&api=js").subscription, "");
    }

    /// The pieces come out as the `subscription` command would take them:
    /// foreign characters split, nothing is judged here (too short, too
    /// long, `sys`, `private_` are the shard's to refuse).
    #[test]
    fn subscription_names_split_like_the_command() {
        let p = parse_params("subscription=a,,private_x;sys%20track_room.%D0%B0_b&v=4");
        let names: Vec<&str> = crate::frontend::channel_names(&p.subscription).collect();
        assert_eq!(names, ["a", "private_x", "sys", "track_room", "_b"]);
        let cmd = format!("subscription\n{}", p.subscription);
        assert_eq!(crate::frontend::command::parse(&cmd), crate::frontend::command::Command::Subscribe(names));
    }
}
