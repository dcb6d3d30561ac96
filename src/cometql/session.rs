//! One CometQL connection's protocol state, sans-IO: the handshake and
//! authentication, then commands. Packets go in; [`Event`]s come out for the
//! shard glue, which executes queries and hands results back to
//! [`encode_results`]. Every reply is an event, even the immediate ones, so
//! the glue can keep pipelined answers in order behind a slow query.

use super::charset::{Charset, INVALID_STRING, UNKNOWN_CHARSET};
use super::exec::{StmtResult, database_dev};
use super::packet::{self, CLIENT_DEPRECATE_EOF, CLIENT_MULTI_STATEMENTS, CLIENT_SSL, Frame};
use super::parser::{CharsetVar, ParseError, Statement, parse_each};
use crate::domain::clip;

/// Where the connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Greeting sent; waiting for the HandshakeResponse.
    Greeting,
    /// AuthSwitchRequest sent; waiting for a native scramble.
    Switch {
        user: String,
        dev: u32,
        database: Option<String>,
    },
    /// caching_sha2_password's fast path failed: "perform full
    /// authentication" sent; waiting for the password (in clear over TLS)
    /// or a public-key request.
    FullAuth {
        user: String,
        dev: u32,
        database: Option<String>,
    },
    /// Authenticated.
    Command,
    Closed,
}

/// What the glue must do after a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Bytes to send in this position of the answer order.
    Reply(Vec<u8>),
    /// A COM_QUERY's statements to execute, answered in this position;
    /// the answer's packets start at sequence `seq`.
    /// `binary`: an EXECUTE, answered with binary-protocol rows.
    /// The character set is the one results go back in (as it was when
    /// the query arrived, so pipelined answers keep theirs).
    Query(Vec<Result<Statement, ParseError>>, u8, bool, Charset),
    /// Close after what is queued has been sent.
    Close,
    /// The client sent an SSLRequest: the transport must become TLS now.
    /// Bytes after the SSLRequest are the start of its ClientHello.
    StartTls,
}

/// The error MySQL gives a plaintext login when secure transport is required.
pub const ER_SECURE_TRANSPORT_REQUIRED: u16 = 3159;

/// Passwords per dev_id, as the session needs them.
pub trait Passwords {
    fn password(&self, dev_id: u32) -> &str;
    /// Bytes of COM_STMT_SEND_LONG_DATA one connection may hold, all its
    /// statements together (`--max-query-size`).
    fn max_long_data(&self) -> usize {
        1 << 20
    }
}

/// COM_SET_OPTION's options.
const MYSQL_OPTION_MULTI_STATEMENTS_ON: u16 = 0;
const MYSQL_OPTION_MULTI_STATEMENTS_OFF: u16 = 1;

/// One CometQL connection's protocol state.
#[derive(Debug)]
pub struct Session {
    pub connection_id: u32,
    nonce: [u8; 20],
    phase: Phase,
    /// Capabilities both sides have. COM_SET_OPTION turns
    /// CLIENT_MULTI_STATEMENTS on and off here, as MySQL does.
    pub capabilities: u32,
    /// What the client's text is in (handshake, `SET NAMES`,
    /// `character_set_client`).
    pub client_charset: Charset,
    /// What results go back in (`SET NAMES`, `character_set_results`).
    pub results_charset: Charset,
    /// The dev_id the login authenticated for.
    pub login_dev: u32,
    /// The dev_id queries act on (changed by `db_N`).
    pub dev_id: u32,
    pub database: String,
    /// Prepared statements by id.
    stmts: std::collections::HashMap<u32, super::prepared::Prepared>,
    next_stmt: u32,
    /// CLIENT_SSL is offered (a certificate is configured).
    tls_offered: bool,
    /// A plaintext login is refused with ERR 3159.
    tls_required: bool,
    /// The transport is TLS (after an SSLRequest).
    pub tls: bool,
}

impl Session {
    /// A new session; `nonce` must be random (20 bytes, no NUL).
    pub fn new(connection_id: u32, nonce: [u8; 20]) -> Session {
        Session {
            connection_id,
            nonce,
            phase: Phase::Greeting,
            capabilities: 0,
            client_charset: Charset::Utf8mb4,
            results_charset: Charset::Utf8mb4,
            login_dev: 0,
            dev_id: 0,
            database: "CometQL_v1".into(),
            stmts: std::collections::HashMap::new(),
            next_stmt: 0,
            tls_offered: false,
            tls_required: false,
            tls: false,
        }
    }

    /// Offers TLS in the greeting (CLIENT_SSL); `required`: a login over
    /// plaintext is refused with ERR 3159.
    pub fn offer_tls(&mut self, required: bool) {
        self.tls_offered = true;
        self.tls_required = required;
    }

    /// The greeting to send first.
    pub fn greeting(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(100);
        packet::write_packet(&mut out, 0, &packet::greeting(self.connection_id, &self.nonce, self.tls_offered));
        out
    }

    pub fn is_authenticated(&self) -> bool {
        self.phase == Phase::Command
    }

    pub fn deprecate_eof(&self) -> bool {
        self.capabilities & CLIENT_DEPRECATE_EOF != 0
    }

    /// Whether the login's password also opens dev_id `dev`.
    pub fn may_use_dev(&self, dev: u32, pw: &dyn Passwords) -> bool {
        dev == self.login_dev || pw.password(dev) == pw.password(self.login_dev)
    }

    /// Switches to a dev_id and database name (after `USE` or COM_INIT_DB).
    pub fn use_db(&mut self, dev_id: u32, name: &str) {
        self.dev_id = dev_id;
        self.database = name.to_string();
    }

    /// Handles one packet.
    pub fn on_packet(&mut self, f: Frame, pw: &dyn Passwords) -> Vec<Event> {
        match std::mem::replace(&mut self.phase, Phase::Closed) {
            Phase::Greeting => self.on_handshake(f, pw),
            Phase::Switch { user, dev, database } => {
                if packet::verify(packet::NATIVE, pw.password(dev), &self.nonce, &f.payload) {
                    self.finish_auth(&user, dev, database, f.seq.wrapping_add(1), pw)
                } else {
                    self.deny(&user, f.seq.wrapping_add(1), !f.payload.is_empty())
                }
            }
            Phase::FullAuth { user, dev, database } => self.on_full_auth(f, user, dev, database, pw),
            Phase::Command => {
                self.phase = Phase::Command;
                self.on_command(f, pw)
            }
            Phase::Closed => vec![Event::Close],
        }
    }

    fn deny(&mut self, user: &str, seq: u8, with_password: bool) -> Vec<Event> {
        self.phase = Phase::Closed;
        let yes = if with_password { "YES" } else { "NO" };
        vec![
            Event::Reply(one(
                seq,
                &packet::err(16, &format!("Access denied for user {} (using password: {yes})", clip(user))),
            )),
            Event::Close,
        ]
    }

    /// The client's answer to "perform full authentication" (asked over
    /// TLS only): its password in clear (NUL-terminated), or a request for
    /// an RSA public key, which comet does not have.
    fn on_full_auth(
        &mut self,
        f: Frame,
        user: String,
        dev: u32,
        database: Option<String>,
        pw: &dyn Passwords,
    ) -> Vec<Event> {
        let seq = f.seq.wrapping_add(1);
        let refuse = |s: &mut Session, msg: &str| {
            s.phase = Phase::Closed;
            vec![Event::Reply(one(seq, &packet::err_state(1045, b"28000", msg.as_bytes()))), Event::Close]
        };
        if f.payload == [0x02] {
            return refuse(
                self,
                "caching_sha2_password: comet has no RSA key; connect with TLS (e.g. mysql --ssl-mode=REQUIRED) to log in",
            );
        }
        let password = f.payload.strip_suffix(&[0]).unwrap_or(&f.payload);
        if crate::domain::ct_eq(password, pw.password(dev).as_bytes()) {
            self.finish_auth(&user, dev, database, seq, pw)
        } else {
            self.deny(&user, seq, true)
        }
    }

    fn on_handshake(&mut self, f: Frame, pw: &dyn Passwords) -> Vec<Event> {
        let seq = f.seq.wrapping_add(1);
        // An SSLRequest: the HandshakeResponse's first 32 bytes, with
        // CLIENT_SSL, alone. The response itself follows over TLS.
        if f.payload.len() == 32
            && u32::from_le_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]) & CLIENT_SSL != 0
            && self.tls_offered
            && !self.tls
        {
            self.tls = true;
            self.phase = Phase::Greeting;
            return vec![Event::StartTls];
        }
        if self.tls_required && !self.tls {
            self.phase = Phase::Closed;
            let msg = "Connections using insecure transport are prohibited while --backend-require-tls is on";
            return vec![
                Event::Reply(one(seq, &packet::err_state(ER_SECURE_TRANSPORT_REQUIRED, b"HY000", msg.as_bytes()))),
                Event::Close,
            ];
        }
        let Some(r) = packet::parse_handshake_response(&f.payload) else {
            self.phase = Phase::Closed;
            let msg = if f.payload.len() >= 4
                && u32::from_le_bytes([f.payload[0], f.payload[1], f.payload[2], f.payload[3]]) & CLIENT_SSL != 0
            {
                "TLS is not enabled on this port: connect without SSL"
            } else {
                "Malformed handshake response"
            };
            return vec![Event::Reply(one(seq, &packet::err(3, msg))), Event::Close];
        };
        self.capabilities = r.capabilities & packet::SERVER_CAPABILITIES;
        match Charset::from_collation(r.collation) {
            Ok(c) => (self.client_charset, self.results_charset) = (c, c),
            Err(e) => {
                self.phase = Phase::Closed;
                return vec![Event::Reply(one(seq, &packet::err(UNKNOWN_CHARSET, &e))), Event::Close];
            }
        }
        let dev = match r.user.as_str() {
            "root" | "0" => 0,
            u => match u.parse::<u32>() {
                Ok(n) => n,
                Err(_) => return self.deny(&r.user, seq, !r.auth.is_empty()),
            },
        };
        let plugin = r.plugin.as_deref().unwrap_or(packet::NATIVE);
        match plugin {
            packet::NATIVE | packet::CACHING_SHA2 => {
                if !packet::verify(plugin, pw.password(dev), &self.nonce, &r.auth) {
                    if plugin == packet::CACHING_SHA2 && !r.auth.is_empty() && self.tls {
                        // As a MySQL server without a cached entry: ask for
                        // the password itself. Only over TLS: on plaintext
                        // the password could only travel in clear (comet
                        // has no RSA key), and comet, which knows every
                        // password, already knows the scramble is wrong.
                        self.phase = Phase::FullAuth { user: r.user, dev, database: r.database };
                        return vec![Event::Reply(one(seq, &packet::PERFORM_FULL_AUTH))];
                    }
                    return self.deny(&r.user, seq, !r.auth.is_empty());
                }
                let mut events = Vec::new();
                let mut seq = seq;
                if plugin == packet::CACHING_SHA2 {
                    events.push(Event::Reply(one(seq, &packet::FAST_AUTH_OK)));
                    seq = seq.wrapping_add(1);
                }
                events.extend(self.finish_auth(&r.user, dev, r.database, seq, pw));
                events
            }
            _ => {
                self.phase = Phase::Switch { user: r.user, dev, database: r.database };
                vec![Event::Reply(one(seq, &packet::auth_switch(&self.nonce)))]
            }
        }
    }

    fn finish_auth(
        &mut self,
        user: &str,
        dev: u32,
        database: Option<String>,
        seq: u8,
        pw: &dyn Passwords,
    ) -> Vec<Event> {
        self.login_dev = dev;
        self.dev_id = dev;
        if let Some(db) = database {
            match database_dev(&db, dev) {
                Some(d) if self.may_use_dev(d, pw) => self.use_db(d, &db),
                Some(_) => {
                    self.phase = Phase::Closed;
                    let e =
                        packet::err(403, &format!("Access denied for user {} to database {}", clip(user), clip(&db)));
                    return vec![Event::Reply(one(seq, &e)), Event::Close];
                }
                None => {
                    self.phase = Phase::Closed;
                    let e = packet::err(15, &format!("Unknown database {}: use CometQL_v1 or db_N", clip(&db)));
                    return vec![Event::Reply(one(seq, &e)), Event::Close];
                }
            }
        }
        self.phase = Phase::Command;
        vec![Event::Reply(one(seq, &packet::ok(0, 0, packet::SERVER_STATUS_AUTOCOMMIT, "")))]
    }

    fn on_command(&mut self, f: Frame, pw: &dyn Passwords) -> Vec<Event> {
        // Answers continue the command's sequence (1 for a one-packet command).
        let r = f.seq.wrapping_add(1);
        let ok = || Event::Reply(one(r, &packet::ok(0, 0, packet::SERVER_STATUS_AUTOCOMMIT, "")));
        let Some((&cmd, body)) = f.payload.split_first() else {
            return vec![Event::Reply(one(r, &packet::err(1047, "Unknown command (empty packet)")))];
        };
        match cmd {
            0x01 => {
                self.phase = Phase::Closed;
                vec![Event::Close]
            }
            0x02 => {
                let db =
                    self.client_charset.decode(body).unwrap_or_else(|_| String::from_utf8_lossy(body)).into_owned();
                match database_dev(&db, self.login_dev) {
                    Some(d) if self.may_use_dev(d, pw) => {
                        self.use_db(d, &db);
                        vec![ok()]
                    }
                    Some(_) => {
                        vec![self.err(r, 403, &format!("Access denied to database {} with this login", clip(&db)))]
                    }
                    None => vec![self.err(r, 15, &format!("Unknown database {}: use CometQL_v1 or db_N", clip(&db)))],
                }
            }
            0x03 => {
                let sql = match self.client_charset.decode(body) {
                    Ok(sql) => sql,
                    Err(e) => return vec![self.err(r, INVALID_STRING, &format!("Query {e}"))],
                };
                match parse_each(&sql) {
                    Ok(st) if st.len() > 1 && self.capabilities & CLIENT_MULTI_STATEMENTS == 0 => vec![self.err(
                        r,
                        3,
                        "Several statements in one query need the CLIENT_MULTI_STATEMENTS option (or COM_SET_OPTION)",
                    )],
                    Ok(st) if st.is_empty() => vec![self.err(r, 3, "Query was empty")],
                    Ok(mut st) => {
                        self.apply_charsets(&mut st);
                        vec![Event::Query(st, r, false, self.results_charset)]
                    }
                    Err(ParseError { code, message }) => vec![self.err(r, code, &message)],
                }
            }
            0x04 => {
                // COM_FIELD_LIST: no columns, just the terminator.
                let term = if self.deprecate_eof() {
                    packet::ok_eof(packet::SERVER_STATUS_AUTOCOMMIT)
                } else {
                    packet::eof(packet::SERVER_STATUS_AUTOCOMMIT)
                };
                vec![Event::Reply(one(r, &term))]
            }
            0x0E | 0x1F => {
                if cmd == 0x1F {
                    self.stmts.clear();
                }
                vec![ok()]
            }
            0x16 => self.stmt_prepare(body, r),
            0x17 => self.stmt_execute(body, r),
            // COM_STMT_SEND_LONG_DATA has no answer; an error waits for
            // the EXECUTE.
            0x18 => {
                if body.len() >= 6 {
                    let id = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
                    // The bound is per connection: what other statements
                    // hold counts against it too.
                    let held: usize = self.stmts.iter().filter(|(k, _)| **k != id).map(|(_, s)| s.long_bytes).sum();
                    let room = pw.max_long_data().saturating_sub(held);
                    if let Some(st) = self.stmts.get_mut(&id) {
                        st.long_data(u16::from_le_bytes([body[4], body[5]]), &body[6..], room);
                    }
                }
                Vec::new()
            }
            // COM_STMT_CLOSE has no answer.
            0x19 => {
                if body.len() >= 4 {
                    self.stmts.remove(&u32::from_le_bytes([body[0], body[1], body[2], body[3]]));
                }
                Vec::new()
            }
            // COM_STMT_RESET: forgets the statement's long data.
            0x1A => {
                let id = body.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                match id.and_then(|id| self.stmts.get_mut(&id)) {
                    Some(st) => {
                        st.reset();
                        st.long_error = None;
                        vec![ok()]
                    }
                    None => vec![self.err(r, 3, &format!("Unknown prepared statement {}", id.unwrap_or(0)))],
                }
            }
            0x1B => self.set_option(body, r),
            other => vec![Event::Reply(one(r, &packet::err(1047, &format!("Unknown command {other:#04x}"))))],
        }
    }
}

/// Most prepared statements one connection may hold.
const MAX_STATEMENTS: usize = 1024;

impl Session {
    fn stmt_prepare(&mut self, body: &[u8], r: u8) -> Vec<Event> {
        let sql = match self.client_charset.decode(body) {
            Ok(sql) => sql.into_owned(),
            Err(e) => return vec![self.err(r, INVALID_STRING, &format!("Statement {e}"))],
        };
        if let Err(e) = super::lexer::lex(&sql) {
            return vec![self.err(r, 3, &e.0)];
        }
        if self.stmts.len() >= MAX_STATEMENTS {
            return vec![Event::Reply(one(r, &packet::err(18, "Too many prepared statements: close some first")))];
        }
        self.next_stmt = self.next_stmt.wrapping_add(1).max(1);
        let st = super::prepared::Prepared::new(sql);
        let n = st.marks.len();
        self.stmts.insert(self.next_stmt, st);
        vec![Event::Reply(super::prepared::prepare_ok(self.next_stmt, n, self.deprecate_eof(), r))]
    }

    fn stmt_execute(&mut self, body: &[u8], r: u8) -> Vec<Event> {
        let id = body.get(..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let Some(stmt) = id.and_then(|id| self.stmts.get_mut(&id)) else {
            return vec![Event::Reply(one(
                r,
                &packet::err(3, &format!("Unknown prepared statement {}", id.unwrap_or(0))),
            ))];
        };
        let charset = self.client_charset;
        let sql = match super::prepared::execute_sql(body, stmt, charset) {
            Ok(sql) => sql,
            Err((code, e)) => return vec![self.err(r, code, &e)],
        };
        match parse_each(&sql) {
            Ok(mut st) if st.len() == 1 => {
                self.apply_charsets(&mut st);
                vec![Event::Query(st, r, true, self.results_charset)]
            }
            Ok(_) => vec![Event::Reply(one(r, &packet::err(3, "A prepared statement must be exactly one statement")))],
            Err(ParseError { code, message }) => vec![self.err(r, code, &message)],
        }
    }
}

impl Session {
    /// An ERR reply whose message is in the client's result character set.
    fn err(&self, seq: u8, code: u16, message: &str) -> Event {
        Event::Reply(one(seq, &packet::err_state(code, b"HY000", &self.results_charset.encode(message))))
    }

    /// COM_SET_OPTION: switches multi-statements for this connection and
    /// answers with an EOF packet (an OK packet with the EOF header under
    /// CLIENT_DEPRECATE_EOF), as MySQL does; an unknown option is ERR 1047,
    /// a body that is not two bytes ERR 1835.
    fn set_option(&mut self, body: &[u8], r: u8) -> Vec<Event> {
        let Ok(option) = <[u8; 2]>::try_from(body).map(u16::from_le_bytes) else {
            return vec![Event::Reply(one(r, &packet::err_state(1835, b"HY000", b"Malformed communication packet.")))];
        };
        match option {
            MYSQL_OPTION_MULTI_STATEMENTS_ON => self.capabilities |= CLIENT_MULTI_STATEMENTS,
            MYSQL_OPTION_MULTI_STATEMENTS_OFF => self.capabilities &= !CLIENT_MULTI_STATEMENTS,
            _ => return vec![Event::Reply(one(r, &packet::err_state(1047, b"08S01", b"Unknown command")))],
        }
        let status = packet::SERVER_STATUS_AUTOCOMMIT;
        let eof = if self.deprecate_eof() { packet::ok_eof(status) } else { packet::eof(status) };
        vec![Event::Reply(one(r, &eof))]
    }

    /// Applies the character set assignments of the `SET` statements in a
    /// query before it runs (so its results come back in the new set). A
    /// character set comet does not speak turns its `SET` into ERR 1115,
    /// naming it; assignments after the first error are not applied, as
    /// MySQL stops there.
    fn apply_charsets(&mut self, stmts: &mut [Result<Statement, ParseError>]) {
        for st in stmts.iter_mut() {
            let items = match st {
                Ok(Statement::Set(items)) => items,
                Ok(_) => continue,
                Err(_) => return,
            };
            let (mut client, mut results) = (self.client_charset, self.results_charset);
            for item in items.iter() {
                // NULL: results are not converted, so they are UTF-8.
                let cs = match item.name.as_deref().map(Charset::from_name) {
                    None => Ok(Charset::Utf8mb4),
                    Some(r) => r,
                };
                let cs = match cs {
                    Ok(cs) => cs,
                    Err(message) => {
                        *st = Err(ParseError { code: UNKNOWN_CHARSET, message });
                        return;
                    }
                };
                match item.var {
                    CharsetVar::Names | CharsetVar::CharacterSet => (client, results) = (cs, cs),
                    CharsetVar::Client => client = cs,
                    CharsetVar::Results => results = cs,
                    CharsetVar::Connection => {}
                }
            }
            (self.client_charset, self.results_charset) = (client, results);
        }
    }
}

/// One packet's bytes with sequence `seq`.
pub fn one(seq: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    packet::write_packet(&mut out, seq, payload);
    out
}

/// Encodes the results of one COM_QUERY (several with multi-statements),
/// with sequence numbers running on from `seq` (1 after a one-packet query)
/// and MORE_RESULTS on all but the
/// last. Execution stops at the first error, so an error is always last.
/// Text (rows, error messages) is sent in `charset`.
pub fn encode_results(results: &[StmtResult], deprecate_eof: bool, seq: u8, binary: bool, charset: Charset) -> Vec<u8> {
    let mut out = Vec::new();
    let mut seq = seq;
    for (i, r) in results.iter().enumerate() {
        let more = if i + 1 < results.len() { packet::SERVER_MORE_RESULTS_EXISTS } else { 0 };
        let status = packet::SERVER_STATUS_AUTOCOMMIT | more;
        seq = match r {
            StmtResult::Ok { affected, last_insert_id } => {
                packet::write_packet(&mut out, seq, &packet::ok(*affected, *last_insert_id, status, ""))
            }
            StmtResult::Err(code, msg) => {
                packet::write_packet(&mut out, seq, &packet::err_state(*code, b"HY000", &charset.encode(msg)))
            }
            StmtResult::Rows(rs) => {
                packet::write_result_set_from(&mut out, seq, rs, deprecate_eof, status, binary, charset)
            }
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pw;
    impl Passwords for Pw {
        fn password(&self, dev: u32) -> &str {
            if dev == 7 { "seven" } else { "comet" }
        }
    }

    fn response(user: &str, auth: &[u8], plugin: Option<&str>, db: Option<&str>, caps_extra: u32) -> Frame {
        let mut caps = packet::CLIENT_PROTOCOL_41 | packet::CLIENT_SECURE_CONNECTION | caps_extra;
        if plugin.is_some() {
            caps |= packet::CLIENT_PLUGIN_AUTH;
        }
        if db.is_some() {
            caps |= packet::CLIENT_CONNECT_WITH_DB;
        }
        let mut p = Vec::new();
        p.extend_from_slice(&caps.to_le_bytes());
        p.extend_from_slice(&[0, 0, 0, 1, 45]);
        p.extend_from_slice(&[0; 23]);
        p.extend_from_slice(user.as_bytes());
        p.push(0);
        p.push(auth.len() as u8);
        p.extend_from_slice(auth);
        if let Some(d) = db {
            p.extend_from_slice(d.as_bytes());
            p.push(0);
        }
        if let Some(pl) = plugin {
            p.extend_from_slice(pl.as_bytes());
            p.push(0);
        }
        Frame { seq: 1, payload: p, consumed: 0 }
    }

    fn first_byte_of_reply(e: &Event) -> u8 {
        match e {
            Event::Reply(b) => b[4],
            other => panic!("not a reply: {other:?}"),
        }
    }

    const NONCE: [u8; 20] = *b"abcdefghijklmnopqrst";

    #[test]
    fn native_login_succeeds_and_wrong_password_is_error_16() {
        let mut s = Session::new(1, NONCE);
        let ok = s.on_packet(
            response("root", &packet::native_scramble(b"comet", &NONCE), Some(packet::NATIVE), None, 0),
            &Pw,
        );
        assert_eq!(ok.len(), 1);
        assert_eq!(first_byte_of_reply(&ok[0]), 0x00);
        assert!(s.is_authenticated());
        let mut s = Session::new(1, NONCE);
        let bad = s
            .on_packet(response("root", &packet::native_scramble(b"nope", &NONCE), Some(packet::NATIVE), None, 0), &Pw);
        let Event::Reply(b) = &bad[0] else { panic!() };
        assert_eq!(&b[4..7], &[0xFF, 16, 0]);
        assert_eq!(bad[1], Event::Close);
    }

    #[test]
    fn caching_sha2_fast_path_then_ok() {
        let mut s = Session::new(1, NONCE);
        let ev = s.on_packet(
            response("7", &packet::sha2_scramble(b"seven", &NONCE), Some(packet::CACHING_SHA2), None, 0),
            &Pw,
        );
        assert_eq!(ev[0], Event::Reply(one(2, &packet::FAST_AUTH_OK)));
        assert_eq!(first_byte_of_reply(&ev[1]), 0x00);
        let Event::Reply(b) = &ev[1] else { panic!() };
        assert_eq!(b[3], 3, "OK follows with sequence 3");
        assert_eq!((s.login_dev, s.dev_id), (7, 7));
    }

    fn ssl_request(seq: u8) -> Frame {
        let caps = packet::CLIENT_PROTOCOL_41 | packet::CLIENT_SECURE_CONNECTION | CLIENT_SSL;
        let mut p = caps.to_le_bytes().to_vec();
        p.extend_from_slice(&[0, 0, 0, 1, 45]);
        p.extend_from_slice(&[0; 23]);
        Frame { seq, payload: p, consumed: 0 }
    }

    fn greeting_caps(s: &Session) -> u32 {
        let g = s.greeting();
        let v_end = 4 + g[4..].iter().position(|&b| b == 0).unwrap();
        u16::from_le_bytes([g[v_end + 14], g[v_end + 15]]) as u32
    }

    #[test]
    fn tls_is_offered_only_with_a_certificate_and_started_by_an_ssl_request() {
        let mut s = Session::new(1, NONCE);
        assert_eq!(greeting_caps(&s) & CLIENT_SSL, 0);
        // Without an offer, an SSLRequest is a clear error.
        let ev = s.on_packet(ssl_request(1), &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        assert!(String::from_utf8_lossy(b).contains("TLS is not enabled"), "{b:?}");
        let mut s = Session::new(1, NONCE);
        s.offer_tls(false);
        assert_eq!(greeting_caps(&s) & CLIENT_SSL, CLIENT_SSL);
        assert_eq!(s.on_packet(ssl_request(1), &Pw), vec![Event::StartTls]);
        assert!(s.tls);
        // The HandshakeResponse comes over TLS with sequence 2; the
        // answers continue from it.
        let mut r =
            response("7", &packet::sha2_scramble(b"seven", &NONCE), Some(packet::CACHING_SHA2), None, CLIENT_SSL);
        r.seq = 2;
        let ev = s.on_packet(r, &Pw);
        assert_eq!(ev[0], Event::Reply(one(3, &packet::FAST_AUTH_OK)));
        let Event::Reply(b) = &ev[1] else { panic!() };
        assert_eq!((b[3], b[4]), (4, 0x00), "OK with sequence 4");
    }

    #[test]
    fn a_plaintext_login_is_refused_with_3159_when_tls_is_required() {
        let mut s = Session::new(1, NONCE);
        s.offer_tls(true);
        let ev = s.on_packet(response("root", &packet::native_scramble(b"comet", &NONCE), None, None, 0), &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        assert_eq!(&b[4..7], &[0xFF, 0x57, 0x0C], "ERR 3159");
        assert!(String::from_utf8_lossy(b).contains("insecure transport"));
        assert_eq!(ev[1], Event::Close);
        // Over TLS the same login works.
        let mut s = Session::new(1, NONCE);
        s.offer_tls(true);
        s.on_packet(ssl_request(1), &Pw);
        let mut r = response("root", &packet::native_scramble(b"comet", &NONCE), None, None, CLIENT_SSL);
        r.seq = 2;
        let ev = s.on_packet(r, &Pw);
        assert_eq!(first_byte_of_reply(&ev[0]), 0x00);
        assert!(s.is_authenticated());
    }

    /// A session over TLS whose fast path failed: "perform full
    /// authentication" was asked.
    fn full_auth_session() -> Session {
        let mut s = Session::new(1, NONCE);
        s.offer_tls(false);
        s.on_packet(ssl_request(1), &Pw);
        let seq = 2;
        // A scramble the fast path cannot verify.
        let mut r = response("7", &[9; 32], Some(packet::CACHING_SHA2), None, 0);
        r.seq = seq;
        let ev = s.on_packet(r, &Pw);
        assert_eq!(ev, vec![Event::Reply(one(seq + 1, &packet::PERFORM_FULL_AUTH))]);
        s
    }

    #[test]
    fn caching_sha2_full_authentication_takes_the_cleartext_password_over_tls() {
        let mut s = full_auth_session();
        let ev = s.on_packet(Frame { seq: 4, payload: b"seven\0".to_vec(), consumed: 0 }, &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        assert_eq!((b[3], b[4]), (5, 0x00), "OK with sequence 5");
        assert!(s.is_authenticated());
        assert_eq!(s.login_dev, 7);

        let mut s = full_auth_session();
        let ev = s.on_packet(Frame { seq: 4, payload: b"wrong\0".to_vec(), consumed: 0 }, &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        assert_eq!(&b[4..7], &[0xFF, 16, 0]);
        assert_eq!(ev[1], Event::Close);

        // Over plaintext no cleartext password is asked for: a scramble
        // that does not check out is access denied at once.
        let mut s = Session::new(1, NONCE);
        s.offer_tls(false);
        let ev = s.on_packet(response("7", &[9; 32], Some(packet::CACHING_SHA2), None, 0), &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        assert_eq!(&b[4..7], &[0xFF, 16, 0]);
        assert_eq!(ev[1], Event::Close);
        // A public-key request is answered: there is no RSA key.
        let mut s = full_auth_session();
        let ev = s.on_packet(Frame { seq: 4, payload: vec![0x02], consumed: 0 }, &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        assert!(String::from_utf8_lossy(b).contains("no RSA key"));
        assert_eq!(ev[1], Event::Close);
    }

    #[test]
    fn other_plugins_get_switched_to_native() {
        let mut s = Session::new(1, NONCE);
        let ev = s.on_packet(response("root", b"xx", Some("sha256_password"), None, 0), &Pw);
        assert_eq!(first_byte_of_reply(&ev[0]), 0xFE);
        let ev = s
            .on_packet(Frame { seq: 3, payload: packet::native_scramble(b"comet", &NONCE).to_vec(), consumed: 0 }, &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        assert_eq!((b[3], b[4]), (4, 0x00));
    }

    #[test]
    fn empty_password_and_unknown_user_are_refused() {
        let mut s = Session::new(1, NONCE);
        let ev = s.on_packet(response("root", b"", Some(packet::NATIVE), None, 0), &Pw);
        assert_eq!(first_byte_of_reply(&ev[0]), 0xFF);
        let mut s = Session::new(1, NONCE);
        let ev = s.on_packet(response("admin", b"x", Some(packet::NATIVE), None, 0), &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        assert!(String::from_utf8_lossy(b).contains("'admin'"));
    }

    #[test]
    fn database_at_connect_and_multi_statement_gate() {
        let mut s = Session::new(1, NONCE);
        let auth = packet::native_scramble(b"comet", &NONCE);
        s.on_packet(response("root", &auth, Some(packet::NATIVE), Some("db_3"), 0), &Pw);
        assert_eq!((s.dev_id, s.database.as_str()), (3, "db_3"));
        let q = |sql: &str| Frame { seq: 0, payload: [&[0x03][..], sql.as_bytes()].concat(), consumed: 0 };
        let ev = s.on_packet(q("SELECT 1; SELECT 2"), &Pw);
        assert_eq!(first_byte_of_reply(&ev[0]), 0xFF);
        assert!(matches!(s.on_packet(q("SELECT 1"), &Pw)[0], Event::Query(..)));
        // db_7 has another password: refused.
        let ev = s.on_packet(Frame { seq: 0, payload: b"\x02db_7".to_vec(), consumed: 0 }, &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        assert_eq!(&b[4..7], &[0xFF, 0x93, 0x01]);
        let ev = s.on_packet(Frame { seq: 0, payload: vec![0x09], consumed: 0 }, &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        assert_eq!(&b[4..7], &[0xFF, 0x17, 0x04], "1047 for unknown commands");
    }

    /// A logged-in session (root, password "comet").
    fn logged_in() -> Session {
        let mut s = Session::new(1, NONCE);
        let auth = packet::native_scramble(b"comet", &NONCE);
        s.on_packet(response("root", &auth, Some(packet::NATIVE), None, 0), &Pw);
        assert!(s.is_authenticated());
        s
    }

    /// The one ERR packet in `bytes`: its code and message.
    fn only_err(bytes: &[u8]) -> (u16, String) {
        let f = packet::read_frame(bytes, 32 << 20).unwrap().unwrap();
        assert_eq!(f.consumed, bytes.len(), "one packet");
        assert_eq!(f.payload[0], 0xFF, "an ERR packet");
        (u16::from_le_bytes([f.payload[1], f.payload[2]]), String::from_utf8(f.payload[9..].to_vec()).unwrap())
    }

    /// Sends one command packet and returns the bytes answered, carrying
    /// a query out as the shard glue would (for statements that need no
    /// shard state).
    fn answer(s: &mut Session, cmd: u8, body: &[u8]) -> Vec<u8> {
        use super::super::exec::{Ctx, Plan, plan};
        let ev = s.on_packet(Frame { seq: 0, payload: [&[cmd][..], body].concat(), consumed: 0 }, &Pw);
        match &ev[..] {
            [Event::Reply(b)] => b.clone(),
            [Event::Query(stmts, seq, binary, charset)] => {
                let ctx = Ctx::standalone(32 << 20);
                let results: Vec<StmtResult> = stmts
                    .iter()
                    .map(|st| match st {
                        Ok(st) => match plan(st.clone(), &ctx) {
                            Plan::Done(r) => r,
                            other => panic!("planned {other:?}"),
                        },
                        Err(e) => StmtResult::Err(e.code, e.message.clone()),
                    })
                    .collect();
                encode_results(&results, s.deprecate_eof(), *seq, *binary, *charset)
            }
            other => panic!("unexpected events {other:?}"),
        }
    }

    #[test]
    fn huge_bad_channel_name_is_answered_with_one_short_err_packet() {
        let mut s = logged_in();
        let name = "n".repeat(4 << 20);
        let sql = format!("INSERT INTO pipes_messages (name, event, message) VALUES ('{name}', 'ev', 'hi')");
        let bytes = answer(&mut s, 0x03, sql.as_bytes());
        assert!(bytes.len() < 400, "{} bytes on the wire", bytes.len());
        let (code, msg) = only_err(&bytes);
        assert_eq!(code, 11);
        assert!(msg.starts_with("Channel name 'nnnn"), "{msg}");
        assert!(msg.contains("...' (4194304 bytes)"), "{msg}");
    }

    #[test]
    fn huge_values_in_session_errors_are_clipped() {
        let big = "d".repeat(17 << 20);
        // COM_INIT_DB with an unknown 17 MiB database name.
        let mut s = logged_in();
        let (code, msg) = only_err(&answer(&mut s, 0x02, big.as_bytes()));
        assert_eq!(code, 15);
        assert!(msg.len() < 400 && msg.contains(&format!("({} bytes)", big.len())), "{}", &msg[..80]);
        // A syntax error on a 17 MiB word: before clipping, this ERR was
        // larger than one packet.
        let (code, msg) = only_err(&answer(&mut s, 0x03, big.as_bytes()));
        assert_eq!(code, 3);
        assert!(msg.len() < 400 && msg.starts_with("unknown statement starting with 'ddd"), "{}", &msg[..80]);
        // A login name of 60 KiB (the auth packet limit is 64 KiB).
        let mut s = Session::new(1, NONCE);
        let user = "u".repeat(60 * 1024);
        let mut f = response("x", b"x", Some(packet::NATIVE), None, 0);
        let at = f.payload.iter().position(|&b| b == b'x').unwrap();
        f.payload.splice(at..at + 1, user.bytes());
        let ev = s.on_packet(f, &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        let (code, msg) = only_err(b);
        assert_eq!(code, 16);
        assert!(msg.len() < 400 && msg.contains("(61440 bytes)"), "{}", &msg[..80]);
    }

    #[test]
    fn com_set_option_answers_eof_and_switches_multi_statements() {
        let mut s = logged_in();
        let multi = |s: &mut Session| answer(s, 0x03, b"SELECT 1; SELECT 2")[4];
        assert_eq!(multi(&mut s), 0xFF, "off: the client did not ask for it at login");
        // COM_SET_OPTION, MYSQL_OPTION_MULTI_STATEMENTS_ON: the request
        // 03 00 00 00 1b 00 00 is answered with EOF fe 00 00 02 00.
        let req = [0x03, 0x00, 0x00, 0x00, 0x1b, 0x00, 0x00];
        let f = packet::read_frame(&req, 100).unwrap().unwrap();
        let ev = s.on_packet(f, &Pw);
        assert_eq!(ev, [Event::Reply(vec![0x05, 0x00, 0x00, 0x01, 0xfe, 0x00, 0x00, 0x02, 0x00])]);
        assert_ne!(multi(&mut s), 0xFF, "on: two statements run");
        // ..._OFF (1) turns it off again.
        let ev = s.on_packet(Frame { seq: 0, payload: vec![0x1b, 0x01, 0x00], consumed: 0 }, &Pw);
        assert_eq!(ev, [Event::Reply(vec![0x05, 0x00, 0x00, 0x01, 0xfe, 0x00, 0x00, 0x02, 0x00])]);
        assert_eq!(multi(&mut s), 0xFF);
        // Unknown option: ERR 1047 with SQLSTATE 08S01, as MySQL answers.
        let ev = s.on_packet(Frame { seq: 0, payload: vec![0x1b, 0x07, 0x00], consumed: 0 }, &Pw);
        let mut want = vec![0x18, 0x00, 0x00, 0x01, 0xff, 0x17, 0x04];
        want.extend_from_slice(b"#08S01Unknown command");
        assert_eq!(ev, [Event::Reply(want)]);
        // A short body: ERR 1835.
        let ev = s.on_packet(Frame { seq: 0, payload: vec![0x1b, 0x00], consumed: 0 }, &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        assert_eq!(&b[4..7], &[0xFF, 0x2B, 0x07]);
    }

    #[test]
    fn com_set_option_under_deprecate_eof_answers_an_ok_with_the_eof_header() {
        let mut s = Session::new(1, NONCE);
        let auth = packet::native_scramble(b"comet", &NONCE);
        s.on_packet(response("root", &auth, Some(packet::NATIVE), None, CLIENT_DEPRECATE_EOF), &Pw);
        let ev = s.on_packet(Frame { seq: 0, payload: vec![0x1b, 0x00, 0x00], consumed: 0 }, &Pw);
        assert_eq!(ev, [Event::Reply(vec![0x07, 0x00, 0x00, 0x01, 0xfe, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00])]);
    }

    #[test]
    fn latin1_from_the_handshake_converts_queries_and_results() {
        let mut s = Session::new(1, NONCE);
        let mut f = response("root", &packet::native_scramble(b"comet", &NONCE), Some(packet::NATIVE), None, 0);
        f.payload[8] = 8; // latin1_swedish_ci
        s.on_packet(f, &Pw);
        assert_eq!((s.client_charset, s.results_charset), (Charset::Latin1, Charset::Latin1));
        // SELECT 'café' in latin1: the value comes back as latin1, with
        // collation 8 in its column definition.
        let bytes = answer(&mut s, 0x03, b"SELECT 'caf\xe9' AS v");
        assert!(bytes.windows(4).any(|w| w == b"caf\xe9"), "{bytes:x?}");
        assert!(!bytes.windows(2).any(|w| w == "é".as_bytes()));
        let mut rest = &bytes[..];
        let mut payloads = Vec::new();
        while let Ok(Some(f)) = packet::read_frame(rest, 1 << 20) {
            rest = &rest[f.consumed..];
            payloads.push(f.payload);
        }
        let def = &payloads[1];
        assert_eq!(&def[def.len() - 12..def.len() - 10], &[8, 0]);
    }

    #[test]
    fn set_names_switches_the_charset_and_unknown_ones_are_refused_by_name() {
        let mut s = logged_in();
        // Invalid UTF-8 on a utf8mb4 connection: refused, naming the byte.
        let (code, msg) = only_err(&answer(&mut s, 0x03, b"SELECT '\xe9'"));
        assert_eq!(code, INVALID_STRING);
        assert!(msg.contains("not valid utf8mb4 (byte 0xE9 at offset 8)"), "{msg}");
        assert_eq!(answer(&mut s, 0x03, b"SET NAMES latin1")[4], 0x00);
        assert_eq!(s.client_charset, Charset::Latin1);
        let bytes = answer(&mut s, 0x03, b"SELECT '\xe9'");
        assert!(bytes.windows(2).any(|w| w == [1, 0xE9]), "{bytes:x?}");
        // The prepared path reads the statement text in latin1 too.
        let ev = s.on_packet(Frame { seq: 0, payload: b"\x16SELECT '\xe9', ?".to_vec(), consumed: 0 }, &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        assert_eq!(b[4], 0x00, "PREPARE_OK");
        let (code, msg) = only_err(&answer(&mut s, 0x03, b"SET NAMES gbk"));
        assert_eq!(code, UNKNOWN_CHARSET);
        assert!(msg.contains("'gbk' is not supported"), "{msg}");
        let (code, msg) = only_err(&answer(&mut s, 0x03, b"SET character_set_client = 'klingon'"));
        assert_eq!((code, msg.as_str()), (1115, "Unknown character set: 'klingon'"));
        assert_eq!(s.client_charset, Charset::Latin1, "a refused SET changes nothing");
        answer(&mut s, 0x03, b"SET character_set_client = utf8mb4, character_set_results = NULL");
        assert_eq!((s.client_charset, s.results_charset), (Charset::Utf8mb4, Charset::Utf8mb4));
        // At the handshake, an unsupported collation is refused by name.
        let mut s = Session::new(1, NONCE);
        let mut f = response("root", &packet::native_scramble(b"comet", &NONCE), Some(packet::NATIVE), None, 0);
        f.payload[8] = 51; // cp1251_general_ci
        let ev = s.on_packet(f, &Pw);
        let Event::Reply(b) = &ev[0] else { panic!() };
        let (code, msg) = only_err(b);
        assert_eq!(code, 1115);
        assert!(msg.contains("'cp1251' (collation 51)"), "{msg}");
        assert_eq!(ev[1], Event::Close);
    }

    #[test]
    fn multi_results_continue_sequence_and_flag_more() {
        let r =
            vec![StmtResult::Ok { affected: 1, last_insert_id: 0 }, StmtResult::Ok { affected: 2, last_insert_id: 0 }];
        let b = encode_results(&r, false, 1, false, Charset::Utf8mb4);
        let f1 = packet::read_frame(&b, 100).unwrap().unwrap();
        let f2 = packet::read_frame(&b[f1.consumed..], 100).unwrap().unwrap();
        assert_eq!((f1.seq, f2.seq), (1, 2));
        assert_eq!(u16::from_le_bytes([f1.payload[3], f1.payload[4]]) & packet::SERVER_MORE_RESULTS_EXISTS, 8);
        assert_eq!(u16::from_le_bytes([f2.payload[3], f2.payload[4]]) & packet::SERVER_MORE_RESULTS_EXISTS, 0);
    }
}
