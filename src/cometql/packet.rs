//! MySQL client/server packets, sans-IO: framing, the handshake and
//! authentication, and the encoders for OK, ERR, EOF and text result sets.
//!
//! References: the MySQL "Client/Server Protocol" documentation
//! (Protocol::Packet, Protocol::HandshakeV10, HandshakeResponse41,
//! Protocol::AuthSwitchRequest, caching_sha2_password fast path, OK/ERR/EOF
//! packets and Text Resultset).

use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::charset::Charset;
use crate::domain::ct_eq;

/// Largest payload in one packet; longer payloads continue in the next.
pub const MAX_PAYLOAD: usize = 0xFF_FFFF;

pub const CLIENT_LONG_PASSWORD: u32 = 0x1;
pub const CLIENT_FOUND_ROWS: u32 = 0x2;
pub const CLIENT_LONG_FLAG: u32 = 0x4;
pub const CLIENT_CONNECT_WITH_DB: u32 = 0x8;
pub const CLIENT_PROTOCOL_41: u32 = 0x200;
pub const CLIENT_SSL: u32 = 0x800;
pub const CLIENT_TRANSACTIONS: u32 = 0x2000;
pub const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
pub const CLIENT_MULTI_STATEMENTS: u32 = 0x1_0000;
pub const CLIENT_MULTI_RESULTS: u32 = 0x2_0000;
pub const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;
pub const CLIENT_CONNECT_ATTRS: u32 = 0x10_0000;
pub const CLIENT_PLUGIN_AUTH_LENENC: u32 = 0x20_0000;
pub const CLIENT_DEPRECATE_EOF: u32 = 0x100_0000;

/// What comet offers. CLIENT_SSL only when a certificate is configured
/// ([`greeting`]'s `tls`): advertising it without would make clients try
/// (CppComet's mistake).
pub const SERVER_CAPABILITIES: u32 = CLIENT_LONG_PASSWORD
    | CLIENT_FOUND_ROWS
    | CLIENT_LONG_FLAG
    | CLIENT_CONNECT_WITH_DB
    | CLIENT_PROTOCOL_41
    | CLIENT_TRANSACTIONS
    | CLIENT_SECURE_CONNECTION
    | CLIENT_MULTI_STATEMENTS
    | CLIENT_MULTI_RESULTS
    | CLIENT_PLUGIN_AUTH
    | CLIENT_CONNECT_ATTRS
    | CLIENT_PLUGIN_AUTH_LENENC
    | CLIENT_DEPRECATE_EOF;

pub const SERVER_STATUS_AUTOCOMMIT: u16 = 0x2;
pub const SERVER_MORE_RESULTS_EXISTS: u16 = 0x8;

/// utf8mb4_general_ci: known to MySQL and MariaDB clients alike.
pub const CHARSET: u8 = 45;
pub const SERVER_VERSION: &str = concat!("8.0.36-comet-", env!("CARGO_PKG_VERSION"));
pub const NATIVE: &str = "mysql_native_password";
pub const CACHING_SHA2: &str = "caching_sha2_password";

/// Column type of every CometQL column (values are text).
pub const TYPE_VAR_STRING: u8 = 0xFD;

/// One packet's payload found at the front of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    /// Sequence number of the last packet: a reply continues from it (a
    /// command split over two packets is answered from sequence 2).
    pub seq: u8,
    /// The payload, assembled across continuation packets.
    pub payload: Vec<u8>,
    /// Bytes of the buffer this frame used.
    pub consumed: usize,
}

/// Why the byte stream cannot be read as packets.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The assembled payload would exceed `max` bytes.
    TooLarge { max: usize },
}

/// Reads one (possibly multi-packet) payload from the front of `buf`.
/// `Ok(None)`: not all of it has arrived. A payload larger than `max` is
/// refused as soon as its announced length says so.
pub fn read_frame(buf: &[u8], max: usize) -> Result<Option<Frame>, FrameError> {
    let mut pos = 0;
    let mut total = 0usize;
    let mut parts: Vec<(usize, usize)> = Vec::new();
    let mut last_seq;
    loop {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([buf[pos], buf[pos + 1], buf[pos + 2], 0]) as usize;
        last_seq = buf[pos + 3];
        total += len;
        if total > max {
            return Err(FrameError::TooLarge { max });
        }
        if buf.len() < pos + 4 + len {
            return Ok(None);
        }
        parts.push((pos + 4, pos + 4 + len));
        pos += 4 + len;
        if len < MAX_PAYLOAD {
            break;
        }
    }
    let payload = if parts.len() == 1 {
        buf[parts[0].0..parts[0].1].to_vec()
    } else {
        let mut p = Vec::with_capacity(total);
        for (a, b) in parts {
            p.extend_from_slice(&buf[a..b]);
        }
        p
    };
    Ok(Some(Frame { seq: last_seq, payload, consumed: pos }))
}

/// Appends `payload` as one or more packets starting at sequence `seq`;
/// returns the next sequence number.
pub fn write_packet(out: &mut Vec<u8>, mut seq: u8, payload: &[u8]) -> u8 {
    let mut rest = payload;
    loop {
        let n = rest.len().min(MAX_PAYLOAD);
        out.extend_from_slice(&(n as u32).to_le_bytes()[..3]);
        out.push(seq);
        out.extend_from_slice(&rest[..n]);
        seq = seq.wrapping_add(1);
        rest = &rest[n..];
        if n < MAX_PAYLOAD {
            return seq;
        }
    }
}

/// Appends a length-encoded integer.
pub fn put_lenenc_int(out: &mut Vec<u8>, v: u64) {
    if v < 251 {
        out.push(v as u8);
    } else if v < 1 << 16 {
        out.push(0xFC);
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if v < 1 << 24 {
        out.push(0xFD);
        out.extend_from_slice(&(v as u32).to_le_bytes()[..3]);
    } else {
        out.push(0xFE);
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Appends a length-encoded string.
pub fn put_lenenc_str(out: &mut Vec<u8>, s: &[u8]) {
    put_lenenc_int(out, s.len() as u64);
    out.extend_from_slice(s);
}

/// The initial handshake packet's payload (HandshakeV10).
pub fn greeting(connection_id: u32, nonce: &[u8; 20], tls: bool) -> Vec<u8> {
    let caps = SERVER_CAPABILITIES | if tls { CLIENT_SSL } else { 0 };
    let mut p = Vec::with_capacity(128);
    p.push(10);
    p.extend_from_slice(SERVER_VERSION.as_bytes());
    p.push(0);
    p.extend_from_slice(&connection_id.to_le_bytes());
    p.extend_from_slice(&nonce[..8]);
    p.push(0);
    p.extend_from_slice(&(caps as u16).to_le_bytes());
    p.push(CHARSET);
    p.extend_from_slice(&SERVER_STATUS_AUTOCOMMIT.to_le_bytes());
    p.extend_from_slice(&((caps >> 16) as u16).to_le_bytes());
    p.push(21);
    p.extend_from_slice(&[0; 10]);
    p.extend_from_slice(&nonce[8..]);
    p.push(0);
    p.extend_from_slice(CACHING_SHA2.as_bytes());
    p.push(0);
    p
}

/// The client's HandshakeResponse41, as much as comet uses of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HandshakeResponse {
    pub capabilities: u32,
    pub user: String,
    pub auth: Vec<u8>,
    pub database: Option<String>,
    pub plugin: Option<String>,
    /// The collation id the client's character set is named by (0: none).
    pub collation: u8,
}

fn take_cstr<'a>(p: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = p.iter().position(|&b| b == 0)?;
    let s = &p[..end];
    *p = &p[end + 1..];
    Some(s)
}

/// Reads a length-encoded integer from the front of `p`.
pub fn take_lenenc_int(p: &mut &[u8]) -> Option<u64> {
    let (&first, rest) = p.split_first()?;
    let (v, used) = match first {
        0..=250 => (first as u64, 0),
        0xFC if rest.len() >= 2 => (u16::from_le_bytes([rest[0], rest[1]]) as u64, 2),
        0xFD if rest.len() >= 3 => (u32::from_le_bytes([rest[0], rest[1], rest[2], 0]) as u64, 3),
        0xFE if rest.len() >= 8 => (u64::from_le_bytes(rest[..8].try_into().ok()?), 8),
        _ => return None,
    };
    *p = &rest[used..];
    Some(v)
}

/// Parses the client's handshake response; `None` if malformed.
pub fn parse_handshake_response(payload: &[u8]) -> Option<HandshakeResponse> {
    if payload.len() < 32 {
        return None;
    }
    let capabilities = u32::from_le_bytes(payload[..4].try_into().ok()?);
    if capabilities & CLIENT_PROTOCOL_41 == 0 {
        return None;
    }
    let mut p = &payload[32..];
    let user = String::from_utf8_lossy(take_cstr(&mut p)?).into_owned();
    let auth = if capabilities & CLIENT_PLUGIN_AUTH_LENENC != 0 {
        let n = take_lenenc_int(&mut p)? as usize;
        if p.len() < n {
            return None;
        }
        let a = p[..n].to_vec();
        p = &p[n..];
        a
    } else if capabilities & CLIENT_SECURE_CONNECTION != 0 {
        let (&n, rest) = p.split_first()?;
        let n = n as usize;
        if rest.len() < n {
            return None;
        }
        p = &rest[n..];
        rest[..n].to_vec()
    } else {
        take_cstr(&mut p)?.to_vec()
    };
    let database = if capabilities & CLIENT_CONNECT_WITH_DB != 0 && !p.is_empty() {
        take_cstr(&mut p).map(|d| String::from_utf8_lossy(d).into_owned()).filter(|d| !d.is_empty())
    } else {
        None
    };
    let plugin = if capabilities & CLIENT_PLUGIN_AUTH != 0 && !p.is_empty() {
        take_cstr(&mut p).map(|d| String::from_utf8_lossy(d).into_owned())
    } else {
        None
    };
    Some(HandshakeResponse { capabilities, user, auth, database, plugin, collation: payload[8] })
}

/// `mysql_native_password`: SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))).
pub fn native_scramble(password: &[u8], nonce: &[u8]) -> [u8; 20] {
    let h1: [u8; 20] = Sha1::digest(password).into();
    let h2: [u8; 20] = Sha1::digest(h1).into();
    let mut h = Sha1::new();
    h.update(nonce);
    h.update(h2);
    let h3: [u8; 20] = h.finalize().into();
    let mut out = [0u8; 20];
    for i in 0..20 {
        out[i] = h1[i] ^ h3[i];
    }
    out
}

/// `caching_sha2_password`: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce).
pub fn sha2_scramble(password: &[u8], nonce: &[u8]) -> [u8; 32] {
    let h1: [u8; 32] = Sha256::digest(password).into();
    let h2: [u8; 32] = Sha256::digest(h1).into();
    let mut h = Sha256::new();
    h.update(h2);
    h.update(nonce);
    let h3: [u8; 32] = h.finalize().into();
    let mut out = [0u8; 32];
    for i in 0..32 {
        out[i] = h1[i] ^ h3[i];
    }
    out
}

/// Checks a scramble made with `plugin` against `password`.
pub fn verify(plugin: &str, password: &str, nonce: &[u8; 20], response: &[u8]) -> bool {
    if password.is_empty() || response.is_empty() {
        return false;
    }
    match plugin {
        NATIVE => ct_eq(&native_scramble(password.as_bytes(), nonce), response),
        CACHING_SHA2 => ct_eq(&sha2_scramble(password.as_bytes(), nonce), response),
        _ => false,
    }
}

/// `AuthSwitchRequest` to `mysql_native_password` with `nonce`.
pub fn auth_switch(nonce: &[u8; 20]) -> Vec<u8> {
    let mut p = Vec::with_capacity(48);
    p.push(0xFE);
    p.extend_from_slice(NATIVE.as_bytes());
    p.push(0);
    p.extend_from_slice(nonce);
    p.push(0);
    p
}

/// `caching_sha2_password` fast-auth-success (AuthMoreData 0x03).
pub const FAST_AUTH_OK: [u8; 2] = [0x01, 0x03];
/// caching_sha2_password's AuthMoreData "perform full authentication": the
/// client then sends its password in clear (over TLS) or asks for an RSA
/// key.
pub const PERFORM_FULL_AUTH: [u8; 2] = [0x01, 0x04];

/// An OK packet's payload.
pub fn ok(affected: u64, last_insert_id: u64, status: u16, info: &str) -> Vec<u8> {
    ok_with_header(0x00, affected, last_insert_id, status, info)
}

fn ok_with_header(header: u8, affected: u64, last_insert_id: u64, status: u16, info: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(16 + info.len());
    p.push(header);
    put_lenenc_int(&mut p, affected);
    put_lenenc_int(&mut p, last_insert_id);
    p.extend_from_slice(&status.to_le_bytes());
    p.extend_from_slice(&0u16.to_le_bytes());
    p.extend_from_slice(info.as_bytes());
    p
}

/// An ERR packet's payload with SQLSTATE HY000.
pub fn err(code: u16, message: &str) -> Vec<u8> {
    err_state(code, b"HY000", message.as_bytes())
}

/// An ERR packet's payload with its SQLSTATE; `message` is already in the
/// client's character set.
pub fn err_state(code: u16, state: &[u8; 5], message: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(9 + message.len());
    p.push(0xFF);
    p.extend_from_slice(&code.to_le_bytes());
    p.push(b'#');
    p.extend_from_slice(state);
    p.extend_from_slice(message);
    p
}

/// An EOF packet's payload.
pub fn eof(status: u16) -> Vec<u8> {
    let mut p = vec![0xFE, 0, 0];
    p.extend_from_slice(&status.to_le_bytes());
    p
}

/// A text result set: column names and rows of optional text values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResultSet {
    pub table: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
}

/// Appends a whole result set as packets from sequence 1.
pub fn write_result_set(out: &mut Vec<u8>, rs: &ResultSet, deprecate_eof: bool, status: u16) {
    write_result_set_from(out, 1, rs, deprecate_eof, status, false, Charset::Utf8mb4);
}

/// Appends a whole result set from sequence `seq`; returns the next one.
/// `deprecate_eof`: the client set CLIENT_DEPRECATE_EOF (no EOF after the
/// columns, an OK with header 0xFE at the end). `status` goes into the
/// final packet.
/// `binary`: rows in the binary protocol (answers to COM_STMT_EXECUTE).
/// `charset`: the client's result character set: text is converted to it
/// and column definitions carry its collation.
pub fn write_result_set_from(
    out: &mut Vec<u8>,
    mut seq: u8,
    rs: &ResultSet,
    deprecate_eof: bool,
    status: u16,
    binary: bool,
    charset: Charset,
) -> u8 {
    let mut p = Vec::with_capacity(64);
    put_lenenc_int(&mut p, rs.columns.len() as u64);
    seq = write_packet(out, seq, &p);
    for c in &rs.columns {
        p.clear();
        put_lenenc_str(&mut p, b"def");
        put_lenenc_str(&mut p, b"CometQL_v1");
        put_lenenc_str(&mut p, &charset.encode(&rs.table));
        put_lenenc_str(&mut p, &charset.encode(&rs.table));
        put_lenenc_str(&mut p, &charset.encode(c));
        put_lenenc_str(&mut p, &charset.encode(c));
        p.push(0x0C);
        p.extend_from_slice(&charset.collation().to_le_bytes());
        p.extend_from_slice(&1_048_576u32.to_le_bytes());
        p.push(TYPE_VAR_STRING);
        p.extend_from_slice(&0u16.to_le_bytes());
        p.push(0);
        p.extend_from_slice(&[0, 0]);
        seq = write_packet(out, seq, &p);
    }
    if !deprecate_eof {
        seq = write_packet(out, seq, &eof(status));
    }
    for row in &rs.rows {
        p.clear();
        if binary {
            binary_row(row, &mut p, charset);
            seq = write_packet(out, seq, &p);
            continue;
        }
        for v in row {
            match v {
                Some(s) => put_lenenc_str(&mut p, &charset.encode(s)),
                None => p.push(0xFB),
            }
        }
        seq = write_packet(out, seq, &p);
    }
    if deprecate_eof {
        write_packet(out, seq, &ok_with_header(0xFE, 0, 0, status, ""))
    } else {
        write_packet(out, seq, &eof(status))
    }
}

/// Appends one binary-protocol row (answers to COM_STMT_EXECUTE): every
/// column is VAR_STRING, NULLs are flagged in a bitmap that starts at bit 2.
pub fn binary_row(row: &[Option<String>], out: &mut Vec<u8>, charset: Charset) {
    out.push(0x00);
    let start = out.len();
    out.resize(start + (row.len() + 7 + 2) / 8, 0);
    for (i, v) in row.iter().enumerate() {
        if v.is_none() {
            let bit = i + 2;
            out[start + bit / 8] |= 1 << (bit % 8);
        }
    }
    for s in row.iter().flatten() {
        put_lenenc_str(out, &charset.encode(s));
    }
}

/// The OK packet (header 0xFE) that ends a result set under CLIENT_DEPRECATE_EOF.
pub fn ok_eof(status: u16) -> Vec<u8> {
    ok_with_header(0xFE, 0, 0, status, "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_split_and_reassemble_at_16_mib() {
        let payload = vec![7u8; MAX_PAYLOAD + 10];
        let mut out = Vec::new();
        assert_eq!(write_packet(&mut out, 0, &payload), 2);
        assert_eq!(&out[..4], &[0xFF, 0xFF, 0xFF, 0]);
        let f = read_frame(&out, 32 << 20).unwrap().unwrap();
        assert_eq!(f.payload.len(), payload.len());
        assert_eq!(f.consumed, out.len());
        // An exact multiple ends with an empty packet.
        let mut out = Vec::new();
        assert_eq!(write_packet(&mut out, 3, &vec![1u8; MAX_PAYLOAD]), 5);
        assert_eq!(&out[out.len() - 4..], &[0, 0, 0, 4]);
    }

    #[test]
    fn oversized_payload_is_refused_from_its_header() {
        let header = [0xFF, 0xFF, 0xFF, 0];
        assert_eq!(read_frame(&header, 1 << 20), Err(FrameError::TooLarge { max: 1 << 20 }));
    }

    #[test]
    fn partial_packets_wait() {
        assert_eq!(read_frame(&[5, 0, 0, 0, 3, b'a'], 100), Ok(None));
        assert_eq!(read_frame(&[5, 0], 100), Ok(None));
    }

    #[test]
    fn lenenc_fixtures() {
        for (v, bytes) in [
            (250u64, vec![0xFA]),
            (251, vec![0xFC, 0xFB, 0x00]),
            (65536, vec![0xFD, 0x00, 0x00, 0x01]),
            (1 << 24, vec![0xFE, 0, 0, 0, 1, 0, 0, 0, 0]),
        ] {
            let mut out = Vec::new();
            put_lenenc_int(&mut out, v);
            assert_eq!(out, bytes);
            let mut s = &bytes[..];
            assert_eq!(take_lenenc_int(&mut s), Some(v));
        }
    }

    #[test]
    fn ok_and_err_fixtures() {
        assert_eq!(ok(1, 42, SERVER_STATUS_AUTOCOMMIT, ""), [0x00, 0x01, 0x2A, 0x02, 0x00, 0x00, 0x00]);
        let e = err(16, "Access denied");
        assert_eq!(&e[..9], &[0xFF, 0x10, 0x00, b'#', b'H', b'Y', b'0', b'0', b'0']);
    }

    #[test]
    fn native_scramble_matches_a_known_vector() {
        // Computed with MySQL's algorithm for password "comet" and nonce 1..=20.
        let nonce: Vec<u8> = (1..=20).collect();
        let s = native_scramble(b"comet", &nonce);
        let h1: [u8; 20] = Sha1::digest(b"comet").into();
        // Unscramble: XOR with SHA1(nonce + SHA1(h1)) must give back h1.
        let h2: [u8; 20] = Sha1::digest(h1).into();
        let mut h = Sha1::new();
        h.update(&nonce);
        h.update(h2);
        let h3: [u8; 20] = h.finalize().into();
        let back: Vec<u8> = s.iter().zip(h3).map(|(a, b)| a ^ b).collect();
        assert_eq!(back, h1);
        let nonce20: [u8; 20] = nonce.try_into().unwrap();
        assert!(verify(NATIVE, "comet", &nonce20, &s));
        assert!(!verify(NATIVE, "other", &nonce20, &s));
        assert!(!verify(NATIVE, "", &nonce20, &[]));
    }

    #[test]
    fn greeting_layout() {
        let nonce = [b'a'; 20];
        let g = greeting(7, &nonce, false);
        assert_eq!(g[0], 10);
        let v_end = g.iter().position(|&b| b == 0).unwrap();
        assert_eq!(&g[1..v_end], SERVER_VERSION.as_bytes());
        let caps_lo = u16::from_le_bytes([g[v_end + 14], g[v_end + 15]]) as u32;
        let caps_hi = u16::from_le_bytes([g[v_end + 19], g[v_end + 20]]) as u32;
        let caps = caps_lo | caps_hi << 16;
        assert_eq!(caps, SERVER_CAPABILITIES);
        assert_eq!(caps & CLIENT_SSL, 0, "SSL must not be advertised");
        assert!(g.ends_with(b"caching_sha2_password\0"));
        let t = greeting(7, &nonce, true);
        let caps_lo = u16::from_le_bytes([t[v_end + 14], t[v_end + 15]]) as u32;
        assert_eq!(caps_lo & CLIENT_SSL, CLIENT_SSL, "SSL advertised with a certificate");
        assert_eq!(t.len(), g.len());
    }

    #[test]
    fn handshake_response_parses_plugin_auth_lenenc() {
        let mut p = Vec::new();
        let caps = CLIENT_PROTOCOL_41
            | CLIENT_PLUGIN_AUTH
            | CLIENT_PLUGIN_AUTH_LENENC
            | CLIENT_CONNECT_WITH_DB
            | CLIENT_SECURE_CONNECTION;
        p.extend_from_slice(&caps.to_le_bytes());
        p.extend_from_slice(&(1u32 << 24).to_le_bytes());
        p.push(45);
        p.extend_from_slice(&[0; 23]);
        p.extend_from_slice(b"root\0");
        p.push(3);
        p.extend_from_slice(&[1, 2, 3]);
        p.extend_from_slice(b"CometQL_v1\0mysql_native_password\0");
        let r = parse_handshake_response(&p).unwrap();
        assert_eq!(r.user, "root");
        assert_eq!(r.auth, [1, 2, 3]);
        assert_eq!(r.database.as_deref(), Some("CometQL_v1"));
        assert_eq!(r.plugin.as_deref(), Some(NATIVE));
        assert_eq!(r.collation, 45);
        assert_eq!(parse_handshake_response(&p[..20]), None);
    }

    #[test]
    fn result_set_classic_and_deprecate_eof() {
        let rs =
            ResultSet { table: "t".into(), columns: vec!["a".into()], rows: vec![vec![Some("x".into())], vec![None]] };
        let mut classic = Vec::new();
        write_result_set(&mut classic, &rs, false, 2);
        // count, 1 column def, EOF, 2 rows, EOF = 6 packets with seq 1..=6.
        let mut seqs = Vec::new();
        let mut s = &classic[..];
        while let Ok(Some(f)) = read_frame(s, 1 << 20) {
            seqs.push((f.seq, f.payload.first().copied()));
            s = &s[f.consumed..];
        }
        assert_eq!(seqs.iter().map(|x| x.0).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
        assert_eq!(seqs[2].1, Some(0xFE));
        assert_eq!(seqs[4].1, Some(0xFB));
        let mut modern = Vec::new();
        write_result_set(&mut modern, &rs, true, 2);
        let mut n = 0;
        let mut s = &modern[..];
        let mut last = 0;
        while let Ok(Some(f)) = read_frame(s, 1 << 20) {
            n += 1;
            last = f.payload[0];
            s = &s[f.consumed..];
        }
        assert_eq!((n, last), (5, 0xFE));
    }

    #[test]
    fn binary_rows_mark_nulls_from_bit_two() {
        let mut out = Vec::new();
        binary_row(&[Some("ab".into()), None], &mut out, Charset::Utf8mb4);
        assert_eq!(out, [0x00, 0b0000_1000, 2, b'a', b'b']);
    }

    #[test]
    fn latin1_results_carry_collation_8_and_latin1_text() {
        let rs = ResultSet { table: "t".into(), columns: vec!["a".into()], rows: vec![vec![Some("é€中".into())]] };
        let mut out = Vec::new();
        write_result_set_from(&mut out, 1, &rs, true, 2, false, Charset::Latin1);
        let mut frames = Vec::new();
        let mut s = &out[..];
        while let Ok(Some(f)) = read_frame(s, 1 << 20) {
            s = &s[f.consumed..];
            frames.push(f.payload);
        }
        // The column definition ends with: 0x0C, collation (2), length (4),
        // type, flags (2), decimals, filler (2).
        let def = &frames[1];
        assert_eq!(&def[def.len() - 12..def.len() - 10], &8u16.to_le_bytes());
        assert_eq!(frames[2], [3, 0xE9, 0x80, b'?']);
        let mut bin = Vec::new();
        binary_row(&[Some("é".into())], &mut bin, Charset::Latin1);
        assert_eq!(bin, [0x00, 0, 1, 0xE9]);
    }
}
