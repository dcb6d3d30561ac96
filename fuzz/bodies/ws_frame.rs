//! Fuzz body for the WebSocket frame codec (`comet::ws::frame`).
//!
//! Input layout: two bytes of message size limit, one byte of read size,
//! then the client byte stream. The stream is decoded twice, once from one
//! buffer and once as it would arrive in reads of that size (docs/protocol.md
//! "Frames": a frame may span many reads), and both must see the same frames
//! and the same failure. Every message the decoder hands out is then encoded
//! as a server frame, masked back into a client frame and decoded again.

use comet::ws::frame::Decoded;
use comet::ws::{CloseCode, Decoder, Event, Opcode, encode_close, encode_frame, frame_header};

/// What one `decode` call produced, owned so two runs can be compared.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Message {
        text: bool,
        payload: Vec<u8>,
    },
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
    Fragment,
    /// The stream ended inside a frame.
    NeedMore,
    Fail(u16),
}

pub fn run(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let max = 1 + u16::from_le_bytes([data[0], data[1]]) as usize;
    let read_size = data[2].max(1) as usize;
    let stream = &data[3..];

    let whole = decode_whole(stream, max);
    let chunked = decode_in_reads(stream, max, read_size);
    assert_eq!(whole, chunked, "the frames must not depend on how the bytes were split into reads");

    for seen in &whole {
        match seen {
            Seen::Message { text, payload } => {
                assert!(payload.len() <= max, "a message over the limit was accepted");
                if *text {
                    assert!(std::str::from_utf8(payload).is_ok(), "a text message with invalid UTF-8 was accepted");
                }
                let op = if *text { Opcode::Text } else { Opcode::Binary };
                let back = round_trip(op, payload, max);
                assert_eq!(back, Seen::Message { text: *text, payload: payload.clone() });
            }
            Seen::Ping(p) => {
                assert!(p.len() <= 125, "a control frame over 125 bytes was accepted");
                assert_eq!(round_trip(Opcode::Ping, p, max), Seen::Ping(p.clone()));
            }
            Seen::Close(Some(code)) => assert!(CloseCode::is_valid_from_peer(*code)),
            _ => {}
        }
    }

    // Server close frames carry a UTF-8 reason cut to fit 125 bytes; whatever
    // the reason, the frame must be one a client accepts.
    let code = [1000, 1001, 1002, 1007, 1008, 1009, 4000, 4008, 4009, 4418][data[0] as usize % 10];
    let reason = String::from_utf8_lossy(stream);
    let mut out = Vec::new();
    encode_close(CloseCode(code), &reason, &mut out);
    assert!(out.len() <= 2 + 125, "a close frame must fit a control frame");
    assert_eq!(decode_server_frame(&out, max), Seen::Close(Some(code)), "close frame for reason {reason:?}");

    // Every length form of the header says the length it was given.
    // (Lengths of 2^63 and more cannot be framed and are never sent.)
    let len = (u64::from_le_bytes(std::array::from_fn(|i| data.get(3 + i).copied().unwrap_or(0))) >> 1) as usize;
    let mut h = Vec::new();
    frame_header(Opcode::Binary, len, &mut h);
    assert_eq!(header_len(&h), Some((len as u64, h.len())), "header {h:?} for length {len}");
}

/// Decodes `stream` from one buffer, frame after frame, as far as it goes.
fn decode_whole(stream: &[u8], max: usize) -> Vec<Seen> {
    let mut buf = stream.to_vec();
    let mut d = Decoder::new(max);
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let before = buf[pos..].to_vec();
        let (seen, consumed) = step(&mut d, &mut buf[pos..]);
        match consumed {
            Some(n) => {
                assert!(n >= 6 && n <= before.len(), "consumed {n} of {} bytes", before.len());
                pos += n;
            }
            None => {
                if seen == Seen::NeedMore {
                    assert_eq!(buf[pos..], before[..], "bytes not yet decoded must be left as they came");
                }
                out.push(seen);
                return out;
            }
        }
        out.push(seen);
    }
    out
}

/// Decodes `stream` as the connection driver does when it arrives in reads
/// of `read_size` bytes: decode what is buffered until more is needed.
fn decode_in_reads(stream: &[u8], max: usize, read_size: usize) -> Vec<Seen> {
    let mut d = Decoder::new(max);
    let mut pending: Vec<u8> = Vec::new();
    let mut out = Vec::new();
    for (i, read) in stream.chunks(read_size).enumerate() {
        pending.extend_from_slice(read);
        let last = (i + 1) * read_size >= stream.len();
        loop {
            if pending.is_empty() {
                break;
            }
            let (seen, consumed) = step(&mut d, &mut pending);
            match consumed {
                Some(n) => {
                    pending.drain(..n);
                    out.push(seen);
                }
                None if seen == Seen::NeedMore => {
                    if last {
                        out.push(seen);
                    }
                    break;
                }
                None => {
                    out.push(seen);
                    return out;
                }
            }
        }
    }
    out
}

/// One `decode` call, with the reassembled message taken as the driver does.
fn step(d: &mut Decoder, buf: &mut [u8]) -> (Seen, Option<usize>) {
    let r = d.decode(buf);
    let (seen, consumed) = match r {
        Decoded::Event { event, consumed } => {
            let seen = match event {
                Event::Message { text, payload, .. } => Seen::Message { text, payload: payload.to_vec() },
                Event::Ping(p) => Seen::Ping(p.to_vec()),
                Event::Pong => Seen::Pong,
                Event::Close { code } => Seen::Close(code),
            };
            (seen, Some(consumed))
        }
        Decoded::Fragment { consumed } => (Seen::Fragment, Some(consumed)),
        Decoded::NeedMore => (Seen::NeedMore, None),
        Decoded::Fail(code) => (Seen::Fail(code.0), None),
    };
    if let Seen::Message { text, payload } = &seen
        && d.has_assembled()
    {
        assert!(payload.is_empty(), "a reassembled message comes from take_assembled only");
        let whole = d.take_assembled().expect("has_assembled said so");
        return (Seen::Message { text: *text, payload: whole }, consumed);
    }
    (seen, consumed)
}

/// Encodes `payload` as a server frame, then decodes it as a client frame.
fn round_trip(op: Opcode, payload: &[u8], max: usize) -> Seen {
    let mut out = Vec::new();
    encode_frame(op, payload, &mut out);
    let (len, head) = header_len(&out).expect("server frame header");
    assert_eq!(len, payload.len() as u64);
    assert_eq!(&out[head..], payload);
    decode_server_frame(&out, max)
}

/// Masks a server frame into the client frame a browser would send, and
/// decodes it with a fresh decoder.
fn decode_server_frame(frame: &[u8], max: usize) -> Seen {
    let (_, head) = header_len(frame).expect("server frame header");
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut client = frame[..head].to_vec();
    client[1] |= 0x80;
    client.extend_from_slice(&mask);
    client.extend(frame[head..].iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let n = client.len();
    let (seen, consumed) = step(&mut Decoder::new(max), &mut client);
    if consumed.is_some() {
        assert_eq!(consumed, Some(n), "the whole frame is one frame");
    }
    seen
}

/// Reads an unmasked server frame header: (payload length, header length),
/// checking that the shortest length form was used (RFC 6455 §5.2).
fn header_len(h: &[u8]) -> Option<(u64, usize)> {
    let b1 = *h.get(1)?;
    assert_eq!(h[0] & 0x70, 0, "reserved bits");
    assert_eq!(h[0] & 0x80, 0x80, "server frames are final");
    assert_eq!(b1 & 0x80, 0, "server frames are not masked");
    match b1 & 0x7F {
        126 => {
            let l = u16::from_be_bytes([*h.get(2)?, *h.get(3)?]) as u64;
            assert!(l >= 126, "16-bit form for a length that fits 7 bits");
            Some((l, 4))
        }
        127 => {
            let l = u64::from_be_bytes(h.get(2..10)?.try_into().ok()?);
            assert!(l > 0xFFFF && l >> 63 == 0, "64-bit form for length {l}");
            Some((l, 10))
        }
        l => Some((l as u64, 2)),
    }
}
