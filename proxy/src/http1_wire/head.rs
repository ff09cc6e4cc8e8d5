//! A response head: parsed by httparse, interim answers skipped, and its framing read from the
//! fields' bytes, with the hop-by-hop fields kept out of the header map.

use std::mem::MaybeUninit;

use bytes::{Buf, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};

use super::{Framing, Head, MAX_HEAD, MAX_HEADERS, WireError};

/// Parses a response head at the start of `buf`, taking it (and any interim answers before it)
/// out of `buf`. `None` if the head is not complete yet.
pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, WireError> {
    parse_head_for(buf, head_request, false)
}

/// [`parse_head`] for a request that may have asked for an upgrade (`upgrade`): then a `101
/// Switching Protocols` is its final answer, with no body, a connection that carries no other
/// request, and its `Upgrade` field kept (it names the protocol the connection now speaks; what
/// follows the head in `buf` is that protocol's). Without `upgrade`, a `101` is an error.
pub fn parse_head_for(
    buf: &mut BytesMut,
    head_request: bool,
    upgrade: bool,
) -> Result<Option<Head>, WireError> {
    loop {
        // Uninitialised slots: httparse fills as many as the head has (no 3 KiB of zeroes to
        // write per response).
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut slots,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
            Ok(httparse::Status::Complete(_)) => {
                return Err(WireError::Invalid("response head larger than 64 KiB"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(WireError::Invalid("more than 100 header fields"));
            }
            Err(_) => return Err(WireError::Invalid("malformed status line or header field")),
        };
        let code = response.code.unwrap_or_default();
        let version = match response.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let switching = code == 101;
        if switching && !upgrade {
            return Err(WireError::Invalid(
                "101 Switching Protocols, which was not asked for",
            ));
        }
        if (100..200).contains(&code) && !switching {
            // An interim answer (100 Continue, 103 Early Hints): the final one follows.
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code)
            .map_err(|_| WireError::Invalid("status code out of range"))?;
        // Where each field lies in `buf`, so that values are taken as slices of it, uncopied.
        let base = buf.as_ptr() as usize;
        let mut found = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let count = response.headers.len();
        for (slot, field) in found.iter_mut().zip(response.headers.iter()) {
            let name = (field.name.as_ptr() as usize - base) as u32;
            let value = (field.value.as_ptr() as usize - base) as u32;
            *slot = (
                name,
                name + field.name.len() as u32,
                value,
                value + field.value.len() as u32,
            );
        }
        let head = buf.split_to(len).freeze();
        let fields = &found[..count];
        let hop = Hop::scan(&head, fields);
        let (framing, keep_alive) = if switching {
            (Framing::Empty, false)
        } else {
            framing(&head, fields, &hop, status, head_request)?
        };
        // The fields that concern this connection only (RFC 9110, 7.6.1) were read for the
        // framing and the connection's reuse; they do not go into the client's answer, nor
        // does a content-length beside a transfer coding (RFC 9112, 6.3).
        let mut headers = HeaderMap::with_capacity(count);
        for &(name_start, name_end, start, end) in fields {
            let raw = &head[name_start as usize..name_end as usize];
            if hop.drops(&head, raw) && !(switching && raw.eq_ignore_ascii_case(b"upgrade")) {
                continue;
            }
            let name = HeaderName::from_bytes(raw)
                .map_err(|_| WireError::Invalid("invalid header field name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(start as usize..end as usize))
                .map_err(|_| WireError::Invalid("invalid header field value"))?;
            headers.append(name, value);
        }
        return Ok(Some(Head {
            status,
            version,
            headers,
            framing,
            keep_alive: keep_alive && version == Version::HTTP_11 && !hop.close,
        }));
    }
}

/// A field's place in a response head: where its name starts and ends, then its value.
type Field = (u32, u32, u32, u32);

fn bytes_of(head: &[u8], start: u32, end: u32) -> &[u8] {
    &head[start as usize..end as usize]
}

/// What a response head's connection-level fields say, read from its bytes.
///
/// Read from the field names as they came rather than looked up in the header map once built:
/// every lookup there hashes a name, and the usual head (`Connection: keep-alive` and a length)
/// needs no lookup at all this way. Names are compared by length first.
#[derive(Default)]
struct Hop {
    /// `Connection: close`.
    close: bool,
    transfer_encoding: bool,
    content_length: bool,
    /// Where the field names that `Connection` lists lie (other than `keep-alive` and
    /// `close`): those fields go too. Rare, so a `Vec`.
    named: Vec<(u32, u32)>,
}

impl Hop {
    fn scan(head: &[u8], fields: &[Field]) -> Hop {
        let mut hop = Hop::default();
        for &(name_start, name_end, start, end) in fields {
            let name = bytes_of(head, name_start, name_end);
            match name.len() {
                10 if name.eq_ignore_ascii_case(b"connection") => {
                    for token in tokens(bytes_of(head, start, end)) {
                        if token.eq_ignore_ascii_case(b"close") {
                            hop.close = true;
                        } else if !token.eq_ignore_ascii_case(b"keep-alive")
                            && !token.eq_ignore_ascii_case(b"host")
                        {
                            // Within the head, as the field offsets are.
                            let at = (token.as_ptr() as usize - head.as_ptr() as usize) as u32;
                            hop.named.push((at, at + token.len() as u32));
                        }
                    }
                }
                14 if name.eq_ignore_ascii_case(b"content-length") => hop.content_length = true,
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                    hop.transfer_encoding = true;
                }
                _ => {}
            }
        }
        hop
    }

    /// Whether the field `name` stays out of the client's answer.
    fn drops(&self, head: &[u8], name: &[u8]) -> bool {
        is_hop_by_hop(name)
            || (self.transfer_encoding && name.eq_ignore_ascii_case(b"content-length"))
            || self
                .named
                .iter()
                .any(|&(start, end)| bytes_of(head, start, end).eq_ignore_ascii_case(name))
    }
}

/// The fields that concern one connection only (RFC 9110, 7.6.1).
fn is_hop_by_hop(name: &[u8]) -> bool {
    match name.len() {
        2 => name.eq_ignore_ascii_case(b"te"),
        7 => name.eq_ignore_ascii_case(b"upgrade"),
        10 => name.eq_ignore_ascii_case(b"connection") || name.eq_ignore_ascii_case(b"keep-alive"),
        16 => name.eq_ignore_ascii_case(b"proxy-connection"),
        17 => name.eq_ignore_ascii_case(b"transfer-encoding"),
        _ => false,
    }
}

/// The items of a comma-separated field value, trimmed, empty ones left out.
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

/// The body's framing, and whether it leaves the connection fit for another request.
fn framing(
    head: &[u8],
    fields: &[Field],
    hop: &Hop,
    status: StatusCode,
    head_request: bool,
) -> Result<(Framing, bool), WireError> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Empty, true));
    }
    let values = |wanted: &'static [u8]| {
        fields
            .iter()
            .filter(move |&&(name_start, name_end, _, _)| {
                bytes_of(head, name_start, name_end).eq_ignore_ascii_case(wanted)
            })
            .map(move |&(_, _, start, end)| bytes_of(head, start, end))
    };
    if hop.transfer_encoding {
        let mut last: &[u8] = b"";
        for value in values(b"transfer-encoding") {
            if let Some(token) = tokens(value).last() {
                last = token;
            }
        }
        if last.eq_ignore_ascii_case(b"chunked") {
            // With a content-length as well, the message is suspect (RFC 9112, 6.3): its
            // connection is not used again.
            return Ok((Framing::Chunked, !hop.content_length));
        }
        return Ok((Framing::Close, false));
    }
    if !hop.content_length {
        return Ok((Framing::Close, false));
    }
    let mut length = None;
    for value in values(b"content-length") {
        // Strict: an empty item is malformed too (RFC 9110, 8.6).
        for item in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
                return Err(WireError::Invalid("invalid content-length"));
            }
            let n: u64 = std::str::from_utf8(item)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or(WireError::Invalid("invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(WireError::Invalid("conflicting content-length values"));
            }
            length = Some(n);
        }
    }
    match length {
        Some(n) => Ok((Framing::Length(n), true)),
        None => Err(WireError::Invalid("invalid content-length")),
    }
}
