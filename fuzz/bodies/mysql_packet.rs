//! Fuzz body for MySQL packet framing and the client's HandshakeResponse41
//! (`comet::cometql::packet`).
//!
//! The input is a byte stream from a MySQL client. Framing must consume no
//! more than it was given, never return a payload over the limit, and
//! re-encode a one-packet frame to the very bytes it came from. The stream
//! read as a HandshakeResponse must read back the same when written in the
//! canonical form of its own capability flags. Length-encoded integers
//! round-trip.

use comet::cometql::packet::{
    self, CLIENT_CONNECT_WITH_DB, CLIENT_PLUGIN_AUTH, CLIENT_PLUGIN_AUTH_LENENC, CLIENT_SECURE_CONNECTION, FrameError,
    HandshakeResponse, MAX_PAYLOAD,
};

pub fn run(data: &[u8]) {
    check_framing(data);
    check_handshake_response(data);
    if data.len() >= 4 {
        check_handshake_response(&data[4..]);
    }
    let v = u64::from_le_bytes(std::array::from_fn(|i| data.get(i).copied().unwrap_or(0)));
    for v in [v, v & 0xFF, v & 0xFFFF, v & 0xFF_FFFF, v >> (data.first().copied().unwrap_or(0) & 63)] {
        let mut out = Vec::new();
        packet::put_lenenc_int(&mut out, v);
        let mut p = &out[..];
        assert_eq!(packet::take_lenenc_int(&mut p), Some(v), "lenenc {out:?}");
        assert!(p.is_empty());
    }
    let mut p = data;
    if let Some(v) = packet::take_lenenc_int(&mut p) {
        assert!(data.len() - p.len() <= 9);
        assert!(v < 251 || data.len() - p.len() > 1);
    }
}

fn check_framing(data: &[u8]) {
    let max = 1 << 16;
    match packet::read_frame(data, max) {
        Ok(Some(f)) => {
            assert!(f.consumed <= data.len() && f.consumed >= 4);
            assert!(f.payload.len() <= max);
            assert_eq!(f.consumed % (MAX_PAYLOAD + 4), (f.payload.len() + 4) % (MAX_PAYLOAD + 4));
            if f.payload.len() < MAX_PAYLOAD {
                let mut out = Vec::new();
                let next = packet::write_packet(&mut out, f.seq, &f.payload);
                assert_eq!(next, f.seq.wrapping_add(1));
                assert_eq!(out, data[..f.consumed], "a one-packet frame re-encodes to its bytes");
            }
            // The rest of the stream frames on its own, as the next read would.
            let _ = packet::read_frame(&data[f.consumed..], max);
        }
        Ok(None) => {
            // Incomplete: so is every shorter prefix.
            if !data.is_empty() {
                assert_eq!(packet::read_frame(&data[..data.len() - 1], max), Ok(None));
            }
        }
        Err(FrameError::TooLarge { max: m }) => {
            assert_eq!(m, max);
            let announced = u32::from_le_bytes([data[0], data[1], data[2], 0]) as usize;
            assert!(announced > max, "refused a payload of {announced} bytes");
        }
    }
}

fn check_handshake_response(payload: &[u8]) {
    let Some(r) = packet::parse_handshake_response(payload) else {
        return;
    };
    let again = packet::parse_handshake_response(&encode(&r));
    assert_eq!(again.as_ref(), Some(&r), "re-encoded as {:?}", encode(&r));
}

/// The HandshakeResponse41 a client with `r.capabilities` would send.
fn encode(r: &HandshakeResponse) -> Vec<u8> {
    let caps = r.capabilities;
    let mut p = caps.to_le_bytes().to_vec();
    p.extend_from_slice(&(1u32 << 24).to_le_bytes());
    p.push(r.collation);
    p.extend_from_slice(&[0; 23]);
    p.extend_from_slice(r.user.as_bytes());
    p.push(0);
    if caps & CLIENT_PLUGIN_AUTH_LENENC != 0 {
        packet::put_lenenc_str(&mut p, &r.auth);
    } else if caps & CLIENT_SECURE_CONNECTION != 0 {
        p.push(r.auth.len() as u8);
        p.extend_from_slice(&r.auth);
    } else {
        p.extend_from_slice(&r.auth);
        p.push(0);
    }
    if caps & CLIENT_CONNECT_WITH_DB != 0 && (r.database.is_some() || r.plugin.is_some()) {
        p.extend_from_slice(r.database.as_deref().unwrap_or("").as_bytes());
        p.push(0);
    }
    if caps & CLIENT_PLUGIN_AUTH != 0
        && let Some(plugin) = &r.plugin
    {
        p.extend_from_slice(plugin.as_bytes());
        p.push(0);
    }
    p
}
