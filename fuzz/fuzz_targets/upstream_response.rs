//! An upstream's HTTP/1.1 response: any bytes a server, or something posing as one, may send,
//! arriving in pieces of any size. The head is parsed and the body taken out frame by frame as
//! the proxy does it; the answer must be frames or an error, never a panic, and never more body
//! than arrived, nor more than a declared length; a `101` only to a request that asked for an
//! upgrade, and then with no body and no reuse.
#![no_main]

use baton_proxy::http1_wire::{Decoded, Decoder, Framing, MAX_HEAD, parse_head_for};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte says how the rest arrives: pieces of 1 to 64 bytes, whether the request was
    // a HEAD (whose answer has no body whatever it declares), and whether it asked for an upgrade.
    let Some((&how, wire)) = data.split_first() else {
        return;
    };
    let mut pieces = wire.chunks(usize::from(how & 0x3f) + 1);
    let head_request = how & 0x40 != 0;
    let upgrade = how & 0x80 != 0;
    let mut buf = BytesMut::new();
    let head = loop {
        if !buf.is_empty() {
            match parse_head_for(&mut buf, head_request, upgrade) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(_) => return,
            }
        }
        if buf.len() >= MAX_HEAD {
            return; // The proxy gives up here too: "response head larger than 64 KiB".
        }
        match pieces.next() {
            Some(piece) => buf.extend_from_slice(piece),
            None => return,
        }
    };
    if head_request {
        assert_eq!(head.framing, Framing::Empty, "a HEAD request's answer has no body");
    }
    if head.status == 101 {
        assert!(upgrade, "a 101 only to a request that asked for an upgrade");
        assert_eq!(head.framing, Framing::Empty, "a 101 has no body");
        assert!(!head.keep_alive, "a connection that switched carries no other request");
    }
    let mut arrived = buf.len();
    let mut body = 0usize;
    let mut decoder = Decoder::new(head.framing);
    loop {
        match decoder.decode(&mut buf) {
            Ok(Decoded::Frame(frame)) => match frame.into_data() {
                Ok(data) => {
                    assert!(!data.is_empty(), "no empty data frames");
                    body += data.len();
                    assert!(body <= arrived, "more body than bytes arrived");
                    if let Framing::Length(n) = head.framing {
                        assert!(body as u64 <= n, "more body than the declared length");
                    }
                }
                Err(frame) => {
                    assert!(frame.is_trailers());
                    assert_eq!(head.framing, Framing::Chunked, "trailers only after chunks");
                }
            },
            Ok(Decoded::End) => {
                if let Framing::Length(n) = head.framing {
                    assert_eq!(body as u64, n, "a body of known length ends at its length");
                }
                return;
            }
            Ok(Decoded::More) => match pieces.next() {
                Some(piece) => {
                    buf.extend_from_slice(piece);
                    arrived += piece.len();
                }
                None => {
                    let closed = decoder.closed();
                    if head.framing == Framing::Close {
                        assert!(closed.is_ok(), "a body to the close ends with it");
                    }
                    return;
                }
            },
            Err(_) => return,
        }
    }
});
