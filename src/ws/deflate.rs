//! permessage-deflate (RFC 7692), always without context takeover.
//!
//! comet accepts the extension only as
//! `permessage-deflate; server_no_context_takeover; client_no_context_takeover`:
//! every message is compressed and inflated on its own, so a connection keeps
//! no deflate state at all (one bit: negotiated or not). A shard owns one
//! [`Deflater`] and one [`Inflater`] and resets them per message.
//!
//! Negotiation ([`negotiate`]) takes the client's offers in order and accepts
//! the first one it can honour (RFC 7692 §5, §7.1):
//! - an offer with an unknown parameter, a repeated parameter or an invalid
//!   value is declined, and the next offer is tried;
//! - `server_max_window_bits` must carry a value 8..=15 and is answered with
//!   the same value (§7.1.2.1). comet's compressor cannot shrink its window,
//!   but without context takeover no back-reference reaches further than the
//!   message's own start: a connection that asked for a window of 2^N bytes
//!   gets compressed only the messages of at most 2^N bytes, the others go
//!   uncompressed (RSV1 clear), which RFC 7692 allows per message. So the
//!   offer is honoured rather than declined, and browsers and Autobahn's
//!   small-window offers all get compression;
//! - `client_max_window_bits` (with no value or 8..=15) is accepted and not
//!   answered: the inflater has a 32 KiB window, which covers any client
//!   window, so the client keeps whatever it offered (§7.1.2.2);
//! - `server_no_context_takeover` and `client_no_context_takeover` are
//!   answered whether offered or not (§7.1.1.1, §7.1.1.2 allow both).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The `Sec-WebSocket-Extensions` value comet answers with, before an
/// optional `; server_max_window_bits=N`.
pub const RESPONSE: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// An accepted offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The `server_max_window_bits` the client asked for, if it did.
    pub server_max_window_bits: Option<u8>,
}

impl Accepted {
    /// The server's window, 8..=15: the connection keeps this byte (0 is
    /// "not negotiated").
    pub fn window_bits(self) -> u8 {
        self.server_max_window_bits.unwrap_or(15)
    }

    /// The `Sec-WebSocket-Extensions` answer.
    pub fn response(self) -> String {
        match self.server_max_window_bits {
            Some(n) => format!("{RESPONSE}; server_max_window_bits={n}"),
            None => RESPONSE.to_string(),
        }
    }
}

/// Whether a frame of `frame_len` bytes may be sent compressed to a client
/// whose window is `window_bits` (see the module comment).
pub fn fits_window(frame_len: usize, window_bits: u8) -> bool {
    window_bits >= 15 || frame_len <= 1 << window_bits
}

/// Frames whose payload is shorter are sent uncompressed: below this,
/// deflate's block overhead and the CPU are not worth the few bytes saved
/// (see bench/RESULTS.md, "permessage-deflate").
pub const THRESHOLD: usize = 256;

/// Largest payload the echo endpoint really deflates (larger: stored).
pub const ECHO_DEFLATE_MAX: usize = 16 * 1024;

/// The 4 bytes a sync flush ends with, removed by the sender and added back
/// by the receiver (RFC 7692 §7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The first acceptable offer in the `Sec-WebSocket-Extensions` values.
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Accepted> {
    values.into_iter().flat_map(split_outside_quotes(',')).find_map(acceptable)
}

/// Splits on `sep` where it is not inside a quoted string.
fn split_outside_quotes(sep: char) -> impl Fn(&str) -> Vec<&str> {
    move |s: &str| {
        let mut parts = Vec::new();
        let (mut start, mut quoted, mut escaped) = (0, false, false);
        for (i, c) in s.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                c if c == sep && !quoted => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        parts
    }
}

/// One offer: `permessage-deflate` and parameters comet can honour.
fn acceptable(offer: &str) -> Option<Accepted> {
    let parts = split_outside_quotes(';')(offer);
    let mut parts = parts.iter().map(|p| p.trim());
    if !parts.next().is_some_and(|n| n.eq_ignore_ascii_case("permessage-deflate")) {
        return None;
    }
    let mut accepted = Accepted { server_max_window_bits: None };
    let mut seen = [false; 4];
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => {
                let v = v.trim();
                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
                (n.trim(), Some(v))
            }
            None => (param, None),
        };
        let slot = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            "server_max_window_bits" => {
                accepted.server_max_window_bits = Some(window_bits(value?)?);
                2
            }
            "client_max_window_bits" if value.is_none_or(|v| window_bits(v).is_some()) => 3,
            _ => return None,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return None;
        }
    }
    Some(accepted)
}

/// A window size 8..=15 written as 1*DIGIT without a leading zero.
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 2 {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

/// A shard's compressor: one raw-deflate state, reset for every message.
pub struct Deflater(Compress);

impl Default for Deflater {
    fn default() -> Deflater {
        Deflater(Compress::new(Compression::new(6), false))
    }
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Deflater")
    }
}

impl Deflater {
    /// Compresses a whole server frame (FIN set, unmasked, text or binary)
    /// into a frame with RSV1; `None` when `frame` is not such a frame, its
    /// payload is under [`THRESHOLD`] or compression would not shrink it.
    pub fn frame(&mut self, frame: &[u8]) -> Option<Vec<u8>> {
        let (b0, payload) = split_frame(frame)?;
        if payload.len() < THRESHOLD || !matches!(b0, 0x81 | 0x82) {
            return None;
        }
        let z = self.compress(payload)?;
        if z.len() >= payload.len() {
            return None;
        }
        let mut out = Vec::with_capacity(z.len() + 10);
        super::frame_header(if b0 == 0x81 { super::Opcode::Text } else { super::Opcode::Binary }, z.len(), &mut out);
        out[0] |= 0x40;
        out.extend_from_slice(&z);
        Some(out)
    }

    /// Compresses every data frame, whatever its size, for the echo
    /// endpoint (a conformance tool: Autobahn's client, kosoku, cannot take
    /// an uncompressed message once deflate is negotiated). A frame that does
    /// not fit the client's window, or that deflate does not shrink, goes as
    /// stored deflate blocks: RSV1 set, no back-references. So do frames
    /// over [`ECHO_DEFLATE_MAX`]: the echo endpoint answers Autobahn's
    /// thousands of 128 KiB messages, and deflating them all made the CI
    /// run minutes longer without testing anything the smaller ones don't.
    pub fn frame_every(&mut self, frame: &[u8], window_bits: u8) -> Option<Vec<u8>> {
        let (b0, payload) = split_frame(frame)?;
        if !matches!(b0, 0x81 | 0x82) {
            return None;
        }
        let deflate = fits_window(frame.len(), window_bits) && payload.len() <= ECHO_DEFLATE_MAX;
        let z = match deflate.then(|| self.compress(payload)).flatten() {
            Some(z) if z.len() < payload.len() => z,
            _ => stored(payload),
        };
        let mut out = Vec::with_capacity(z.len() + 10);
        super::frame_header(if b0 == 0x81 { super::Opcode::Text } else { super::Opcode::Binary }, z.len(), &mut out);
        out[0] |= 0x40;
        out.extend_from_slice(&z);
        Some(out)
    }

    /// Raw deflate of one message, sync-flushed, without the 4-byte tail.
    ///
    /// One call with room for the worst case (stored blocks: 5 bytes per
    /// 16 KiB at most, plus the flush): miniz_oxide, resumed after filling
    /// the output mid-flush, was seen to end the stream without its sync
    /// marker and lose the message's end. Anything but a complete,
    /// marker-ended stream is refused and the message goes uncompressed.
    pub fn compress(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        let c = &mut self.0;
        c.reset();
        let mut out = Vec::with_capacity(payload.len() + payload.len() / 1024 + 64);
        c.compress_vec(payload, &mut out, FlushCompress::Sync).ok()?;
        if c.total_in() as usize != payload.len() || out.len() == out.capacity() || !out.ends_with(&TAIL) {
            return None;
        }
        out.truncate(out.len() - 4);
        Some(out)
    }
}

/// `payload` as stored (uncompressed) deflate blocks, without the final
/// empty block a sync flush would end with (RFC 1951 §3.2.4).
fn stored(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 5 * (payload.len() / 65535 + 1));
    for chunk in payload.chunks(65535) {
        let n = chunk.len() as u16;
        out.push(0x00);
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(!n).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// The first byte and the payload of an unmasked server frame.
fn split_frame(frame: &[u8]) -> Option<(u8, &[u8])> {
    let b1 = *frame.get(1)?;
    let (len, pos) = match b1 {
        126 => (u16::from_be_bytes([*frame.get(2)?, *frame.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(frame.get(2..10)?.try_into().ok()?) as usize, 10),
        l if l < 126 => (l as usize, 2),
        _ => return None,
    };
    let payload = frame.get(pos..)?;
    (payload.len() == len).then_some((frame[0], payload))
}

/// Why a compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit (close 1009).
    TooBig,
    /// It is not a valid deflate stream (close 1007).
    Invalid,
}

/// A shard's decompressor: one raw-inflate state, reset for every message.
pub struct Inflater(Decompress);

impl Default for Inflater {
    fn default() -> Inflater {
        Inflater(Decompress::new(false))
    }
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inflater")
    }
}

impl Inflater {
    /// Inflates one message into `out` (cleared first), producing at most
    /// `limit + 1` bytes: a bomb stops there with [`InflateError::TooBig`].
    /// The output slice handed to the inflater never reaches past
    /// `limit + 1`, whatever capacity `out` kept from earlier messages.
    pub fn inflate(&mut self, data: &[u8], limit: usize, out: &mut Vec<u8>) -> Result<(), InflateError> {
        let d = &mut self.0;
        d.reset(false);
        out.clear();
        let cap = limit + 1;
        let mut filled = 0;
        for input in [data, &TAIL[..]] {
            let mut consumed = 0;
            loop {
                if filled == out.len() {
                    if filled >= cap {
                        out.truncate(filled);
                        return Err(InflateError::TooBig);
                    }
                    let grow = filled.max(input.len() * 4).max(1024).min(cap - filled);
                    out.resize(filled + grow, 0);
                }
                let (in0, out0) = (d.total_in(), d.total_out());
                let status = d.decompress(&input[consumed..], &mut out[filled..], FlushDecompress::Sync);
                consumed += (d.total_in() - in0) as usize;
                filled += (d.total_out() - out0) as usize;
                let status = status.map_err(|_| InflateError::Invalid);
                if filled > limit {
                    out.truncate(filled);
                    return Err(InflateError::TooBig);
                }
                match status? {
                    // A final block: whatever follows is not deflate data,
                    // except the tail comet added.
                    Status::StreamEnd => {
                        out.truncate(filled);
                        return Ok(());
                    }
                    Status::Ok | Status::BufError => {
                        let room = filled < out.len();
                        if consumed == input.len() && room {
                            break;
                        }
                        if (d.total_in(), d.total_out()) == (in0, out0) && room {
                            out.truncate(filled);
                            return Err(InflateError::Invalid);
                        }
                    }
                }
            }
        }
        out.truncate(filled);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_accepted_or_declined_per_rfc7692() {
        let yes = [
            ("permessage-deflate", None),
            ("permessage-deflate; client_max_window_bits", None),
            ("permessage-deflate; client_max_window_bits=10; server_no_context_takeover", None),
            ("x-webkit-deflate-frame, permessage-deflate; client_no_context_takeover", None),
            ("permessage-deflate; server_max_window_bits=15", Some(15)),
            ("permessage-deflate; server_max_window_bits=\"9\"", Some(9)),
            ("permessage-deflate; server_max_window_bits=10, permessage-deflate", Some(10)),
            ("permessage-deflate; server_max_window_bits=7, permessage-deflate", None),
            ("Permessage-Deflate ;Client_Max_Window_Bits = 8", None),
        ];
        for (v, bits) in yes {
            assert_eq!(negotiate([v]), Some(Accepted { server_max_window_bits: bits }), "{v}");
        }
        let no = [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=015",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; foo",
            "permessage-deflate; foo=\"a,permessage-deflate\"",
        ];
        for v in no {
            assert_eq!(negotiate([v]), None, "{v}");
        }
        // Offers spread over several header lines.
        assert!(negotiate(["permessage-deflate; foo", "permessage-deflate; client_max_window_bits"]).is_some());
        assert_eq!(
            Accepted { server_max_window_bits: Some(9) }.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9"
        );
        assert!(fits_window(512, 9) && !fits_window(513, 9) && fits_window(1 << 20, 15));
    }

    #[test]
    fn rfc7692_hello_fixture_round_trips() {
        // RFC 7692 §7.2.3.1: "Hello" compressed without context takeover.
        let z = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        let mut out = Vec::new();
        Inflater::default().inflate(&z, 100, &mut out).unwrap();
        assert_eq!(out, b"Hello");
        let mut d = Deflater::default();
        let mine = d.compress(b"Hello").unwrap();
        let mut back = Vec::new();
        Inflater::default().inflate(&mine, 100, &mut back).unwrap();
        assert_eq!(back, b"Hello");
        // RFC 7692 §7.2.3.3: a block with no compression.
        Inflater::default()
            .inflate(&[0x00, 0x05, 0x00, 0xfa, 0xff, b'H', b'e', b'l', b'l', b'o', 0x00], 100, &mut back)
            .unwrap();
        assert_eq!(back, b"Hello");
    }

    #[test]
    fn frames_compress_above_the_threshold_only() {
        let mut d = Deflater::default();
        let mut small = Vec::new();
        super::super::encode_frame(super::super::Opcode::Text, &[b'a'; THRESHOLD - 1], &mut small);
        assert_eq!(d.frame(&small), None);
        let json = br#"{"event":"message","data":"hello hello hello"}"#.repeat(20);
        let mut big = Vec::new();
        super::super::encode_frame(super::super::Opcode::Text, &json, &mut big);
        let z = d.frame(&big).unwrap();
        assert_eq!(z[0], 0xC1);
        let (_, payload) = split_frame(&z).unwrap();
        let mut back = Vec::new();
        Inflater::default().inflate(payload, json.len(), &mut back).unwrap();
        assert_eq!(back, json);
        // The echo endpoint compresses everything, stored when it must.
        let z = d.frame_every(&small, 15).unwrap();
        assert_eq!(z[0], 0xC1);
        let (_, payload) = split_frame(&z).unwrap();
        Inflater::default().inflate(payload, 1000, &mut back).unwrap();
        assert_eq!(back, [b'a'; THRESHOLD - 1]);
        let z = d.frame_every(&big, 9).unwrap();
        let (_, payload) = split_frame(&z).unwrap();
        assert_eq!(payload.len(), json.len() + 5);
        assert_eq!(payload[..5], [0x00, 0x98, 0x03, 0x67, 0xfc]);
        Inflater::default().inflate(payload, json.len(), &mut back).unwrap();
        assert_eq!(back, json);
        // Control frames are never compressed.
        let mut ping = Vec::new();
        super::super::encode_frame(super::super::Opcode::Ping, &[b'a'; 100], &mut ping);
        assert_eq!(d.frame(&ping), None);
    }

    #[test]
    fn every_slice_of_a_bitmap_round_trips() {
        // Found by Autobahn 12.2.9: a 64 KiB slice of a bitmap lost its end
        // when the compressor's output was resumed mid-flush.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut data = Vec::with_capacity(300_000);
        while data.len() < 300_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let run = 1 + (seed % 40) as usize;
            let b = (seed >> 8) as u8 & 0xF0;
            data.extend(std::iter::repeat_n(b, run));
            data.extend_from_slice(&seed.to_le_bytes()[..(seed >> 60) as usize % 8]);
        }
        let (mut d, mut inf, mut out) = (Deflater::default(), Inflater::default(), Vec::new());
        for len in [65536, 131072, 1000, 70_000] {
            for start in (0..data.len() - len).step_by(9973) {
                let msg = &data[start..start + len];
                let z = d.compress(msg).unwrap();
                inf.inflate(&z, len, &mut out).unwrap();
                assert!(out == msg, "slice {start}+{len}");
            }
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let mut d = Deflater::default();
        let z = d.compress(&vec![b'a'; 10 << 20]).unwrap();
        assert!(z.len() < 100_000, "{}", z.len());
        let mut out = Vec::new();
        let mut inf = Inflater::default();
        assert_eq!(inf.inflate(&z, 65536, &mut out), Err(InflateError::TooBig));
        assert!(out.len() <= 65537, "{}", out.len());
        // Exactly at the limit is fine, and the inflater is reusable.
        let z = d.compress(&[b'b'; 65536]).unwrap();
        inf.inflate(&z, 65536, &mut out).unwrap();
        assert_eq!(out.len(), 65536);
        assert_eq!(inf.inflate(&[0xff, 0xff, 0xff], 100, &mut out), Err(InflateError::Invalid));
    }
}
