//! Addresses written as URLs: told apart from names that do not resolve, with their fixed form.

/// An address written as a URL (`http://127.0.0.1:8081/`), as nginx's `proxy_pass` and many
/// tools write one: to be told apart from an address that does not resolve, with its fixed form.
pub(super) struct Url<'a> {
    text: &'a str,
    scheme: &'a str,
    /// `host:port`: the URL's, or with the scheme's port when it names none.
    address: String,
    /// What follows the address (`/api`), if anything but `/`.
    path: &'a str,
}

impl<'a> Url<'a> {
    /// `tls`: whether the place the address is written can speak TLS (else an `https` URL
    /// without a port is not given 443, which would speak TLS).
    pub(super) fn of(text: &'a str, tls: bool) -> Option<Url<'a>> {
        let (scheme, rest) = text.split_once("://")?;
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        let after_host = authority.rsplit_once(']').map_or(authority, |(_, a)| a);
        let has_port = after_host
            .rsplit_once(':')
            .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
        let address = match scheme.to_ascii_lowercase().as_str() {
            _ if has_port => authority.to_owned(),
            "http" | "ws" => format!("{authority}:80"),
            "https" | "wss" if tls => format!("{authority}:443"),
            _ => format!("{authority}:PORT"),
        };
        Some(Url {
            text,
            scheme,
            address,
            path: if path == "/" { "" } else { path },
        })
    }

    /// `` `http://a:1/x` is a URL; {what}, without `http://`: write "a:1" ``, and what else the
    /// URL asked that cannot be said there: TLS (`tls`), a path.
    pub(super) fn message(&self, what: &str, tls: &str) -> String {
        let Url {
            text,
            scheme,
            address,
            path,
        } = self;
        let mut message =
            format!("`{text}` is a URL; {what}, without `{scheme}://`: write \"{address}\"");
        if scheme.eq_ignore_ascii_case("https") || scheme.eq_ignore_ascii_case("wss") {
            message.push_str(&format!(" ({tls})"));
        }
        if !path.is_empty() {
            message.push_str(&format!(
                "; the path `{path}` has no place here: requests go upstream with their own path"
            ));
        }
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_becomes_host_and_port() {
        let fixed = |text, tls| Url::of(text, tls).map(|u| (u.address, u.path));
        assert_eq!(fixed("127.0.0.1:80", false), None);
        assert_eq!(
            fixed("http://127.0.0.1:8081/", false),
            Some(("127.0.0.1:8081".into(), ""))
        );
        assert_eq!(
            fixed("HTTP://[::1]/x?y", false),
            Some(("[::1]:80".into(), "/x?y"))
        );
        assert_eq!(
            fixed("http://user@app.internal:9000", false),
            Some(("app.internal:9000".into(), ""))
        );
        assert_eq!(
            fixed("https://app.internal", false),
            Some(("app.internal:PORT".into(), ""))
        );
        assert_eq!(
            fixed("https://0.0.0.0", true),
            Some(("0.0.0.0:443".into(), ""))
        );
        assert_eq!(
            fixed("https://[::]:8443", true),
            Some(("[::]:8443".into(), ""))
        );
    }
}
