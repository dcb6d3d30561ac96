//! Random and mutated input against every sans-IO parser: none may panic,
//! whatever the bytes. A deterministic generator keeps failures repeatable;
//! seeds that once found a problem stay in the corpus below.

use comet::cometql::{exec, packet, parser, session};
use comet::frontend::{command, url};
use comet::ws;

/// xorshift64*: small, deterministic, good enough to shake parsers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.next() % max as u64) as usize;
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// `seed` with a few bytes flipped, inserted or cut.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..=(self.next() % 4) {
            match self.next() % 3 {
                0 if !v.is_empty() => {
                    let i = (self.next() % v.len() as u64) as usize;
                    v[i] = self.next() as u8;
                }
                1 => {
                    let i = (self.next() % (v.len() as u64 + 1)) as usize;
                    v.insert(i, self.next() as u8);
                }
                _ if !v.is_empty() => {
                    let i = (self.next() % v.len() as u64) as usize;
                    v.truncate(i);
                }
                _ => {}
            }
        }
        v
    }
}

const ROUNDS: usize = 100_000;

#[test]
fn websocket_decoder_and_handshake_survive_garbage() {
    let mut r = Rng(0x5eed_0001);
    let seeds: [&[u8]; 3] = [
        &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58],
        &[0x01, 0x83, 1, 2, 3, 4, 5, 6, 7, 0x80, 0x82, 1, 2, 3, 4, 5, 6],
        &[0x88, 0x82, 1, 2, 3, 4, 0x03, 0xEA],
    ];
    for i in 0..ROUNDS {
        let mut buf = if i % 2 == 0 { r.bytes(200) } else { r.mutate(seeds[i % 3]) };
        let mut d = ws::Decoder::new(1 + (r.next() % 300) as usize);
        // Feed the buffer frame by frame until it fails or runs dry.
        let mut pos = 0;
        for _ in 0..64 {
            match d.decode(&mut buf[pos..]) {
                ws::frame::Decoded::Event { consumed, .. } | ws::frame::Decoded::Fragment { consumed } => {
                    let _ = d.take_assembled();
                    pos += consumed;
                }
                _ => break,
            }
            if pos >= buf.len() {
                break;
            }
        }
        let head = r.mutate(b"GET /ws/sesion=k&myid=1&v=4 HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n");
        if let Ok(Some(req)) = ws::parse_request(&head) {
            let _ = req.validate_upgrade();
            let _ = url::ws_params(&req.path).map(url::parse_params);
        }
    }
}

#[test]
fn deflate_offers_and_compressed_messages_survive_garbage() {
    let mut r = Rng(0x5eed_00df);
    let mut d = ws::deflate::Deflater::default();
    let mut inf = ws::deflate::Inflater::default();
    let good = d.compress(&b"pipe_count\nweb_a\nm\n".repeat(30)).unwrap();
    let mut out = Vec::new();
    for i in 0..ROUNDS / 10 {
        let offer =
            r.mutate(b"permessage-deflate; client_max_window_bits; server_max_window_bits=10, permessage-deflate");
        let _ = ws::deflate::negotiate([String::from_utf8_lossy(&offer).as_ref()]);
        let z = if i % 2 == 0 { r.bytes(300) } else { r.mutate(&good) };
        let limit = 1 + (r.next() % 2000) as usize;
        let _ = inf.inflate(&z, limit, &mut out);
        assert!(out.len() <= limit + 1, "inflated {} past the limit {limit}", out.len());
    }
    inf.inflate(&good, 1 << 20, &mut out).unwrap();
    assert_eq!(out, b"pipe_count\nweb_a\nm\n".repeat(30));
}

#[test]
fn comet_commands_and_urls_survive_garbage() {
    let mut r = Rng(0x5eed_0002);
    for i in 0..ROUNDS {
        let seed: &[u8] = match i % 4 {
            0 => b"subscription\nweb_a\ntrack_b",
            1 => b"web_pipe2\nweb_a\nev\n*\nmsg",
            2 => b"pipe_count\nweb_a\nm\n",
            _ => b"user_data\nm\n12",
        };
        let bytes = r.mutate(seed);
        let _ = command::parse(&String::from_utf8_lossy(&bytes));
        let _ = url::parse_params(&String::from_utf8_lossy(&r.bytes(120)));
    }
}

#[test]
fn mysql_packets_and_sessions_survive_garbage() {
    struct Pw;
    impl session::Passwords for Pw {
        fn password(&self, _: u32) -> &str {
            "pw"
        }
    }
    let mut r = Rng(0x5eed_0003);
    for i in 0..ROUNDS {
        let bytes = if i % 2 == 0 { r.bytes(300) } else { r.mutate(&[5, 0, 0, 0, 3, b'S', b'E', b'L', b' ']) };
        let _ = packet::read_frame(&bytes, 1 << 20);
        let _ = packet::parse_handshake_response(&bytes);
        // An authenticated session gets garbage commands.
        let nonce = *b"abcdefghijklmnopqrst";
        let mut s = session::Session::new(1, nonce);
        let mut login = Vec::new();
        login.extend_from_slice(&(0x200u32 | 0x8000 | 0x80000).to_le_bytes());
        login.extend_from_slice(&[0, 0, 0, 1, 45]);
        login.extend_from_slice(&[0; 23]);
        login.extend_from_slice(b"root\0\x14");
        login.extend_from_slice(&packet::native_scramble(b"pw", &nonce));
        login.extend_from_slice(b"mysql_native_password\0");
        s.on_packet(packet::Frame { seq: 1, payload: login, consumed: 0 }, &Pw);
        assert!(s.is_authenticated());
        let mut prep = vec![0x16];
        prep.extend_from_slice(b"INSERT INTO pipes_messages VALUES (?, ?, ?)");
        let _ = s.on_packet(packet::Frame { seq: 0, payload: prep, consumed: 0 }, &Pw);
        for _ in 0..3 {
            let mut payload = r.bytes(60);
            if let Some(b) = payload.first_mut() {
                *b %= 0x20;
            }
            let _ = s.on_packet(packet::Frame { seq: 0, payload, consumed: 0 }, &Pw);
            // A garbage EXECUTE of the prepared statement (id 1).
            let mut exec = vec![0x17, 1, 0, 0, 0];
            exec.extend(r.bytes(40));
            let _ = s.on_packet(packet::Frame { seq: 0, payload: exec, consumed: 0 }, &Pw);
        }
        let mut s = session::Session::new(1, nonce);
        // A garbage handshake, then (if it somehow authenticates) commands.
        for p in 0..3 {
            let payload = r.bytes(80);
            let events = s.on_packet(packet::Frame { seq: p, payload, consumed: 0 }, &Pw);
            if events.contains(&session::Event::Close) {
                break;
            }
        }
    }
}

#[test]
fn cometql_parser_and_planner_survive_garbage() {
    let mut r = Rng(0x5eed_0004);
    let seeds = [
        "INSERT INTO pipes_messages (name, event, message) VALUES ('web_a', 'e', '{\\\"a\\\":1}'), ('b_b', 'e', 'x')",
        "SELECT id, `index` FROM users_messages WHERE id IN (1, '2') AND id = 3 LIMIT 1, 2",
        "DELETE FROM revoked_tokens WHERE token = 'eyJ.a.b'; SHOW VARIABLES LIKE 'max%'",
        "SELECT @@version_comment, DATABASE() AS d LIMIT 1; USE db_3; SET NAMES utf8mb4",
    ];
    let ctx = exec::Ctx::standalone(1 << 20);
    for i in 0..ROUNDS {
        let bytes = r.mutate(seeds[i % seeds.len()].as_bytes());
        let sql = String::from_utf8_lossy(&bytes);
        if let Ok(stmts) = parser::parse(&sql) {
            for st in stmts {
                let _ = exec::plan(st, &ctx);
            }
        }
    }
}
