//! A request's path as routes match it and upstreams get it: normalised as RFC 3986 says
//! (section 6.2.2), so that `/public/../admin`, `/public/%2e%2e/admin` or `/public//../admin`
//! cannot pass a `path_prefix` route as one path and reach a backend as another.
//!
//! The steps, in Envoy's order: percent-encodings are checked (an invalid one is refused), those
//! of unreserved characters decoded (`%7E` is `~`, `%2e` is `.`), and encoded slashes (`%2F`,
//! and `%5C`, which some backends take for a slash) kept, refused or decoded as the listener
//! says; then `.` and `..` segments are removed (section 5.2.4); then runs of `/` are merged.
//! The query is not touched: it is not part of the path, and its encoding is the
//! application's own business (`a=%2e%2e` is data, not a segment).
//!
//! Written here rather than with the `url` crate: `url` parses WHATWG URLs (a base is needed,
//! backslashes are slashes, other characters are re-encoded), which is not what an HTTP
//! request target is, and it copies every path. Most paths need nothing, and [`normalize`]
//! finds that out from their bytes without allocating.

use crate::config::{EscapedSlashes, PathNormalization};

/// What [`normalize`] made of a path.
#[derive(Debug, PartialEq, Eq)]
pub enum Normalized {
    /// The path is normal already (the common case: nothing is allocated).
    Unchanged,
    /// The path to route and forward instead.
    Changed(String),
    /// The path had encoded slashes and the listener redirects to its decoded, normalised form
    /// (`path_with_escaped_slashes = "unescape_and_redirect"`).
    Redirect(String),
}

/// Why a path is refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// The client sent a `%` not followed by two hexadecimal digits.
    InvalidPercentEncoding,
    /// The client sent `%2F` or `%5C` to a listener that refuses them.
    EscapedSlash,
}

impl PathError {
    /// The body of the 400 answer, with the way out where there is one.
    pub fn answer(self) -> &'static str {
        match self {
            PathError::InvalidPercentEncoding => {
                "bad request: invalid percent-encoding in the path (a % must be followed by two hexadecimal digits)\n"
            }
            PathError::EscapedSlash => {
                "bad request: encoded slash (%2F or %5C) in the path; the listener's path_with_escaped_slashes is \"reject\"\n"
            }
        }
    }
}

/// Normalises `path` (a request's path, without its query) as `options` say. A path that does
/// not start with `/` (`*`, or a CONNECT's empty one) is left alone.
pub fn normalize(path: &str, options: &PathNormalization) -> Result<Normalized, PathError> {
    if !path.starts_with('/') || !needs_work(path.as_bytes(), options) {
        return Ok(Normalized::Unchanged);
    }
    let (decoded, unescaped) = if path.contains('%') {
        decode(path, options)?
    } else {
        (path.to_owned(), false)
    };
    let mut out = if options.normalize {
        remove_dot_segments(&decoded)
    } else {
        decoded
    };
    if options.merge_slashes {
        merge_slashes(&mut out);
    }
    Ok(if out == path {
        Normalized::Unchanged
    } else if unescaped && options.escaped_slashes == EscapedSlashes::UnescapeAndRedirect {
        Normalized::Redirect(out)
    } else {
        Normalized::Changed(out)
    })
}

/// Whether a path may change (or be refused): one pass over its bytes, for a `%` that matters,
/// a `.` or `..` segment, or `//`.
fn needs_work(path: &[u8], options: &PathNormalization) -> bool {
    let percent_matters = options.normalize || options.escaped_slashes != EscapedSlashes::Keep;
    for (i, &b) in path.iter().enumerate() {
        match b {
            b'%' if percent_matters => return true,
            b'/' => {
                let rest = &path[i + 1..];
                if options.merge_slashes && rest.first() == Some(&b'/') {
                    return true;
                }
                if options.normalize && rest.first() == Some(&b'.') && is_dot_segment(rest) {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

/// Whether `rest` (what follows a `/`) begins with a `.` or `..` segment.
fn is_dot_segment(rest: &[u8]) -> bool {
    let segment = rest.split(|&b| b == b'/').next().unwrap_or(rest);
    segment == b"." || segment == b".."
}

/// Checks and decodes percent-encodings: unreserved characters decoded (when normalising),
/// encoded slashes handled as the listener says, the others kept as sent. Returns the path and
/// whether an encoded slash was decoded.
fn decode(path: &str, options: &PathNormalization) -> Result<(String, bool), PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut unescaped = false;
    // Start of the bytes not yet copied.
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            i += 1;
            continue;
        }
        let value = match (bytes.get(i + 1), bytes.get(i + 2)) {
            (Some(&hi), Some(&lo)) => hex(hi).zip(hex(lo)).map(|(hi, lo)| (hi << 4) | lo),
            _ => None,
        };
        let Some(value) = value else {
            if options.normalize {
                return Err(PathError::InvalidPercentEncoding);
            }
            // Not ours to judge: the `%` goes on as it is.
            i += 1;
            continue;
        };
        let replacement = match value {
            b'/' | b'\\' => match options.escaped_slashes {
                EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                EscapedSlashes::Keep => None,
                EscapedSlashes::UnescapeAndForward | EscapedSlashes::UnescapeAndRedirect => {
                    unescaped = true;
                    Some('/')
                }
            },
            _ if options.normalize && is_unreserved(value) => Some(char::from(value)),
            _ => None,
        };
        if let Some(c) = replacement {
            // `bytes[copied..i]` ends before a `%`, an ASCII byte: a character boundary.
            out.push_str(&path[copied..i]);
            out.push(c);
            copied = i + 3;
        }
        i += 3;
    }
    out.push_str(&path[copied..]);
    Ok((out, unescaped))
}

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

/// RFC 3986, section 2.3: `ALPHA / DIGIT / "-" / "." / "_" / "~"`.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// RFC 3986, section 5.2.4, for a path that starts with `/`: segment by segment, `.` goes,
/// and `..` takes the segment before it away (never going above the root).
fn remove_dot_segments(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "." => {}
            ".." => {
                let parent = out.rfind('/').unwrap_or(0);
                out.truncate(parent);
            }
            _ => {
                out.push('/');
                out.push_str(segment);
                continue;
            }
        }
        // A dot segment at the end leaves the path ending in `/` (`/a/b/..` is `/a/`).
        if last {
            out.push('/');
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// Collapses every run of `/` into one.
fn merge_slashes(path: &mut String) {
    if path.contains("//") {
        let mut previous = '\0';
        path.retain(|c| {
            let keep = !(c == '/' && previous == '/');
            previous = c;
            keep
        });
    }
}

#[cfg(test)]
mod tests;
