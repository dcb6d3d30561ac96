//! Client-side wire helpers: WebSocket handshake and frames, MySQL packets
//! and login, a minimal HTTP/1.1 keep-alive client. Just enough protocol
//! for a load generator, independent of the server's own code.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Microseconds since the unix epoch: the timestamp publishes carry, so
/// readers in other processes can compute latency too.
pub fn epoch_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Connects from source address 127.0.0.`source`.
pub fn connect_from(server: &SocketAddr, source: u8) -> std::io::Result<TcpStream> {
    connect_within(server, source, None)
}

/// Connects from 127.0.0.`source`, giving up after `timeout` (a full
/// listen backlog drops SYNs, and the kernel retries them for minutes).
pub fn connect_within(server: &SocketAddr, source: u8, timeout: Option<Duration>) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let local: SocketAddr = format!("127.0.0.{source}:0").parse().expect("address");
    sock.bind(&local.into())?;
    match timeout {
        Some(t) => sock.connect_timeout(&(*server).into(), t)?,
        None => sock.connect(&(*server).into())?,
    }
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(timeout.unwrap_or(Duration::from_secs(15))))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sends an upgrade request for `path` and reads past the 101 head.
pub fn ws_handshake(s: &mut (impl Read + Write), path: &str) -> std::io::Result<()> {
    match ws_upgrade(s, path)? {
        (101, _) => Ok(()),
        (_, head) => Err(std::io::Error::other(format!("upgrade refused: {head}"))),
    }
}

/// `--deflate`: every handshake offers permessage-deflate, as browsers do.
pub static OFFER_DEFLATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The upgrade request for `path` (offering permessage-deflate with `--deflate`).
pub fn upgrade_request(path: &str) -> String {
    let ext = match OFFER_DEFLATE.load(std::sync::atomic::Ordering::Relaxed) {
        true => "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
        false => "",
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
    )
}

/// Sends an upgrade request for `path` and reads the answer's head; returns
/// its status code (101 when upgraded) and the head as text.
pub fn ws_upgrade(s: &mut (impl Read + Write), path: &str) -> std::io::Result<(u16, String)> {
    s.write_all(upgrade_request(path).as_bytes())?;
    let mut head = Vec::with_capacity(256);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Err(std::io::Error::other("closed during handshake"));
        }
        head.push(b[0]);
        if head.len() > 8192 {
            return Err(std::io::Error::other("handshake answer too long"));
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, head))
}

/// Sends a masked text frame.
pub fn send_text(s: &mut (impl Read + Write), text: &str) -> std::io::Result<()> {
    let mut v = Vec::with_capacity(text.len() + 14);
    encode_masked(0x1, text.as_bytes(), &mut v);
    s.write_all(&v)
}

/// Appends a masked client frame (FIN set) with `opcode` and `p` to `v`.
pub fn encode_masked(opcode: u8, p: &[u8], v: &mut Vec<u8>) {
    v.push(0x80 | opcode);
    push_masked_len(p.len(), v);
    let key = [0x11u8, 0x22, 0x33, 0x44];
    v.extend_from_slice(&key);
    v.extend(p.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
}

/// Appends the second header byte (mask bit set) and any extended length.
pub fn push_masked_len(len: usize, v: &mut Vec<u8>) {
    if len < 126 {
        v.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        v.push(0x80 | 126);
        v.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        v.push(0x80 | 127);
        v.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Parses one unmasked server frame: (opcode, payload start, total length).
pub fn parse_frame(b: &[u8]) -> Option<(u8, usize, usize)> {
    if b.len() < 2 {
        return None;
    }
    let (len, start) = match b[1] & 0x7F {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        l => (l as usize, 2),
    };
    (b.len() >= start + len).then_some((b[0] & 0x0F, start, start + len))
}

/// Reads one whole frame (blocking): (opcode, payload).
pub fn read_frame(s: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    let len = match h[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b)?;
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b)?;
            u64::from_be_bytes(b) as usize
        }
        l => l as usize,
    };
    let mut p = vec![0u8; len];
    s.read_exact(&mut p)?;
    Ok((h[0] & 0x0F, p))
}

/// The payload of a frame, inflated when it has RSV1 (permessage-deflate).
pub fn frame_payload<'a>(
    first: u8,
    payload: &'a [u8],
    inflater: &mut comet::ws::deflate::Inflater,
    out: &'a mut Vec<u8>,
) -> &'a [u8] {
    if first & 0x40 == 0 {
        return payload;
    }
    match inflater.inflate(payload, 16 << 20, out) {
        Ok(()) => out,
        Err(_) => &[],
    }
}

/// The publish time (µs since the unix epoch) a message carries: comet's
/// JSON envelope (`"data":"<digits>`) or a peer's raw `<digits>` body.
pub fn payload_ts(p: &[u8]) -> Option<u64> {
    // Read on every delivery by the fan-out readers: no allocation.
    let digits_at = |at: usize| -> Option<u64> {
        let mut v: Option<u64> = None;
        for &b in p.get(at..)?.iter().take_while(|b| b.is_ascii_digit()) {
            v = Some(v.unwrap_or(0).checked_mul(10)?.checked_add(u64::from(b - b'0'))?);
        }
        v
    };
    if p.first().is_some_and(u8::is_ascii_digit) {
        return digits_at(0);
    }
    let key = b"\"data\":\"";
    let at = p.windows(key.len()).position(|w| w == key)? + key.len();
    digits_at(at)
}

/// Writes one MySQL packet.
pub fn mysql_packet(out: &mut Vec<u8>, seq: u8, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes()[..3]);
    out.push(seq);
    out.extend_from_slice(payload);
}

pub fn mysql_read(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h)?;
    let mut p = vec![0u8; u32::from_le_bytes([h[0], h[1], h[2], 0]) as usize];
    s.read_exact(&mut p)?;
    Ok(p)
}

/// A length-encoded integer from the front of `p`.
pub fn lenenc(p: &mut &[u8]) -> u64 {
    let (v, used) = match p.first() {
        Some(&b) if b < 251 => (b as u64, 1),
        Some(0xFC) => (u16::from_le_bytes([p[1], p[2]]) as u64, 3),
        Some(0xFD) => (u32::from_le_bytes([p[1], p[2], p[3], 0]) as u64, 4),
        _ => (u64::from_le_bytes(p.get(1..9).and_then(|s| s.try_into().ok()).unwrap_or_default()), 9),
    };
    *p = &p[used.min(p.len())..];
    v
}

/// Logs in to CometQL with mysql_native_password.
pub fn mysql_login(addr: &SocketAddr, password: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    mysql_auth(&mut s, password)?;
    Ok(s)
}

/// `n` logged-in CometQL connections spread evenly over comet's `shards`
/// shards. The kernel hands each new connection to a shard at random
/// (SO_REUSEPORT), so 4 connections over 2 shards land 2/2 only 3 times in
/// 8 (4/0 once in 8), and with the SQL parsing all on one shard a run
/// measures that draw more than the server. comet's connection id names
/// the shard in its top byte: connections to a shard that has its share
/// are closed and made again (at most 16 tries per connection; a server
/// whose ids say nothing of shards is taken as it comes).
pub fn mysql_logins_spread(
    addr: &SocketAddr,
    password: &str,
    n: usize,
    shards: usize,
) -> std::io::Result<Vec<TcpStream>> {
    let shards = shards.max(1);
    let share = n.div_ceil(shards);
    let mut per = vec![0usize; shards];
    let mut out = Vec::with_capacity(n);
    let mut tries = 0;
    while out.len() < n {
        tries += 1;
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let g = mysql_read(&mut s)?;
        let id = g
            .iter()
            .position(|&b| b == 0)
            .and_then(|v| g.get(v + 1..v + 5))
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let shard = (id >> 24) as usize;
        if shard < shards && per[shard] >= share && tries < 16 * n {
            continue;
        }
        if g.first() == Some(&0xFF) {
            return Err(std::io::Error::other(format!("refused before login: {}", String::from_utf8_lossy(&g))));
        }
        s.write_all(&native_auth_response(&g, password)?)?;
        let ok = mysql_read(&mut s)?;
        if ok.first() != Some(&0) {
            return Err(std::io::Error::other(format!("login refused: {}", String::from_utf8_lossy(&ok))));
        }
        if shard < shards {
            per[shard] += 1;
        }
        out.push(s);
    }
    Ok(out)
}

/// Reads the greeting and answers it with `password`; Ok once the server
/// says OK, else the server's error packet as text.
pub fn mysql_auth(s: &mut TcpStream, password: &str) -> std::io::Result<()> {
    let g = mysql_read(s)?;
    if g.first() == Some(&0xFF) {
        return Err(std::io::Error::other(format!("refused before login: {}", String::from_utf8_lossy(&g))));
    }
    s.write_all(&native_auth_response(&g, password)?)?;
    let ok = mysql_read(s)?;
    if ok.first() != Some(&0) {
        return Err(std::io::Error::other(format!("login refused: {}", String::from_utf8_lossy(&ok))));
    }
    Ok(())
}

/// The handshake response packet (sequence 1) that answers `greeting`
/// as user `root` with mysql_native_password.
pub fn native_auth_response(greeting: &[u8], password: &str) -> std::io::Result<Vec<u8>> {
    use sha1::{Digest, Sha1};
    let g = greeting;
    let vend = g.iter().position(|&b| b == 0).ok_or_else(|| std::io::Error::other("bad greeting"))?;
    let bad = || std::io::Error::other("greeting too short");
    let mut nonce = g.get(vend + 5..vend + 13).ok_or_else(bad)?.to_vec();
    nonce.extend_from_slice(g.get(vend + 32..vend + 44).ok_or_else(bad)?);
    let h1: [u8; 20] = Sha1::digest(password.as_bytes()).into();
    let h2: [u8; 20] = Sha1::digest(h1).into();
    let mut h = Sha1::new();
    h.update(&nonce);
    h.update(h2);
    let h3: [u8; 20] = h.finalize().into();
    let caps: u32 = 0x200 | 0x8000 | 0x80000;
    let mut p = Vec::new();
    p.extend_from_slice(&caps.to_le_bytes());
    p.extend_from_slice(&(1u32 << 24).to_le_bytes());
    p.push(45);
    p.extend_from_slice(&[0; 23]);
    p.extend_from_slice(b"root\0");
    p.push(20);
    p.extend(h1.iter().zip(h3).map(|(a, b)| a ^ b));
    p.extend_from_slice(b"mysql_native_password\0");
    let mut out = Vec::new();
    mysql_packet(&mut out, 1, &p);
    Ok(out)
}

/// Runs one query and returns affected rows (OK) or an error.
pub fn mysql_exec(s: &mut TcpStream, sql: &str) -> std::io::Result<u64> {
    let mut q = vec![0x03];
    q.extend_from_slice(sql.as_bytes());
    let mut out = Vec::new();
    mysql_packet(&mut out, 0, &q);
    s.write_all(&out)?;
    let p = mysql_read(s)?;
    match p.first() {
        Some(0) => {
            let mut rest = &p[1..];
            Ok(lenenc(&mut rest))
        }
        _ => Err(std::io::Error::other(format!("query failed: {}", String::from_utf8_lossy(&p)))),
    }
}

/// One HTTP/1.1 POST on a keep-alive connection; returns the body.
pub fn http_post(s: &mut TcpStream, path: &str, body: &str) -> std::io::Result<String> {
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut head = Vec::with_capacity(512);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Err(std::io::Error::other("closed"));
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let status_ok = text.starts_with("http/1.1 2");
    let len: usize =
        text.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status_ok {
        return Err(std::io::Error::other(format!("publish failed: {}{body}", String::from_utf8_lossy(&head))));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::payload_ts;

    #[test]
    fn a_timestamp_is_read_from_a_bare_payload_or_a_comet_data_field() {
        assert_eq!(payload_ts(b"1700000000123456 x"), Some(1_700_000_000_123_456));
        assert_eq!(
            payload_ts(br#"{"data":"1700000000123456","event_name":"undefined","pipe":"bench_fan_0"}"#),
            Some(1_700_000_000_123_456)
        );
        assert_eq!(payload_ts(br#"{"data":"warmup"}"#), None);
        assert_eq!(payload_ts(b"warmup"), None);
        assert_eq!(payload_ts(b"99999999999999999999999"), None, "overflow is not a timestamp");
    }
}
