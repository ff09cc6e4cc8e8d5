//! Listeners: addresses and sockets, tcp or http, with their limits, path handling and TLS.

use std::collections::HashMap;
use std::sync::Arc;

use serde_spanned::Spanned;

use super::super::raw::{RawEscapedSlashes, RawListener, RawOverflow, RawProtocol, RawTls};
use super::super::tls::{self, LoadedCertificate};
use super::*;

impl Validator<'_> {
    pub(super) fn listener(
        &self,
        raw: RawListener,
        clusters: &HashMap<String, ClusterId>,
    ) -> Result<Listener> {
        let name = self.name("listener.name", &raw.name)?;
        let address = raw
            .address
            .as_ref()
            .map(|a| self.address("listener.address", a))
            .transpose()?;
        let fd_name = match &raw.fd_name {
            Some(n) if n.get_ref().is_empty() || n.get_ref().contains(':') => {
                return Err(self.error(
                    n.span(),
                    format!("listener `{name}`: fd_name `{}` is not a FileDescriptorName (non-empty, no `:`)", n.get_ref()),
                ));
            }
            Some(n) => Some(n.get_ref().clone()),
            None => None,
        };
        if address.is_none() && fd_name.is_none() {
            return Err(self.error(
                raw.name.span(),
                format!(
                    "listener `{name}` needs an `address` (or, under systemd socket activation, an `fd_name`)"
                ),
            ));
        }
        let backlog = match raw.backlog {
            None => DEFAULT_BACKLOG,
            Some(b) => u32::try_from(*b.get_ref())
                .ok()
                .filter(|b| (1..=65535).contains(b))
                .ok_or_else(|| {
                    self.error(
                        b.span(),
                        "listener.backlog: expected a number from 1 to 65535",
                    )
                })?,
        };
        let access_log = match raw.access_log {
            None => None,
            Some(p) => {
                let path = self.relative_path(p.get_ref());
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
                    && !dir.is_dir()
                {
                    return Err(self.error(
                        p.span(),
                        format!(
                            "listener `{name}`: access_log folder {} does not exist; create it or fix the path",
                            dir.display()
                        ),
                    ));
                }
                Some(path)
            }
        };
        let max_connections = raw
            .max_connections
            .as_ref()
            .map(|n| self.count("listener.max_connections", n, 1_000_000_000))
            .transpose()?;
        let overflow = match raw.max_connections_action.as_ref().map(|a| *a.get_ref()) {
            None | Some(RawOverflow::Close) => Overflow::Close,
            Some(RawOverflow::Wait) => Overflow::Wait,
        };
        let kind = match *raw.protocol.get_ref() {
            RawProtocol::Tcp => {
                for (field, present) in [
                    ("route", raw.route.first().map(|r| r.span())),
                    ("tls", raw.tls.as_ref().map(|t| t.span())),
                    ("idle_timeout", raw.idle_timeout.as_ref().map(|t| t.span())),
                    (
                        "request_header_timeout",
                        raw.request_header_timeout.as_ref().map(|t| t.span()),
                    ),
                    (
                        "max_request_header_size",
                        raw.max_request_header_size.as_ref().map(|t| t.span()),
                    ),
                    (
                        "max_request_headers",
                        raw.max_request_headers.as_ref().map(|t| t.span()),
                    ),
                    (
                        "max_request_body",
                        raw.max_request_body.as_ref().map(|t| t.span()),
                    ),
                    (
                        "normalize_path",
                        raw.normalize_path.as_ref().map(|t| t.span()),
                    ),
                    (
                        "merge_slashes",
                        raw.merge_slashes.as_ref().map(|t| t.span()),
                    ),
                    (
                        "path_with_escaped_slashes",
                        raw.path_with_escaped_slashes.as_ref().map(|t| t.span()),
                    ),
                ] {
                    if let Some(span) = present {
                        return Err(self.error(
                            span,
                            format!(
                                "listener `{name}`: `{field}` applies to http listeners only; a tcp listener takes just a `cluster`"
                            ),
                        ));
                    }
                }
                let Some(cluster) = raw.cluster else {
                    return Err(self.error(
                        raw.protocol.span(),
                        format!("listener `{name}`: a tcp listener needs `cluster = \"...\"` naming where connections go"),
                    ));
                };
                ListenerKind::Tcp {
                    cluster: self.cluster_ref(&name, &cluster, clusters)?,
                }
            }
            RawProtocol::Http => {
                if let Some(cluster) = &raw.cluster {
                    return Err(self.error(
                        cluster.span(),
                        format!(
                            "listener `{name}`: an http listener sends requests to clusters through `[[listener.route]]` tables, not a `cluster` field"
                        ),
                    ));
                }
                if raw.route.is_empty() {
                    return Err(self.error(
                        raw.protocol.span(),
                        format!(
                            "listener `{name}`: an http listener needs at least one [[listener.route]] with a `cluster` or a `direct_response`"
                        ),
                    ));
                }
                let routes = raw
                    .route
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| self.route(&name, i + 1, r, clusters))
                    .collect::<Result<Vec<_>>>()?;
                let tls = raw.tls.map(|t| self.tls(&name, t)).transpose()?;
                let limits = RequestLimits {
                    header_timeout: self.timeout_or(
                        "listener.request_header_timeout",
                        raw.request_header_timeout,
                        DEFAULT_REQUEST_HEADER_TIMEOUT,
                    )?,
                    max_header_size: raw.max_request_header_size.as_ref().map_or(
                        Ok(DEFAULT_MAX_REQUEST_HEADER_SIZE),
                        |s| {
                            self.size("listener.max_request_header_size", s, 16 << 20)
                                .map(|n| n as usize)
                        },
                    )?,
                    max_headers: raw
                        .max_request_headers
                        .as_ref()
                        .map_or(Ok(DEFAULT_MAX_REQUEST_HEADERS), |n| {
                            self.count("listener.max_request_headers", n, 10_000)
                        })?,
                    max_body: raw
                        .max_request_body
                        .as_ref()
                        .map(|s| self.size("listener.max_request_body", s, u64::MAX))
                        .transpose()?,
                };
                let defaults = PathNormalization::default();
                let path = PathNormalization {
                    normalize: raw
                        .normalize_path
                        .map_or(defaults.normalize, |b| b.into_inner()),
                    merge_slashes: raw
                        .merge_slashes
                        .map_or(defaults.merge_slashes, |b| b.into_inner()),
                    escaped_slashes: match raw.path_with_escaped_slashes.map(|a| a.into_inner()) {
                        None => defaults.escaped_slashes,
                        Some(RawEscapedSlashes::Keep) => EscapedSlashes::Keep,
                        Some(RawEscapedSlashes::Reject) => EscapedSlashes::Reject,
                        Some(RawEscapedSlashes::UnescapeAndForward) => {
                            EscapedSlashes::UnescapeAndForward
                        }
                        Some(RawEscapedSlashes::UnescapeAndRedirect) => {
                            EscapedSlashes::UnescapeAndRedirect
                        }
                    },
                };
                HttpListener {
                    routes,
                    tls,
                    idle_timeout: self.timeout_or(
                        "listener.idle_timeout",
                        raw.idle_timeout,
                        DEFAULT_LISTENER_IDLE_TIMEOUT,
                    )?,
                    limits,
                    path,
                }
                .into()
            }
        };
        Ok(Listener {
            name,
            address,
            fd_name,
            backlog,
            access_log,
            max_connections,
            overflow,
            kind,
        })
    }

    fn cluster_ref(
        &self,
        listener: &str,
        name: &Spanned<String>,
        clusters: &HashMap<String, ClusterId>,
    ) -> Result<ClusterId> {
        self.cluster_ref_in(&format!("listener `{listener}`"), name, clusters)
    }

    fn tls(&self, listener: &str, raw: Spanned<RawTls>) -> Result<Arc<rustls::ServerConfig>> {
        let span = raw.span();
        let raw = raw.into_inner();
        if raw.certificate.is_empty() {
            return Err(self.error(
                span,
                format!(
                    "listener `{listener}`: tls needs at least one [[listener.tls.certificate]] with `cert` and `key`"
                ),
            ));
        }
        let provider = tls::provider();
        let mut loaded = Vec::with_capacity(raw.certificate.len());
        for cert in raw.certificate {
            let cert_span = cert.span();
            let cert = cert.into_inner();
            let cert_path = self.relative_path(cert.cert.get_ref());
            let key_path = self.relative_path(cert.key.get_ref());
            let (key, san_names) = tls::load_certificate(&provider, &cert_path, &key_path)
                .map_err(|e| {
                    self.error(cert_span.clone(), format!("listener `{listener}`: {e}"))
                })?;
            let names = match cert.server_names {
                Some(names) => names
                    .into_iter()
                    .map(|n| n.into_inner().to_ascii_lowercase())
                    .collect(),
                None => san_names,
            };
            loaded.push(LoadedCertificate { key, names });
        }
        tls::server_config(provider, loaded)
            .map(Arc::new)
            .map_err(|e| self.error(span, format!("listener `{listener}`: {e}")))
    }
}

impl From<HttpListener> for ListenerKind {
    fn from(http: HttpListener) -> Self {
        ListenerKind::Http(http)
    }
}
