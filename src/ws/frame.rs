//! WebSocket frame codec: decode masked client frames, encode unmasked server
//! frames.
//!
//! The decoder works on a caller-owned byte buffer and unmasks in place, so a
//! connection that receives whole frames in one read never copies them. It
//! reassembles fragmented messages (allowing control frames in between),
//! enforces the message size limit (1009) and UTF-8 of text (1007, checked per
//! fragment so an invalid sequence fails fast), and turns every other protocol
//! violation into 1002. Binary messages are reported like text ones without the
//! UTF-8 check: the comet protocol treats them as text commands and the command
//! parser rejects what it cannot read.

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Continuation = 0x0,
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

impl Opcode {
    fn from_u8(b: u8) -> Option<Opcode> {
        Some(match b {
            0x0 => Opcode::Continuation,
            0x1 => Opcode::Text,
            0x2 => Opcode::Binary,
            0x8 => Opcode::Close,
            0x9 => Opcode::Ping,
            0xA => Opcode::Pong,
            _ => return None,
        })
    }

    fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// Close codes the server sends (RFC 6455 §7.4 and comet's 4xxx range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    pub const POLICY: CloseCode = CloseCode(1008);
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    /// The server failed handling the connection's input (a bug).
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// Heartbeat timeout: the peer stopped answering pings.
    pub const HEARTBEAT_TIMEOUT: CloseCode = CloseCode(4000);
    /// The connection's outbound queue went over its bound.
    pub const SLOW_CONSUMER: CloseCode = CloseCode(4008);

    /// Whether a peer may send this code in a close frame (RFC 6455 §7.4.1/2).
    pub fn is_valid_from_peer(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// One thing the decoder found in the byte stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete text or binary message. `compressed`: its first frame had
    /// RSV1 (permessage-deflate), so `payload` is deflate data, not yet
    /// checked for UTF-8 or size: the caller inflates it.
    Message { text: bool, compressed: bool, payload: &'a [u8] },
    /// A ping; the caller answers with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong; ignored by comet except as a sign of life.
    Pong,
    /// The peer closed. `code` is `None` when the close frame had no body;
    /// the caller echoes the code (or sends 1000 for an empty body).
    Close { code: Option<u16> },
}

/// What decoding a buffer produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// `consumed` bytes made up one event.
    Event { event: Event<'a>, consumed: usize },
    /// `consumed` bytes were a fragment that is now held by the decoder.
    Fragment { consumed: usize },
    /// Not enough bytes for a whole frame yet.
    NeedMore,
    /// The stream is broken; close with this code.
    Fail(CloseCode),
}

/// Per-connection decoder state.
///
/// Empty (no heap) except while a fragmented message is being reassembled, so
/// an idle connection pays only for the size limit and one `Option`.
#[derive(Debug)]
pub struct Decoder {
    /// Largest accepted message, in bytes (default 64 KiB).
    max_message: usize,
    /// permessage-deflate was negotiated: RSV1 may start a data message.
    deflate: bool,
    /// A fragmented message being assembled.
    partial: Option<Box<Partial>>,
}

/// A fragmented message being assembled.
#[derive(Debug)]
struct Partial {
    text: bool,
    /// Its first frame had RSV1: the bytes are deflate data.
    compressed: bool,
    bytes: Vec<u8>,
}

/// What a [`Decoder`] keeps between reads: the fragmented message being
/// assembled, if any. A connection stores this (one pointer, no heap when
/// idle) rather than a whole decoder, whose size limit is the server's.
#[derive(Debug, Default)]
pub struct Fragments(Option<Box<Partial>>);

impl Decoder {
    pub fn new(max_message: usize) -> Decoder {
        Decoder { max_message, deflate: false, partial: None }
    }

    /// A decoder for a connection that negotiated permessage-deflate.
    pub fn with_deflate(max_message: usize, deflate: bool) -> Decoder {
        Decoder { max_message, deflate, partial: None }
    }

    /// A decoder that goes on with the fragments a connection kept.
    pub fn resume(max_message: usize, deflate: bool, kept: Fragments) -> Decoder {
        Decoder { max_message, deflate, partial: kept.0 }
    }

    /// What the connection keeps until its next read.
    pub fn suspend(self) -> Fragments {
        Fragments(self.partial)
    }

    /// Decodes at most one frame from the front of `buf`, unmasking in place.
    pub fn decode<'b>(&mut self, buf: &'b mut [u8]) -> Decoded<'b> {
        if buf.len() < 2 {
            return Decoded::NeedMore;
        }
        let b0 = buf[0];
        let b1 = buf[1];
        let fin = b0 & 0x80 != 0;
        if b0 & 0x30 != 0 {
            return Decoded::Fail(CloseCode::PROTOCOL_ERROR);
        }
        let Some(opcode) = Opcode::from_u8(b0 & 0x0F) else {
            return Decoded::Fail(CloseCode::PROTOCOL_ERROR);
        };
        // RSV1 marks a compressed message: only with permessage-deflate, and
        // only on the first frame of a data message (RFC 7692 §6.1).
        let compressed = b0 & 0x40 != 0;
        if compressed && (!self.deflate || !matches!(opcode, Opcode::Text | Opcode::Binary)) {
            return Decoded::Fail(CloseCode::PROTOCOL_ERROR);
        }
        if b1 & 0x80 == 0 {
            // Clients must mask (RFC 6455 §5.1).
            return Decoded::Fail(CloseCode::PROTOCOL_ERROR);
        }
        let (len, mut pos) = match b1 & 0x7F {
            126 => {
                if buf.len() < 4 {
                    return Decoded::NeedMore;
                }
                (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
            }
            127 => {
                if buf.len() < 10 {
                    return Decoded::NeedMore;
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                let l = u64::from_be_bytes(b);
                if l >> 63 != 0 {
                    return Decoded::Fail(CloseCode::PROTOCOL_ERROR);
                }
                (l, 10)
            }
            l => (l as u64, 2),
        };
        if opcode.is_control() && (!fin || len > 125) {
            return Decoded::Fail(CloseCode::PROTOCOL_ERROR);
        }
        // Size check before waiting for the bytes: a peer announcing a huge
        // frame is refused at once instead of being buffered.
        // Compressed bytes get a little room: deflate's stored blocks make
        // incompressible data slightly longer than it inflates to; the
        // inflated size is held to `max_message` by the caller.
        let held = self.partial.as_ref().map_or(0, |p| p.bytes.len() as u64);
        let deflated = compressed || self.partial.as_ref().is_some_and(|p| p.compressed);
        let max = if deflated { self.max_message + self.max_message / 1024 + 64 } else { self.max_message };
        if !opcode.is_control() && held + len > max as u64 {
            return Decoded::Fail(CloseCode::TOO_BIG);
        }
        let len = len as usize;
        if buf.len() < pos + 4 + len {
            return Decoded::NeedMore;
        }
        let mask = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        let consumed = pos + len;
        let payload = &mut buf[pos..consumed];
        unmask(payload, mask);

        match opcode {
            Opcode::Ping => Decoded::Event { event: Event::Ping(payload), consumed },
            Opcode::Pong => Decoded::Event { event: Event::Pong, consumed },
            Opcode::Close => match payload.len() {
                0 => Decoded::Event { event: Event::Close { code: None }, consumed },
                1 => Decoded::Fail(CloseCode::PROTOCOL_ERROR),
                _ => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    if !CloseCode::is_valid_from_peer(code) {
                        return Decoded::Fail(CloseCode::PROTOCOL_ERROR);
                    }
                    if std::str::from_utf8(&payload[2..]).is_err() {
                        return Decoded::Fail(CloseCode::INVALID_PAYLOAD);
                    }
                    Decoded::Event { event: Event::Close { code: Some(code) }, consumed }
                }
            },
            Opcode::Text | Opcode::Binary => {
                if self.partial.is_some() {
                    return Decoded::Fail(CloseCode::PROTOCOL_ERROR);
                }
                let text = opcode == Opcode::Text;
                let check = text && !compressed;
                if fin {
                    if check && std::str::from_utf8(payload).is_err() {
                        return Decoded::Fail(CloseCode::INVALID_PAYLOAD);
                    }
                    return Decoded::Event { event: Event::Message { text, compressed, payload }, consumed };
                }
                if check && utf8_prefix_invalid(payload) {
                    return Decoded::Fail(CloseCode::INVALID_PAYLOAD);
                }
                self.partial = Some(Box::new(Partial { text, compressed, bytes: payload.to_vec() }));
                Decoded::Fragment { consumed }
            }
            Opcode::Continuation => {
                let Some(partial) = self.partial.as_mut() else {
                    return Decoded::Fail(CloseCode::PROTOCOL_ERROR);
                };
                partial.bytes.extend_from_slice(payload);
                let (text, compressed) = (partial.text, partial.compressed);
                let check = text && !compressed;
                if !fin {
                    if check && utf8_prefix_invalid(&partial.bytes) {
                        return Decoded::Fail(CloseCode::INVALID_PAYLOAD);
                    }
                    return Decoded::Fragment { consumed };
                }
                if check && std::str::from_utf8(&partial.bytes).is_err() {
                    return Decoded::Fail(CloseCode::INVALID_PAYLOAD);
                }
                // The assembled message is handed out by `take_assembled`.
                Decoded::Event { event: Event::Message { text, compressed, payload: &[] }, consumed }
            }
        }
    }

    /// Whether the last `Message` event was a reassembled fragmented message,
    /// whose bytes must be taken with [`Decoder::take_assembled`].
    pub fn has_assembled(&self) -> bool {
        self.partial.is_some()
    }

    /// Takes the reassembled message after a final continuation frame.
    pub fn take_assembled(&mut self) -> Option<Vec<u8>> {
        self.partial.take().map(|p| p.bytes)
    }
}

/// True when `bytes` cannot be the start of valid UTF-8 (an incomplete last
/// sequence is fine: the next fragment may complete it).
fn utf8_prefix_invalid(bytes: &[u8]) -> bool {
    match std::str::from_utf8(bytes) {
        Ok(_) => false,
        Err(e) => e.error_len().is_some(),
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let mut chunks = payload.chunks_exact_mut(8);
    let m8 = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_ne_bytes(w) ^ m8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Writes the header of an unmasked server frame with FIN set.
pub fn frame_header(opcode: Opcode, len: usize, out: &mut Vec<u8>) {
    out.push(0x80 | opcode as u8);
    if len < 126 {
        out.push(len as u8);
    } else if len <= 0xFFFF {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends a whole unmasked server frame.
pub fn encode_frame(opcode: Opcode, payload: &[u8], out: &mut Vec<u8>) {
    frame_header(opcode, payload.len(), out);
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and a short UTF-8 reason, cut to the
/// 123 bytes a control frame has room for, at a character boundary: a
/// reason that is not valid UTF-8 makes the client fail the connection
/// (RFC 6455 §5.5.1, §8.1).
pub fn encode_close(code: CloseCode, reason: &str, out: &mut Vec<u8>) {
    let mut n = reason.len().min(123);
    while !reason.is_char_boundary(n) {
        n -= 1;
    }
    let reason = &reason.as_bytes()[..n];
    frame_header(Opcode::Close, 2 + reason.len(), out);
    out.extend_from_slice(&code.0.to_be_bytes());
    out.extend_from_slice(reason);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut v = vec![first];
        let len = payload.len();
        if len < 126 {
            v.push(0x80 | len as u8);
        } else if len <= 0xFFFF {
            v.push(0x80 | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(0x80 | 127);
            v.extend_from_slice(&(len as u64).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    #[test]
    fn rfc6455_masked_hello_fixture() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let mut buf = vec![0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let mut d = Decoder::new(65536);
        assert_eq!(
            d.decode(&mut buf),
            Decoded::Event { event: Event::Message { text: true, compressed: false, payload: b"Hello" }, consumed: 11 }
        );
    }

    #[test]
    fn server_frames_use_7_16_and_64_bit_lengths() {
        let mut out = Vec::new();
        encode_frame(Opcode::Text, b"Hello", &mut out);
        assert_eq!(out, [0x81, 0x05, b'H', b'e', b'l', b'l', b'o']);
        out.clear();
        frame_header(Opcode::Text, 256, &mut out);
        assert_eq!(out, [0x81, 0x7E, 0x01, 0x00]);
        out.clear();
        frame_header(Opcode::Text, 65536, &mut out);
        assert_eq!(out, [0x81, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn partial_frames_need_more_bytes() {
        let full = masked(0x81, &[b'x'; 300]);
        let mut d = Decoder::new(65536);
        for cut in [1, 3, 7, 100, full.len() - 1] {
            let mut part = full[..cut].to_vec();
            assert_eq!(d.decode(&mut part), Decoded::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn unmasked_client_frame_is_protocol_error() {
        let mut buf = vec![0x81, 0x02, b'h', b'i'];
        assert_eq!(Decoder::new(100).decode(&mut buf), Decoded::Fail(CloseCode::PROTOCOL_ERROR));
    }

    #[test]
    fn reserved_bits_and_opcodes_are_protocol_errors() {
        for first in [0xC1u8, 0xA1, 0x91, 0x83, 0x8B] {
            // RSV1 (0xC1) too, when permessage-deflate was not negotiated.
            let mut buf = masked(first, b"x");
            assert_eq!(
                Decoder::new(100).decode(&mut buf),
                Decoded::Fail(CloseCode::PROTOCOL_ERROR),
                "first byte {first:#x}"
            );
        }
    }

    #[test]
    fn rsv1_only_on_the_first_frame_of_a_negotiated_data_message() {
        // RFC 7692 §7.2.3.1 "Hello", compressed, masked.
        let z = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        let mut whole = masked(0xC1, &z);
        assert!(matches!(
            Decoder::with_deflate(100, true).decode(&mut whole),
            Decoded::Event { event: Event::Message { text: true, compressed: true, payload }, .. } if payload == z
        ));
        // Not UTF-8 checked before inflating, nor held to the plain limit.
        let mut binary_z = masked(0xC1, &[0xff; 110]);
        assert!(matches!(Decoder::with_deflate(100, true).decode(&mut binary_z), Decoded::Event { .. }));
        let mut bigger = masked(0xC1, &[0xff; 170]);
        assert_eq!(Decoder::with_deflate(100, true).decode(&mut bigger), Decoded::Fail(CloseCode::TOO_BIG));
        // Control frames, continuation frames, RSV2/RSV3: 1002.
        for (frames, why) in [
            (vec![masked(0xC9, b"")], "ping"),
            (vec![masked(0xC8, &[0x03, 0xE8])], "close"),
            (vec![masked(0x41, &z[..3]), masked(0xC0, &z[3..])], "continuation"),
            (vec![masked(0xE1, &z)], "rsv2"),
        ] {
            let mut d = Decoder::with_deflate(100, true);
            let n = frames.len();
            for (i, mut f) in frames.into_iter().enumerate() {
                let r = d.decode(&mut f);
                if i + 1 < n {
                    assert!(matches!(r, Decoded::Fragment { .. }), "{why}");
                } else {
                    assert_eq!(r, Decoded::Fail(CloseCode::PROTOCOL_ERROR), "{why}");
                }
            }
        }
        // Fragmented: RSV1 on the first frame, none on the continuation.
        let mut d = Decoder::with_deflate(100, true);
        let mut a = masked(0x41, &z[..3]);
        assert!(matches!(d.decode(&mut a), Decoded::Fragment { .. }));
        let mut b = masked(0x80, &z[3..]);
        assert!(matches!(
            d.decode(&mut b),
            Decoded::Event { event: Event::Message { text: true, compressed: true, .. }, .. }
        ));
        assert_eq!(d.take_assembled().unwrap(), z);
    }

    #[test]
    fn oversized_message_is_1009_before_its_bytes_arrive() {
        let frame = masked(0x81, &[b'a'; 70_000]);
        let mut head = frame[..20].to_vec();
        assert_eq!(Decoder::new(65536).decode(&mut head), Decoded::Fail(CloseCode::TOO_BIG));
    }

    #[test]
    fn fragments_reassemble_around_a_ping() {
        let mut d = Decoder::new(100);
        let mut a = masked(0x01, b"Hel");
        let n = a.len();
        assert_eq!(d.decode(&mut a), Decoded::Fragment { consumed: n });
        let mut p = masked(0x89, b"pp");
        assert!(matches!(d.decode(&mut p), Decoded::Event { event: Event::Ping(b"pp"), .. }));
        let mut b = masked(0x80, b"lo");
        assert!(matches!(d.decode(&mut b), Decoded::Event { event: Event::Message { text: true, .. }, .. }));
        assert_eq!(d.take_assembled().unwrap(), b"Hello");
        assert!(!d.has_assembled());
    }

    #[test]
    fn fragmented_size_limit_counts_the_whole_message() {
        let mut d = Decoder::new(10);
        let mut a = masked(0x01, b"123456");
        let n = a.len();
        assert_eq!(d.decode(&mut a), Decoded::Fragment { consumed: n });
        let mut b = masked(0x80, b"78901");
        assert_eq!(d.decode(&mut b), Decoded::Fail(CloseCode::TOO_BIG));
    }

    #[test]
    fn continuation_without_start_and_new_message_inside_fragments_fail() {
        let mut c = masked(0x80, b"x");
        assert_eq!(Decoder::new(100).decode(&mut c), Decoded::Fail(CloseCode::PROTOCOL_ERROR));
        let mut d = Decoder::new(100);
        let mut a = masked(0x01, b"x");
        d.decode(&mut a);
        let mut b = masked(0x81, b"y");
        assert_eq!(d.decode(&mut b), Decoded::Fail(CloseCode::PROTOCOL_ERROR));
    }

    #[test]
    fn invalid_utf8_is_1007_and_fails_fast_in_fragments() {
        let mut whole = masked(0x81, &[0xce, 0xba, 0xff]);
        assert_eq!(Decoder::new(100).decode(&mut whole), Decoded::Fail(CloseCode::INVALID_PAYLOAD));
        let mut d = Decoder::new(100);
        // A split multi-byte sequence is fine...
        let mut a = masked(0x01, &[0xce]);
        let n = a.len();
        assert_eq!(d.decode(&mut a), Decoded::Fragment { consumed: n });
        // ...an impossible byte is not, even before the final fragment.
        let mut b = masked(0x00, &[0xba, 0xff]);
        assert_eq!(d.decode(&mut b), Decoded::Fail(CloseCode::INVALID_PAYLOAD));
    }

    #[test]
    fn control_frames_must_be_short_and_final() {
        let mut long_ping = masked(0x89, &[0; 126]);
        assert_eq!(Decoder::new(1000).decode(&mut long_ping), Decoded::Fail(CloseCode::PROTOCOL_ERROR));
        let mut frag_ping = masked(0x09, b"x");
        assert_eq!(Decoder::new(1000).decode(&mut frag_ping), Decoded::Fail(CloseCode::PROTOCOL_ERROR));
    }

    #[test]
    fn close_codes_are_validated() {
        let mut ok = masked(0x88, &[0x03, 0xE8]);
        assert!(matches!(
            Decoder::new(9).decode(&mut ok),
            Decoded::Event { event: Event::Close { code: Some(1000) }, .. }
        ));
        let mut empty = masked(0x88, &[]);
        assert!(matches!(
            Decoder::new(9).decode(&mut empty),
            Decoded::Event { event: Event::Close { code: None }, .. }
        ));
        for bad in [[0x03, 0xED], [0x00, 0x00], [0x13, 0x88]] {
            let mut f = masked(0x88, &bad);
            assert_eq!(Decoder::new(9).decode(&mut f), Decoded::Fail(CloseCode::PROTOCOL_ERROR));
        }
        let mut one = masked(0x88, &[0x03]);
        assert_eq!(Decoder::new(9).decode(&mut one), Decoded::Fail(CloseCode::PROTOCOL_ERROR));
        let mut bad_reason = masked(0x88, &[0x03, 0xE8, 0xff]);
        assert_eq!(Decoder::new(9).decode(&mut bad_reason), Decoded::Fail(CloseCode::INVALID_PAYLOAD));
    }

    #[test]
    fn close_frame_encoding() {
        let mut out = Vec::new();
        encode_close(CloseCode::SLOW_CONSUMER, "slow consumer", &mut out);
        assert_eq!(&out[..4], &[0x88, 15, 0x0F, 0xA8]);
        assert_eq!(&out[4..], b"slow consumer");
    }

    #[test]
    fn long_close_reason_is_cut_at_a_character_boundary() {
        // Found by the ws_frame fuzz target: the cut at 123 bytes split a
        // multi-byte character, and the client saw invalid UTF-8 (1007).
        let reason = format!("{}é", "x".repeat(122));
        let mut out = Vec::new();
        encode_close(CloseCode::POLICY, &reason, &mut out);
        assert_eq!(out[1] as usize, 2 + 122);
        assert_eq!(&out[4..], "x".repeat(122).as_bytes());
        let mut client = vec![out[0], 0x80 | out[1], 0, 0, 0, 0];
        client.extend_from_slice(&out[2..]);
        assert!(matches!(
            Decoder::new(9).decode(&mut client),
            Decoded::Event { event: Event::Close { code: Some(1008) }, .. }
        ));
    }
}
