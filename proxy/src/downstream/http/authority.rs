//! Who a request is for: its `Host` field, its HTTP/2 `:authority`, or the authority of an
//! absolute-form target. Routes match it and the upstream gets it, so a request whose authority
//! is ambiguous or not one at all is refused (400) before anything else looks at it:
//!
//! - an HTTP/1.1 request without `Host` (nor an absolute-form target), more than one `Host`,
//!   or one that is not `host[:port]` (RFC 9112, section 3.2);
//! - userinfo in the target's authority (`http://user:pw@host/`): deprecated for `http` and
//!   `https` URIs, and to be treated as an error (RFC 9110, section 4.2.4; RFC 9113, 8.3.1);
//! - an HTTP/2 request whose `Host` names another host than its `:authority` (RFC 9113, 8.3.1).
//!
//! An HTTP/1.1 absolute-form target wins over `Host`, which is then replaced (RFC 9112,
//! section 3.2.2), as it always was here.
//!
//! The host is checked byte by byte against RFC 3986's grammar (section 3.2.2): `http::Uri`
//! accepts what a URI may hold, not what a host may be, and a `Host` field is not parsed at all
//! by hyper. A bracketed IPv6 literal goes through `Ipv6Addr`'s parser.

use std::net::Ipv6Addr;

use http::header::HOST;
use http::{Request, Version};

/// Why a request's authority is refused (400); each is the client's doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadAuthority {
    Missing,
    TwoHosts,
    InvalidHost,
    Userinfo,
    InvalidAuthority,
    Mismatch,
}

impl BadAuthority {
    /// The body of the 400 answer.
    pub fn answer(self) -> &'static str {
        match self {
            BadAuthority::Missing => "bad request: an HTTP/1.1 request needs a Host header\n",
            BadAuthority::TwoHosts => "bad request: more than one Host header\n",
            BadAuthority::InvalidHost => {
                "bad request: the Host header is not a valid host[:port]\n"
            }
            BadAuthority::Userinfo => {
                "bad request: the request target's authority has userinfo (user@), which HTTP does not allow\n"
            }
            BadAuthority::InvalidAuthority => {
                "bad request: the request target's authority is not a valid host[:port]\n"
            }
            BadAuthority::Mismatch => {
                "bad request: the Host header names another host than :authority\n"
            }
        }
    }
}

/// Checks a request's authority as the module says.
pub fn check<B>(request: &Request<B>) -> Result<(), BadAuthority> {
    let mut hosts = request.headers().get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(BadAuthority::TwoHosts);
    }
    let host = match host {
        Some(value) => {
            let split = split(value.as_bytes()).ok_or(BadAuthority::InvalidHost)?;
            Some(split)
        }
        None => None,
    };
    let Some(authority) = request.uri().authority() else {
        if host.is_none() && request.version() == Version::HTTP_11 {
            return Err(BadAuthority::Missing);
        }
        return Ok(());
    };
    let authority = authority.as_str().as_bytes();
    if authority.contains(&b'@') {
        return Err(BadAuthority::Userinfo);
    }
    let target = match split(authority) {
        Some(target) if !target.0.is_empty() => target,
        _ => return Err(BadAuthority::InvalidAuthority),
    };
    if request.version() == Version::HTTP_2
        && let Some(host) = host
    {
        let default_port: &[u8] = if request.uri().scheme_str() == Some("https") {
            b"443"
        } else {
            b"80"
        };
        if !host.0.eq_ignore_ascii_case(target.0)
            || or_default(host.1, default_port) != or_default(target.1, default_port)
        {
            return Err(BadAuthority::Mismatch);
        }
    }
    Ok(())
}

fn or_default<'a>(port: &'a [u8], default: &'a [u8]) -> &'a [u8] {
    if port.is_empty() { default } else { port }
}

/// `host[:port]` split in two (the port empty when absent); `None` when it is not one. An empty
/// value is valid (a `Host` for a target without authority, RFC 9112, section 3.2); a port
/// needs a host. One pass over the bytes with a table: this runs for every request.
fn split(value: &[u8]) -> Option<(&[u8], &[u8])> {
    let (host, port) = if value.first() == Some(&b'[') {
        let end = value.iter().position(|&b| b == b']')?;
        let literal = std::str::from_utf8(&value[1..end]).ok()?;
        literal.parse::<Ipv6Addr>().ok()?;
        let port = match &value[end + 1..] {
            [] => &[][..],
            [b':', port @ ..] => port,
            _ => return None,
        };
        (&value[..=end], port)
    } else {
        let end = value
            .iter()
            .position(|&b| !HOST_BYTE[usize::from(b)])
            .unwrap_or(value.len());
        match &value[end..] {
            [] => (value, &[][..]),
            [b':', port @ ..] if end > 0 => (&value[..end], port),
            _ => return None,
        }
    };
    (port.len() <= 5 && port.iter().all(u8::is_ascii_digit)).then_some((host, port))
}

/// The bytes of a registered name or IPv4 address (RFC 3986, section 3.2.2): unreserved
/// characters and sub-delimiters. Percent-encodings, which the grammar allows, are refused: no
/// DNS name needs one, and a host route must not be passed by encoding its name.
static HOST_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    fn h1(target: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::get(target);
        for host in hosts {
            let value = http::HeaderValue::from_bytes(host.as_bytes()).unwrap();
            builder = builder.header(HOST, value);
        }
        builder.body(()).unwrap()
    }

    fn h2(target: &str, host: Option<&str>) -> Request<()> {
        let mut builder = Request::get(target).version(Version::HTTP_2);
        if let Some(host) = host {
            builder = builder.header(HOST, host);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn valid_hosts_pass() {
        for host in [
            "example.com",
            "Example.COM:8080",
            "a-b_c~d.test",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "[2001:db8::7]:8443",
            "x.test:",
            "",
        ] {
            assert_eq!(check(&h1("/", &[host])), Ok(()), "{host}");
        }
        assert_eq!(check(&h1("/", &[])), Err(BadAuthority::Missing));
        let http10 = Request::get("/")
            .version(Version::HTTP_10)
            .body(())
            .unwrap();
        assert_eq!(check(&http10), Ok(()));
    }

    #[test]
    fn invalid_hosts_are_refused() {
        for host in [
            "a b/c@d",
            "evil.example@good.test",
            "x.test/admin",
            "x.test:abc",
            "x.test:1:2",
            "x.test:123456",
            ":80",
            "[::1",
            "[not-v6]:80",
            "[::1]x",
            "ex%61mple.com",
            "x.test\t",
            "caf\u{e9}.test",
        ] {
            assert_eq!(
                check(&h1("/", &[host])),
                Err(BadAuthority::InvalidHost),
                "{host:?}"
            );
        }
    }

    #[test]
    fn two_hosts_are_refused_even_when_equal() {
        assert_eq!(
            check(&h1("/", &["a.test", "b.test"])),
            Err(BadAuthority::TwoHosts)
        );
        assert_eq!(
            check(&h1("/", &["a.test", "a.test"])),
            Err(BadAuthority::TwoHosts)
        );
    }

    #[test]
    fn an_absolute_target_has_no_userinfo_and_wins_over_host_in_http1() {
        assert_eq!(
            check(&h1("http://user:pw@evil.example:444/x", &["good.test"])),
            Err(BadAuthority::Userinfo)
        );
        assert_eq!(
            check(&h1("http://@evil.example/x", &[])),
            Err(BadAuthority::Userinfo)
        );
        assert_eq!(
            check(&h1("http://x.test:abc/x", &[])),
            Err(BadAuthority::InvalidAuthority)
        );
        // RFC 9112, 3.2.2: the target's authority is the one; Host is replaced.
        assert_eq!(check(&h1("http://a.test/x", &["b.test"])), Ok(()));
    }

    #[test]
    fn http2_host_must_agree_with_the_authority() {
        assert_eq!(check(&h2("http://a.test/x", None)), Ok(()));
        assert_eq!(check(&h2("http://a.test/x", Some("A.test"))), Ok(()));
        assert_eq!(check(&h2("http://a.test/x", Some("a.test:80"))), Ok(()));
        assert_eq!(check(&h2("https://a.test:443/x", Some("a.test"))), Ok(()));
        assert_eq!(
            check(&h2("http://a.test/x", Some("b.test"))),
            Err(BadAuthority::Mismatch)
        );
        assert_eq!(
            check(&h2("http://a.test/x", Some("a.test:8080"))),
            Err(BadAuthority::Mismatch)
        );
        assert_eq!(
            check(&h2("https://a.test/x", Some("a.test:80"))),
            Err(BadAuthority::Mismatch)
        );
        assert_eq!(
            check(&h2("http://user@a.test/x", None)),
            Err(BadAuthority::Userinfo)
        );
        // Without :authority, Host alone names the host, checked as in HTTP/1.1.
        let mut request = h2("/x", Some("a b"));
        *request.uri_mut() = "/x".parse().unwrap();
        assert_eq!(check(&request), Err(BadAuthority::InvalidHost));
    }
}
