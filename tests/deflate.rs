//! permessage-deflate (RFC 7692) against the real server on both I/O
//! backends, with a byte-level client: tungstenite 0.26 has no
//! permessage-deflate, so this client frames, masks and inflates by hand
//! (flate2, raw deflate) and checks RSV1 on every frame.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{BACKENDS, Server, eventually};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

const OFFER: &str = "permessage-deflate; client_max_window_bits";
const ACCEPT: &str =
    "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n";

/// A hand-driven WebSocket client that may offer permessage-deflate.
struct Z {
    s: TcpStream,
    head: String,
}

impl Z {
    fn open(addr: SocketAddr, path: &str, extensions: Option<&str>, user_agent: &str) -> Z {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let ext = extensions.map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n")).unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nUser-Agent: {user_agent}\r\n{ext}\r\n"
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        Z { s, head }
    }

    fn comet(s: &Server, uuid: &str, extensions: Option<&str>) -> Z {
        let path = format!("/ws/sesion=&myid=&devid=0&v=4.08&uuid={uuid}&api=js");
        let mut z = Z::open(s.addr, &path, extensions, "test");
        let (_, info) = z.message();
        assert!(info.contains("serverInfo"), "{info}");
        z
    }

    /// Reads one frame: (first byte, payload).
    fn frame(&mut self) -> (u8, Vec<u8>) {
        common::read_frame(&mut self.s)
    }

    /// Reads one data message: (first byte, text, inflated if RSV1).
    fn message(&mut self) -> (u8, String) {
        loop {
            let (b0, p) = self.frame();
            match b0 & 0x0F {
                0x1 | 0x2 => {
                    let p = if b0 & 0x40 != 0 { inflate(&p) } else { p };
                    return (b0, String::from_utf8(p).unwrap());
                }
                0x8 => panic!("closed: {p:?}"),
                _ => continue,
            }
        }
    }

    fn send(&mut self, first: u8, payload: &[u8]) {
        let mut v = vec![first];
        if payload.len() < 126 {
            v.push(0x80 | payload.len() as u8);
        } else if payload.len() <= 0xFFFF {
            v.push(0x80 | 126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            v.push(0x80 | 127);
            v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        let key = [9u8, 8, 7, 6];
        v.extend_from_slice(&key);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        self.s.write_all(&v).unwrap();
    }

    /// Sends a compressed text message (RSV1 on the first frame only).
    fn send_compressed(&mut self, text: &[u8], fragments: usize) {
        let z = deflate(text);
        let n = z.len().div_ceil(fragments.max(1)).max(1);
        let chunks: Vec<&[u8]> = z.chunks(n).collect();
        for (i, c) in chunks.iter().enumerate() {
            let fin = if i + 1 == chunks.len() { 0x80 } else { 0 };
            let first = if i == 0 { 0x41 } else { 0x00 };
            self.send(fin | first, c);
        }
    }

    fn close_code(&mut self) -> u16 {
        loop {
            let (b0, p) = self.frame();
            if b0 & 0x0F == 0x8 {
                return u16::from_be_bytes([p[0], p[1]]);
            }
        }
    }
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(data.len() * 20 + 1024);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
    assert_eq!(d.total_in() as usize, input.len());
    out
}

fn start(io: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--io", io, "--shards", "2"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn wait_count(c: &mut Z, pipe: &str, n: u64) {
    let ok = eventually(5, || {
        c.send_compressed(format!("pipe_count\n{pipe}\nm\n").as_bytes(), 1);
        c.message().1.contains(&format!("\"user_in_pipe\":{n}"))
    });
    assert!(ok, "{pipe} never reached {n} subscribers");
}

#[test]
fn big_publishes_arrive_compressed_small_ones_plain_and_plain_clients_unchanged() {
    for io in BACKENDS {
        let s = start(io, &[]);
        let mut subs: Vec<Z> = (0..6).map(|i| Z::comet(&s, &format!("z{i}"), Some(OFFER))).collect();
        assert!(subs[0].head.contains(ACCEPT), "{io}: {}", subs[0].head);
        let mut plain = Z::comet(&s, "plain", None);
        assert!(!plain.head.contains("Sec-WebSocket-Extensions"), "{io}: {}", plain.head);
        for z in subs.iter_mut().chain([&mut plain]) {
            z.send(0x81, b"subscription\nweb_z");
        }
        let mut publisher = Z::comet(&s, "pub", Some(OFFER));
        wait_count(&mut publisher, "web_z", 7);
        let big = format!("{{\"text\":\"{}\"}}", "comet pushes compressible JSON; ".repeat(40));
        // The command itself goes compressed and fragmented.
        publisher.send_compressed(format!("web_pipe2\nweb_z\nbig\n*\n{big}").as_bytes(), 3);
        for z in &mut subs {
            let (b0, text) = z.message();
            assert_eq!(b0, 0xC1, "{io}: a big message comes compressed");
            assert!(
                text.contains("comet pushes compressible JSON") && text.contains("\"event\":\"big\""),
                "{io}: {text}"
            );
        }
        let (b0, text) = plain.message();
        assert_eq!(b0, 0x81, "{io}: no RSV1 without the extension");
        // The delivery report quotes the message: compressed on its own.
        let (b0, report) = publisher.message();
        assert_eq!(b0, 0xC1, "{io}: {report}");
        assert!(report.contains("\"number_messages\":7"), "{io}: {report}");
        assert!(text.contains("\"event\":\"big\""), "{io}");
        publisher.send(0x81, b"web_pipe2\nweb_z\nsmall\n*\nhi");
        for z in subs.iter_mut().chain([&mut plain]) {
            let (b0, text) = z.message();
            assert_eq!(b0, 0x81, "{io}: a small message goes plain: {text}");
        }
        // One count per compressed delivery: 6 subscribers and the report.
        let frames: i64 = (0..2).map(|i| s.metric(&format!("comet_deflated_frames_total{{shard=\"{i}\"}}"))).sum();
        assert_eq!(frames, 7, "{io}");
        let saved: i64 = (0..2).map(|i| s.metric(&format!("comet_deflate_bytes_saved_total{{shard=\"{i}\"}}"))).sum();
        assert!(saved > 6 * 1000, "{io}: saved {saved}");
    }
}

#[test]
fn compressed_client_messages_are_bounded_and_checked() {
    for io in BACKENDS {
        let s = start(io, &["--max-message-size", "4096"]);
        // A bomb: 1 MiB of zeros in about a kilobyte.
        let mut z = Z::comet(&s, "bomb", Some(OFFER));
        z.send_compressed(&vec![b'0'; 1 << 20], 1);
        assert_eq!(z.close_code(), 1009, "{io}");
        // Exactly at the limit is fine.
        let mut z = Z::comet(&s, "edge", Some(OFFER));
        let mut cmd = b"pipe_count\nweb_edge\nm\n".to_vec();
        cmd.resize(4096, b' ');
        z.send_compressed(&cmd, 2);
        assert!(z.message().1.contains("user_in_pipe"), "{io}");
        // RSV1 on a control frame, on a continuation, or not negotiated: 1002.
        let mut z = Z::comet(&s, "ping", Some(OFFER));
        z.send(0xC9, b"");
        assert_eq!(z.close_code(), 1002, "{io}: ping");
        let mut z = Z::comet(&s, "cont", Some(OFFER));
        let d = deflate(b"pipe_count\nweb_x\nm\n");
        z.send(0x41, &d[..2]);
        z.send(0xC0, &d[2..]);
        assert_eq!(z.close_code(), 1002, "{io}: continuation");
        let mut z = Z::comet(&s, "plain", None);
        z.send(0xC1, &deflate(b"pipe_count\nweb_x\nm\n"));
        assert_eq!(z.close_code(), 1002, "{io}: not negotiated");
        // Not deflate data, or not UTF-8 once inflated: 1007.
        let mut z = Z::comet(&s, "junk", Some(OFFER));
        z.send(0xC1, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(z.close_code(), 1007, "{io}: junk");
        let mut z = Z::comet(&s, "utf8", Some(OFFER));
        z.send(0xC1, &deflate(&[0xce, 0xff]));
        assert_eq!(z.close_code(), 1007, "{io}: utf-8");
        // The shard's inflater is fine after all that.
        let mut z = Z::comet(&s, "after", Some(OFFER));
        z.send_compressed(b"pipe_count\nweb_after\nm\n", 1);
        assert!(z.message().1.contains("user_in_pipe"), "{io}");
    }
}

#[test]
fn compression_off_and_excluded_user_agents_get_no_extension() {
    let s = Server::start(&["--compression", "off", "--echo-path", "/echo"]);
    let z = Z::open(s.addr, "/echo", Some(OFFER), "test");
    assert!(!z.head.contains("Sec-WebSocket-Extensions"), "{}", z.head);
    let s = Server::start(&["--compression-exclude-ua", "OldPhone/2,Broken", "--echo-path", "/echo"]);
    let z = Z::open(s.addr, "/echo", Some(OFFER), "Mozilla/5.0 (OldPhone/2.1)");
    assert!(!z.head.contains("Sec-WebSocket-Extensions"), "{}", z.head);
    let z = Z::open(s.addr, "/echo", Some(OFFER), "Mozilla/5.0 (Fine)");
    assert!(z.head.contains(ACCEPT), "{}", z.head);
    // A window the client asked for is answered, and messages longer than
    // it go plain (comet endpoint) -- here on the echo endpoint, which
    // compresses everything, they go as stored blocks.
    let mut z = Z::open(s.addr, "/echo", Some("permessage-deflate; server_max_window_bits=9"), "x");
    assert!(z.head.contains("client_no_context_takeover; server_max_window_bits=9\r\n"), "{}", z.head);
    let long = "0123456789".repeat(100);
    z.send_compressed(long.as_bytes(), 1);
    let (b0, p) = z.frame();
    assert_eq!(b0, 0xC1);
    assert_eq!(p[0], 0x00, "stored block");
    assert_eq!(inflate(&p), long.as_bytes());
    z.send_compressed(&long.as_bytes()[..400], 1);
    let (b0, p) = z.frame();
    assert_eq!((b0, p[0] & 0x06 != 0), (0xC1, true), "small enough: really compressed");
    assert_eq!(inflate(&p), &long.as_bytes()[..400]);
}
