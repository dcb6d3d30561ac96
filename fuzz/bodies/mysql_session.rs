//! Fuzz body for one CometQL connection (`comet::cometql::session`): the
//! MySQL handshake and authentication, then commands (COM_QUERY, INIT_DB,
//! prepared statements, ...), with queries planned as the shard glue does
//! (`exec::plan`) and their answers encoded by `session::encode_results`.
//!
//! Input layout: one mode byte, then the client's byte stream, cut into
//! packets by `packet::read_frame` (a trailing piece that is not a whole
//! packet is sent as one last payload). Mode bit 0 set: the body logs in
//! first with the capabilities chosen by bits 1..4, so every input reaches
//! the command phase; clear: the stream starts with the handshake response.
//!
//! Checked on every packet: answers are whole packets numbered on from the
//! client's sequence; a closed session stays closed; a session only becomes
//! authenticated on a packet carrying the right scramble; a result set
//! decodes, as a MySQL client reads it, to exactly the rows that were
//! encoded; a PREPARE announces as many parameters as the text has marks.

use comet::cometql::charset::Charset;
use comet::cometql::exec::{self, Ctx, Plan, StmtResult};
use comet::cometql::packet::{self, ResultSet};
use comet::cometql::session::{self, Event, Passwords, Session};
use comet::cometql::{parser, prepared};

const NONCE: [u8; 20] = *b"abcdefghijklmnopqrst";

/// Backend passwords: dev_id 7 has its own, every other dev_id shares one.
struct Pw;

impl Passwords for Pw {
    fn password(&self, dev_id: u32) -> &str {
        if dev_id == 7 { "seven" } else { "pw" }
    }
}

/// The dev_id a login name stands for, as docs/cometql.md ("Logging in") says.
fn login_dev(user: &str) -> Option<u32> {
    match user {
        "root" | "0" => Some(0),
        u => u.parse().ok(),
    }
}

/// Most packets one input may send (keeps each run short).
const MAX_PACKETS: usize = 64;

pub fn run(data: &[u8]) {
    let Some((&mode, mut stream)) = data.split_first() else {
        return;
    };
    let mut c = Conn { s: Session::new(1, NONCE), closed: false, switch_dev: None };
    assert!(packet::read_frame(&c.s.greeting(), 1 << 10).is_ok_and(|f| f.is_some_and(|f| f.seq == 0)));
    if mode & 1 != 0 {
        c.login(mode);
    }
    for _ in 0..MAX_PACKETS {
        if stream.is_empty() {
            break;
        }
        let (seq, payload) = match packet::read_frame(stream, 1 << 20) {
            Ok(Some(f)) => {
                stream = &stream[f.consumed..];
                (f.seq, f.payload)
            }
            Ok(None) => (0, std::mem::take(&mut stream).to_vec()),
            Err(_) => break,
        };
        c.packet(seq, payload);
    }
}

/// A session and what the body knows about it from the outside.
struct Conn {
    s: Session,
    /// The session said Close: from then on it must answer nothing else.
    closed: bool,
    /// An AuthSwitchRequest was sent for a login to this dev_id.
    switch_dev: Option<u32>,
}

impl Conn {
    /// Logs in with a well-formed HandshakeResponse41 built from `mode`.
    fn login(&mut self, mode: u8) {
        let mut caps = packet::CLIENT_PROTOCOL_41 | packet::CLIENT_SECURE_CONNECTION | packet::CLIENT_PLUGIN_AUTH;
        if mode & 2 != 0 {
            caps |= packet::CLIENT_DEPRECATE_EOF;
        }
        if mode & 4 != 0 {
            caps |= packet::CLIENT_MULTI_STATEMENTS;
        }
        let sha2 = mode & 8 != 0;
        let (user, pw) = if mode & 16 != 0 { ("7", "seven") } else { ("root", "pw") };
        let mut p = caps.to_le_bytes().to_vec();
        p.extend_from_slice(&[0, 0, 0, 1, 45]);
        p.extend_from_slice(&[0; 23]);
        p.extend_from_slice(user.as_bytes());
        p.push(0);
        let (auth, plugin): (Vec<u8>, &str) = if sha2 {
            (packet::sha2_scramble(pw.as_bytes(), &NONCE).to_vec(), packet::CACHING_SHA2)
        } else {
            (packet::native_scramble(pw.as_bytes(), &NONCE).to_vec(), packet::NATIVE)
        };
        p.push(auth.len() as u8);
        p.extend_from_slice(&auth);
        p.extend_from_slice(plugin.as_bytes());
        p.push(0);
        self.packet(1, p);
        assert!(self.s.is_authenticated(), "a correct login must authenticate");
        assert_eq!(self.s.deprecate_eof(), mode & 2 != 0);
    }

    /// Sends one packet and checks every answer.
    fn packet(&mut self, seq: u8, payload: Vec<u8>) {
        let was_authenticated = self.s.is_authenticated();
        let scramble_ok = was_authenticated || self.carries_right_scramble(&payload);
        let prepare_sql = (was_authenticated && payload.first() == Some(&0x16))
            .then(|| std::str::from_utf8(&payload[1..]).ok().map(str::to_string))
            .flatten();
        let events = self.s.on_packet(packet::Frame { seq, payload: payload.clone(), consumed: 0 }, &Pw);
        if self.closed {
            assert_eq!(events, [Event::Close], "a closed session answers nothing");
            return;
        }
        if self.s.is_authenticated() && !was_authenticated {
            assert!(scramble_ok, "authenticated without the right scramble: {payload:?}");
        }
        let mut answer_seq = seq.wrapping_add(1);
        for e in events {
            match e {
                Event::Reply(bytes) => {
                    let packets = read_packets(&bytes, answer_seq);
                    answer_seq = answer_seq.wrapping_add(packets.len() as u8);
                    if let [first, ..] = &packets[..] {
                        if first.first() == Some(&0xFE) && !was_authenticated {
                            // AuthSwitchRequest: the next packet is a native scramble.
                            self.switch_dev =
                                packet::parse_handshake_response(&payload).and_then(|r| login_dev(&r.user));
                        }
                        if let Some(sql) = &prepare_sql
                            && first.first() == Some(&0x00)
                        {
                            check_prepare_ok(&packets, sql, self.s.deprecate_eof());
                        }
                        if first.first() == Some(&0xFF) {
                            check_err(first);
                        }
                    }
                }
                Event::Query(stmts, q_seq, binary, charset) => {
                    assert!(self.s.is_authenticated());
                    assert_eq!(q_seq, answer_seq, "a query's answer continues the client's sequence");
                    assert!(!stmts.is_empty());
                    if stmts.len() > 1 {
                        assert!(self.s.capabilities & packet::CLIENT_MULTI_STATEMENTS != 0);
                        assert!(!binary, "a prepared statement is one statement");
                    }
                    self.query(stmts, q_seq, binary, charset);
                }
                Event::Close => self.closed = true,
                Event::StartTls => panic!("StartTls from a session that never offered TLS"),
            }
        }
    }

    /// Whether `payload` is a login that must succeed: a handshake response
    /// whose scramble matches its dev_id's password, or the native scramble
    /// after an AuthSwitchRequest.
    fn carries_right_scramble(&self, payload: &[u8]) -> bool {
        if let Some(dev) = self.switch_dev {
            return packet::verify(packet::NATIVE, Pw.password(dev), &NONCE, payload);
        }
        let Some(r) = packet::parse_handshake_response(payload) else {
            return false;
        };
        let Some(dev) = login_dev(&r.user) else {
            return false;
        };
        let plugin = r.plugin.as_deref().unwrap_or(packet::NATIVE);
        packet::verify(plugin, Pw.password(dev), &NONCE, &r.auth)
    }

    /// Plans a query's statements as the shard glue does, fakes what needs
    /// the shards, encodes the answer and reads it back as a client would.
    fn query(
        &mut self,
        stmts: Vec<Result<parser::Statement, parser::ParseError>>,
        seq: u8,
        binary: bool,
        charset: Charset,
    ) {
        let mut results = Vec::new();
        for st in stmts {
            let st = st.unwrap_or_else(parser::Statement::Failed);
            let plan = {
                let s = &self.s;
                let may = |d: u32| s.may_use_dev(d, &Pw);
                let status = || vec![("Uptime".to_string(), "1".to_string())];
                let ctx = Ctx {
                    dev_id: s.dev_id,
                    database: &s.database,
                    connection_id: s.connection_id,
                    may_use_dev: &may,
                    status: &status,
                    max_query_size: 1 << 20,
                    charsets: (s.client_charset, s.results_charset),
                };
                exec::plan(st, &ctx)
            };
            let r = self.carry_out(plan);
            let failed = matches!(r, StmtResult::Err(..));
            results.push(r);
            if failed {
                break;
            }
        }
        let bytes = session::encode_results(&results, self.s.deprecate_eof(), seq, binary, charset);
        let packets = read_packets(&bytes, seq);
        check_results(&packets, &results, self.s.deprecate_eof(), binary, charset);
    }

    /// What the shards would answer, made up from the plan's own names.
    fn carry_out(&mut self, plan: Plan) -> StmtResult {
        let rows_for = |names: &[String], proj: &exec::Projection| {
            let rows = names
                .iter()
                .enumerate()
                .map(|(i, n)| (0..8).map(|c| (c + i) % 3 != 0).map(|some| some.then(|| n.clone())).collect())
                .collect();
            let rs = proj.apply(rows);
            assert!(rs.rows.iter().all(|r| r.len() == rs.columns.len()), "projected rows match their columns");
            StmtResult::Rows(rs)
        };
        match plan {
            Plan::Done(r) => r,
            Plan::UseDb { dev_id, name } => {
                assert!(self.s.may_use_dev(dev_id, &Pw), "USE of a dev_id this login may not open");
                self.s.use_db(dev_id, &name);
                StmtResult::Ok { affected: 0, last_insert_id: 0 }
            }
            Plan::Publish(msgs) => {
                for (pipe, event, _) in &msgs {
                    assert!(exec::check_channel(pipe).is_ok(), "publish to bad channel {pipe:?}");
                    assert!(!event.is_empty() && event.len() <= 64);
                }
                StmtResult::Ok { affected: msgs.len() as u64, last_insert_id: 0 }
            }
            Plan::PipeCounts { names, proj }
            | Plan::Subscribers { names, proj }
            | Plan::HistorySelect { names, proj } => rows_for(&names, &proj),
            Plan::SettingsSelect { names, proj } => rows_for(&names.unwrap_or_default(), &proj),
            Plan::User { proj: Some(proj), query, .. } => {
                let ids: Vec<String> = query.user_ids().unwrap_or_default().iter().map(|id| id.to_string()).collect();
                rows_for(&ids, &proj)
            }
            Plan::User { last_insert_id, .. } => StmtResult::Ok { affected: 1, last_insert_id },
            Plan::HistoryDelete { .. } | Plan::SettingsSet(_) | Plan::SettingsDelete(_) => {
                StmtResult::Ok { affected: 1, last_insert_id: 0 }
            }
        }
    }
}

/// Splits an answer into packet payloads: whole packets only, numbered on
/// from `seq`.
fn read_packets(mut bytes: &[u8], mut seq: u8) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let f = packet::read_frame(bytes, 1 << 30).expect("answer frames").expect("answers are whole packets");
        assert_eq!(f.seq, seq, "packet {} of the answer", out.len());
        seq = seq.wrapping_add(1);
        bytes = &bytes[f.consumed..];
        out.push(f.payload);
    }
    out
}

/// An ERR packet: code, `#`, five-character SQLSTATE, message.
fn check_err(p: &[u8]) {
    assert!(p.len() >= 9 && p[0] == 0xFF && p[3] == b'#', "ERR packet {p:?}");
}

/// STMT_PREPARE_OK: the parameter count is the number of `?` marks, and one
/// definition packet follows per parameter.
fn check_prepare_ok(packets: &[Vec<u8>], sql: &str, deprecate_eof: bool) {
    let p = &packets[0];
    assert!(p.len() >= 12);
    let params = u16::from_le_bytes([p[7], p[8]]) as usize;
    assert_eq!(params, prepared::placeholders(sql).len());
    let eof = usize::from(params > 0 && !deprecate_eof);
    assert_eq!(packets.len(), 1 + params + eof);
}

/// Reads an encoded answer as a MySQL client does and compares it with the
/// results that were encoded.
/// Text is read back in the client's `charset`, so a value is expected as
/// it survives the trip ('?' where the set has no character).
fn check_results(packets: &[Vec<u8>], results: &[StmtResult], deprecate_eof: bool, binary: bool, charset: Charset) {
    let mut it = packets.iter();
    for (i, r) in results.iter().enumerate() {
        let more = i + 1 < results.len();
        let p = it.next().expect("one answer per result");
        match r {
            StmtResult::Ok { affected, last_insert_id } => {
                let mut q = &p[1..];
                assert_eq!(p[0], 0x00);
                assert_eq!(packet::take_lenenc_int(&mut q), Some(*affected));
                assert_eq!(packet::take_lenenc_int(&mut q), Some(*last_insert_id));
                check_status(q, more);
            }
            StmtResult::Err(code, msg) => {
                check_err(p);
                assert_eq!(u16::from_le_bytes([p[1], p[2]]), *code);
                assert_eq!(&p[9..], &*charset.encode(msg));
                assert!(!more, "an error is the last result");
            }
            StmtResult::Rows(rs) => check_result_set(p, &mut it, rs, deprecate_eof, binary, more, charset),
        }
    }
    assert!(it.next().is_none(), "packets after the last result");
}

/// The status flags of an OK or EOF: autocommit, and MORE_RESULTS exactly
/// when another result follows.
fn check_status(q: &[u8], more: bool) {
    assert!(q.len() >= 2);
    let status = u16::from_le_bytes([q[0], q[1]]);
    assert_ne!(status & packet::SERVER_STATUS_AUTOCOMMIT, 0);
    assert_eq!(status & packet::SERVER_MORE_RESULTS_EXISTS != 0, more);
}

fn check_result_set<'a>(
    head: &[u8],
    it: &mut impl Iterator<Item = &'a Vec<u8>>,
    rs: &ResultSet,
    deprecate_eof: bool,
    binary: bool,
    more: bool,
    charset: Charset,
) {
    // Zero columns would encode as 0x00, which a client reads as an OK.
    assert!(!rs.columns.is_empty(), "a result set without columns");
    let mut q = head;
    assert_eq!(packet::take_lenenc_int(&mut q), Some(rs.columns.len() as u64));
    assert!(q.is_empty());
    for col in &rs.columns {
        let mut d = &it.next().expect("column definition")[..];
        let mut strs = Vec::new();
        for _ in 0..6 {
            let n = packet::take_lenenc_int(&mut d).expect("column definition string") as usize;
            strs.push(d[..n].to_vec());
            d = &d[n..];
        }
        assert_eq!(strs[4], &*charset.encode(col), "column name");
        assert_eq!(d.len(), 13, "fixed part of a column definition");
    }
    if !deprecate_eof {
        let eof = it.next().expect("EOF after the columns");
        assert_eq!(eof[0], 0xFE);
        assert_eq!(eof.len(), 5);
    }
    let mut rows = Vec::new();
    loop {
        let p = it.next().expect("rows then a terminator");
        if p.first() == Some(&0xFE) && p.len() < 9 + 2 {
            // EOF (FE, warnings, status) and the closing OK (FE, 0, 0,
            // status, warnings) both have the status at bytes 3..5.
            check_status(&p[3..], more);
            break;
        }
        rows.push(if binary {
            binary_row(p, rs.columns.len(), charset)
        } else {
            text_row(p, rs.columns.len(), charset)
        });
    }
    let trip =
        |v: &Option<String>| v.as_ref().map(|s| charset.decode(&charset.encode(s)).expect("decodes").into_owned());
    let want: Vec<Vec<Option<String>>> = rs.rows.iter().map(|r| r.iter().map(trip).collect()).collect();
    assert_eq!(rows, want, "the rows a client reads");
}

fn text_row(mut p: &[u8], columns: usize, charset: Charset) -> Vec<Option<String>> {
    let mut row = Vec::new();
    for _ in 0..columns {
        if p.first() == Some(&0xFB) {
            p = &p[1..];
            row.push(None);
            continue;
        }
        let n = packet::take_lenenc_int(&mut p).expect("text value length") as usize;
        row.push(Some(charset.decode(&p[..n]).expect("values decode").into_owned()));
        p = &p[n..];
    }
    assert!(p.is_empty(), "bytes after the last value");
    row
}

fn binary_row(p: &[u8], columns: usize, charset: Charset) -> Vec<Option<String>> {
    assert_eq!(p[0], 0x00);
    let bitmap = &p[1..1 + (columns + 7 + 2) / 8];
    let mut p = &p[1 + bitmap.len()..];
    let mut row = Vec::new();
    for i in 0..columns {
        let bit = i + 2;
        if bitmap[bit / 8] & (1 << (bit % 8)) != 0 {
            row.push(None);
            continue;
        }
        let n = packet::take_lenenc_int(&mut p).expect("binary value length") as usize;
        row.push(Some(charset.decode(&p[..n]).expect("values decode").into_owned()));
        p = &p[n..];
    }
    assert!(p.is_empty(), "bytes after the last value");
    row
}
