use bytes::BytesMut;
use http::header::CONTENT_LENGTH;

use super::*;

fn head_of(text: &str) -> Result<Option<Head>, WireError> {
    parse_head(&mut BytesMut::from(text), false)
}

/// Feeds `wire` to a decoder `step` bytes at a time; the data and trailers it gave.
fn decode_all(
    framing: Framing,
    wire: &[u8],
    step: usize,
) -> Result<(Vec<u8>, Option<HeaderMap>), WireError> {
    let mut decoder = Decoder::new(framing);
    let mut buf = BytesMut::new();
    let (mut data, mut trailers) = (Vec::new(), None);
    let mut chunks = wire.chunks(step.max(1));
    loop {
        match decoder.decode(&mut buf)? {
            Decoded::Frame(frame) => match frame.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
            Decoded::End => return Ok((data, trailers)),
            Decoded::More => match chunks.next() {
                Some(chunk) => buf.extend_from_slice(chunk),
                None => {
                    decoder.closed()?;
                    return Ok((data, trailers));
                }
            },
        }
    }
}

#[test]
fn heads_are_parsed_and_interim_answers_skipped() {
    let mut buf = BytesMut::from(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
    );
    let head = parse_head(&mut buf, false).unwrap().unwrap();
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.headers["x-a"], "b");
    assert_eq!(head.framing, Framing::Length(5));
    assert!(head.keep_alive);
    assert_eq!(&buf[..], b"hello");
    assert!(head_of("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
}

#[test]
fn framing_follows_rfc_9112() {
    let framing = |text: &str| {
        let head = head_of(text).unwrap().unwrap();
        (head.framing, head.keep_alive)
    };
    assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), (Framing::Close, false));
    assert_eq!(
        framing("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"),
        (Framing::Empty, true)
    );
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
        (Framing::Chunked, true)
    );
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"),
        (Framing::Chunked, false)
    );
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"),
        (Framing::Close, false)
    );
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\n\r\n"),
        (Framing::Length(4), true)
    );
    assert_eq!(
        framing("HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\n"),
        (Framing::Length(4), false)
    );
    assert_eq!(
        framing("HTTP/1.0 200 OK\r\ncontent-length: 4\r\n\r\n"),
        (Framing::Length(4), false)
    );
    let head =
        head_of("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n");
    let headers = head.unwrap().unwrap().headers;
    assert!(
        !headers.contains_key(CONTENT_LENGTH),
        "a length beside a coding goes"
    );
    let head = parse_head(
        &mut BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"),
        true,
    );
    assert_eq!(head.unwrap().unwrap().framing, Framing::Empty);
    for bad in [
        "HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-length: 5\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: +4\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        "HTTX/1.1 200 OK\r\n\r\n",
    ] {
        assert!(head_of(bad).is_err(), "{bad:?} was accepted");
    }
}

#[test]
fn a_101_answers_only_a_request_that_asked_for_an_upgrade() {
    let wire: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi";
    assert!(
        parse_head(&mut BytesMut::from(wire), false).is_err(),
        "a 101 nobody asked for is refused"
    );
    let mut buf = BytesMut::from(wire);
    let head = parse_head_for(&mut buf, false, true).unwrap().unwrap();
    assert_eq!(head.status, StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!((head.framing, head.keep_alive), (Framing::Empty, false));
    assert_eq!(head.headers["upgrade"], "websocket");
    assert_eq!(
        head.headers["sec-websocket-accept"],
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    assert!(!head.headers.contains_key("connection"));
    assert_eq!(
        &buf[..],
        b"\x81\x02hi",
        "what follows is the new protocol's"
    );
    // A refusal is an ordinary answer, and interim answers before either are skipped.
    let mut buf = BytesMut::from(
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno",
    );
    let head = parse_head_for(&mut buf, false, true).unwrap().unwrap();
    assert_eq!(
        (head.status.as_u16(), head.framing),
        (403, Framing::Length(2))
    );
}

#[test]
fn connection_fields_stay_out_of_the_answer() {
    let head = head_of(
        "HTTP/1.1 200 OK\r\nConnection: Keep-Alive, X-Hop,\tx-other \r\nKeep-Alive: timeout=5\r\n\
         X-Hop: 1\r\nx-other: 2\r\nX-Kept: 3\r\nTransfer-Encoding: chunked\r\n\
         Content-Length: 7\r\nUpgrade: h2c\r\nProxy-Connection: x\r\nTE: trailers\r\n\r\n",
    )
    .unwrap()
    .unwrap();
    let names: Vec<&str> = head.headers.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["x-kept"]);
    assert_eq!((head.framing, head.keep_alive), (Framing::Chunked, false));
    let head = head_of(
        "HTTP/1.1 200 OK\r\nconnection: host, close\r\nhost: a\r\ncontent-length: 0\r\n\r\n",
    )
    .unwrap()
    .unwrap();
    assert_eq!(head.headers["host"], "a", "Connection cannot strip host");
    assert_eq!((head.framing, head.keep_alive), (Framing::Length(0), false));
    let framing = |text: &str| {
        let head = head_of(text).unwrap().unwrap();
        (head.framing, head.keep_alive, head.headers)
    };
    let (framing_of, reused, _) =
        framing("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\ncontent-length: 1\r\n\r\n");
    assert_eq!((framing_of, reused), (Framing::Length(1), true));
    let (_, reused, _) =
        framing("HTTP/1.1 200 OK\r\nConnection: CLOSE\r\ncontent-length: 1\r\n\r\n");
    assert!(!reused);
    // The last coding of all the transfer-encoding fields decides.
    let (framing_of, reused, _) =
        framing("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n");
    assert_eq!((framing_of, reused), (Framing::Close, false));
    let (framing_of, reused, _) = framing(
        "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked,\r\n\r\n",
    );
    assert_eq!((framing_of, reused), (Framing::Chunked, true));
    // A length that Connection names still frames the body, and does not reach the client.
    let (framing_of, reused, headers) =
        framing("HTTP/1.1 200 OK\r\nconnection: Content-Length\r\ncontent-length: 3\r\n\r\n");
    assert_eq!((framing_of, reused), (Framing::Length(3), true));
    assert!(headers.is_empty());
    for bad in [
        "content-length:",
        "content-length: 4,",
        "content-length: ,4",
    ] {
        let text = format!("HTTP/1.1 200 OK\r\n{bad}\r\n\r\n");
        assert!(head_of(&text).is_err(), "{bad:?} was accepted");
    }
}

#[test]
fn bodies_decode_however_the_bytes_arrive() {
    let chunked = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n";
    for step in 1..chunked.len() {
        let (data, trailers) = decode_all(Framing::Chunked, chunked, step).unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.unwrap()["x-checksum"], "42");
        let (data, _) = decode_all(Framing::Length(11), b"hello world", step).unwrap();
        assert_eq!(data, b"hello world");
        let (data, _) = decode_all(Framing::Close, b"hello world", step).unwrap();
        assert_eq!(data, b"hello world");
    }
    let (data, trailers) = decode_all(Framing::Chunked, b"3\r\nabc\r\n0\r\n\r\n", 4).unwrap();
    assert_eq!((data.as_slice(), trailers), (&b"abc"[..], None));
}

#[test]
fn broken_bodies_are_errors() {
    assert!(matches!(
        decode_all(Framing::Length(11), b"hello", 3),
        Err(WireError::Closed)
    ));
    assert!(matches!(
        decode_all(Framing::Chunked, b"5\r\nhello\r\n", 3),
        Err(WireError::Closed)
    ));
    for bad in [
        &b"z\r\n"[..],
        b"5\r\nhelloXY",
        b"ffffffffffffffffff\r\n",
        b"5 junk\r\nhello\r\n",
        b"5;a=\nb\r\nhello\r\n",
    ] {
        assert!(matches!(
            decode_all(Framing::Chunked, bad, 64),
            Err(WireError::Invalid(_))
        ));
    }
}
