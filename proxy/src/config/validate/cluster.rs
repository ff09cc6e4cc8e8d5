//! Clusters: endpoints and their discovery, load balancing, health checks, outlier detection,
//! circuit breakers.

use std::net::{SocketAddr, ToSocketAddrs};

use super::super::raw::{
    RawBreakers, RawCluster, RawDiscovery, RawHashKey, RawHealthCheck, RawHealthCheckKind,
    RawLbPolicy, RawLookupFamily, RawOutlier, RawStatusRange, RawUpstreamProtocol,
};
use super::*;
use crate::lb::Policy;

/// Default time between two health checks of an endpoint.
const DEFAULT_HC_INTERVAL: Duration = Duration::from_secs(5);
/// Default time a health check may take.
const DEFAULT_HC_TIMEOUT: Duration = Duration::from_secs(1);
/// Default outlier ejection time (Envoy's).
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
/// Default longest ejection (Envoy's).
const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);

impl Validator<'_> {
    pub(super) fn cluster(&self, raw: RawCluster) -> Result<Cluster> {
        let name = self.name("cluster.name", &raw.name)?;
        if raw.endpoints.get_ref().is_empty() {
            return Err(self.error(
                raw.endpoints.span(),
                format!("cluster `{name}`: endpoints is empty; list at least one \"host:port\""),
            ));
        }
        let dns = matches!(
            raw.discovery.as_ref().map(|d| *d.get_ref()),
            Some(RawDiscovery::StrictDns)
        );
        if !dns {
            let dns_only = [
                raw.dns_lookup_family
                    .as_ref()
                    .map(|d| ("dns_lookup_family", d.span())),
                raw.dns_refresh_rate
                    .as_ref()
                    .map(|d| ("dns_refresh_rate", d.span())),
                raw.dns_resolvers
                    .as_ref()
                    .and_then(|r| r.first())
                    .map(|d| ("dns_resolvers", d.span())),
            ];
            if let Some((field, span)) = dns_only.into_iter().flatten().next() {
                return Err(self.error(
                    span,
                    format!(
                        "cluster `{name}`: `{field}` applies to `discovery = \"strict_dns\"` clusters only"
                    ),
                ));
            }
        }
        let mut endpoints = Vec::new();
        let mut names = Vec::new();
        for endpoint in raw.endpoints.get_ref() {
            let (target, weight) = self.weighted_endpoint(&name, endpoint)?;
            // Else a URL would be taken for a host name and fail to resolve, a DNS error that
            // does not say what is wrong.
            if let Some(url) = Url::of(target, false) {
                return Err(self.error(
                    endpoint.span(),
                    format!(
                        "cluster `{name}`: endpoint {}",
                        url.message(
                            "endpoints are `host:port`",
                            "baton has no TLS to upstreams: name a port where the upstream takes cleartext HTTP"
                        )
                    ),
                ));
            }
            if dns {
                let (host, port) = self.dns_name(&name, endpoint, target)?;
                if names
                    .iter()
                    .any(|n: &DnsName| n.host == host && n.port == port)
                {
                    return Err(self.error(
                        endpoint.span(),
                        format!(
                            "cluster `{name}`: endpoint {host}:{port} is listed twice; give it a weight instead"
                        ),
                    ));
                }
                names.push(DnsName { host, port, weight });
            } else {
                let address = self.endpoint(&name, endpoint, target)?;
                if endpoints.iter().any(|e: &Endpoint| e.address == address) {
                    return Err(self.error(
                        endpoint.span(),
                        format!(
                            "cluster `{name}`: endpoint {address} is listed twice; give it a weight instead"
                        ),
                    ));
                }
                endpoints.push(Endpoint { address, weight });
            }
        }
        let discovery = if dns {
            let resolvers = raw
                .dns_resolvers
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    r.get_ref()
                        .parse::<SocketAddr>()
                        .or_else(|_| {
                            r.get_ref()
                                .parse::<std::net::IpAddr>()
                                .map(|ip| SocketAddr::new(ip, 53))
                        })
                        .map_err(|_| {
                            self.error(
                                r.span(),
                                format!(
                                    "cluster `{name}`: dns_resolvers: `{}` is not an IP address (with an optional port), like \"10.0.0.2\" or \"127.0.0.1:5353\"",
                                    r.get_ref()
                                ),
                            )
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            Discovery::StrictDns {
                names,
                refresh: self.timeout_or(
                    "cluster.dns_refresh_rate",
                    raw.dns_refresh_rate,
                    DEFAULT_DNS_REFRESH_RATE,
                )?,
                resolvers,
                family: match raw.dns_lookup_family.map(Spanned::into_inner) {
                    None | Some(RawLookupFamily::V4Preferred) => LookupFamily::V4Preferred,
                    Some(RawLookupFamily::V4Only) => LookupFamily::V4Only,
                    Some(RawLookupFamily::V6Only) => LookupFamily::V6Only,
                    Some(RawLookupFamily::All) => LookupFamily::All,
                },
            }
        } else {
            Discovery::Static
        };
        let max_idle_per_endpoint = match raw.max_idle_per_endpoint {
            None => DEFAULT_MAX_IDLE_PER_ENDPOINT,
            Some(n) => usize::try_from(*n.get_ref()).map_err(|_| {
                self.error(
                    n.span(),
                    format!("cluster `{name}`: max_idle_per_endpoint must be zero or more"),
                )
            })?,
        };
        let lb_policy = match raw.lb_policy.as_ref().map(|p| *p.get_ref()) {
            None | Some(RawLbPolicy::RoundRobin) => Policy::RoundRobin,
            Some(RawLbPolicy::LeastRequest) => Policy::LeastRequest,
            Some(RawLbPolicy::Random) => Policy::Random,
            Some(RawLbPolicy::RingHash) => Policy::RingHash,
            Some(RawLbPolicy::Maglev) => Policy::Maglev,
        };
        let hash_key = match (raw.hash_key, lb_policy.uses_hash()) {
            (Some(key), true) => Some(self.hash_key(&name, key)?),
            (None, true) => {
                return Err(self.error(
                    raw.lb_policy.map_or(raw.name.span(), |p| p.span()),
                    format!(
                        "cluster `{name}`: lb_policy `{}` needs a hash_key: {{ header = \"x-user-id\" }}, {{ cookie = \"session\" }} or {{ source_ip = true }}",
                        lb_policy.name()
                    ),
                ));
            }
            (Some(key), false) => {
                return Err(self.error(
                    key.span(),
                    format!(
                        "cluster `{name}`: hash_key applies to lb_policy \"ring_hash\" or \"maglev\", not \"{}\"",
                        lb_policy.name()
                    ),
                ));
            }
            (None, false) => None,
        };
        let panic_threshold = match raw.panic_threshold {
            None => DEFAULT_PANIC_THRESHOLD,
            Some(p) => self.percent(&format!("cluster `{name}`: panic_threshold"), &p)?,
        };
        Ok(Cluster {
            connect_timeout: self.timeout_or(
                "cluster.connect_timeout",
                raw.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            )?,
            request_timeout: self.timeout_or(
                "cluster.request_timeout",
                raw.request_timeout,
                DEFAULT_REQUEST_TIMEOUT,
            )?,
            idle_timeout: self.timeout_or(
                "cluster.idle_timeout",
                raw.idle_timeout,
                DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            )?,
            max_idle_per_endpoint,
            protocol: match raw.protocol.map(Spanned::into_inner) {
                None | Some(RawUpstreamProtocol::Http1) => UpstreamProtocol::Http1,
                Some(RawUpstreamProtocol::Http2) => UpstreamProtocol::Http2,
            },
            lb_policy,
            hash_key,
            panic_threshold,
            health_check: raw
                .health_check
                .map(|hc| self.health_check(&name, hc))
                .transpose()?,
            outlier: raw
                .outlier_detection
                .map(|o| self.outlier(&name, o))
                .transpose()?,
            breakers: match raw.circuit_breakers {
                Some(b) => self.breakers(&name, b.into_inner())?,
                None => DEFAULT_BREAKERS,
            },
            discovery,
            name,
            endpoints,
        })
    }

    /// A percentage from 0 to 100.
    pub(super) fn percent(&self, field: &str, value: &Spanned<f64>) -> Result<f64> {
        let p = *value.get_ref();
        if (0.0..=100.0).contains(&p) {
            Ok(p)
        } else {
            Err(self.error(
                value.span(),
                format!("{field}: expected a percentage from 0 to 100"),
            ))
        }
    }

    /// `"host:port"` or `"host:port weight=N"`: the address part and the weight.
    fn weighted_endpoint<'v>(
        &self,
        cluster: &str,
        value: &'v Spanned<String>,
    ) -> Result<(&'v str, u32)> {
        let mut words = value.get_ref().split_whitespace();
        let target = words.next().unwrap_or("");
        let mut weight = 1;
        for word in words {
            let Some(w) = word.strip_prefix("weight=") else {
                return Err(self.error(
                    value.span(),
                    format!(
                        "cluster `{cluster}`: endpoint `{}`: `{word}` is not understood; after the address only `weight=N` may follow (no spaces around `=`)",
                        value.get_ref()
                    ),
                ));
            };
            match w.parse::<u32>().ok().filter(|w| (1..=10_000).contains(w)) {
                Some(w) => weight = w,
                None => {
                    return Err(self.error(
                        value.span(),
                        format!(
                            "cluster `{cluster}`: endpoint `{}`: the weight must be a whole number from 1 to 10000, not `{w}`",
                            value.get_ref()
                        ),
                    ));
                }
            }
        }
        Ok((target, weight))
    }

    /// A static endpoint: an IP address and port, or a host name resolved once, now.
    fn endpoint(&self, cluster: &str, value: &Spanned<String>, target: &str) -> Result<SocketAddr> {
        if let Ok(addr) = target.parse() {
            return Ok(addr);
        }
        if target.parse::<std::net::IpAddr>().is_ok() || !target.contains(':') {
            return Err(self.error(
                value.span(),
                format!(
                    "cluster `{cluster}`: endpoint `{target}` has no port; write it like \"127.0.0.1:8080\" or \"backend.internal:8080\""
                ),
            ));
        }
        let resolved = target
            .to_socket_addrs()
            .map_err(|e| {
                self.error(
                    value.span(),
                    format!(
                        "cluster `{cluster}`: endpoint `{target}` is not \"host:port\" that resolves ({e}); for names that change, use discovery = \"strict_dns\""
                    ),
                )
            })?
            .next();
        resolved.ok_or_else(|| {
            self.error(
                value.span(),
                format!("cluster `{cluster}`: endpoint `{target}` resolves to no address"),
            )
        })
    }

    /// A `strict_dns` endpoint: a host name (or address) and a port, resolved later.
    fn dns_name(
        &self,
        cluster: &str,
        value: &Spanned<String>,
        target: &str,
    ) -> Result<(String, u16)> {
        let bad = |why: &str| {
            self.error(
                value.span(),
                format!(
                    "cluster `{cluster}`: endpoint `{target}` {why}; write it like \"backend.internal:8080\""
                ),
            )
        };
        let (host, port) = target.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("has no valid port (1 to 65535)"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let valid = !host.is_empty()
            && (host.parse::<std::net::IpAddr>().is_ok()
                || host.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                }));
        if !valid {
            return Err(bad("is not a host name"));
        }
        Ok((host.to_ascii_lowercase(), port))
    }

    fn hash_key(&self, cluster: &str, raw: Spanned<RawHashKey>) -> Result<HashKey> {
        let span = raw.span();
        let key = raw.into_inner();
        match (key.header, key.cookie, key.source_ip) {
            (Some(header), None, None | Some(false)) => http::HeaderName::from_bytes(
                header.as_bytes(),
            )
            .map(HashKey::Header)
            .map_err(|_| {
                self.error(
                    span,
                    format!("cluster `{cluster}`: hash_key: `{header}` is not a header name"),
                )
            }),
            (None, Some(cookie), None | Some(false)) if !cookie.is_empty() => {
                Ok(HashKey::Cookie(cookie))
            }
            (None, None, Some(true)) => Ok(HashKey::SourceIp),
            _ => Err(self.error(
                span,
                format!(
                    "cluster `{cluster}`: hash_key takes exactly one of {{ header = \"name\" }}, {{ cookie = \"name\" }}, {{ source_ip = true }}"
                ),
            )),
        }
    }

    fn health_check(&self, cluster: &str, raw: Spanned<RawHealthCheck>) -> Result<HealthCheck> {
        let raw = raw.into_inner();
        let field = |f: &str| format!("cluster `{cluster}`: health_check.{f}");
        let kind = match raw.kind.get_ref() {
            RawHealthCheckKind::Tcp => {
                if let Some(extra) = raw
                    .path
                    .as_ref()
                    .map(|p| p.span())
                    .or(raw.host.as_ref().map(|h| h.span()))
                    .or(raw
                        .expected_statuses
                        .as_ref()
                        .and_then(|s| s.first())
                        .map(|s| s.span()))
                {
                    return Err(self.error(
                        extra,
                        format!(
                            "cluster `{cluster}`: health_check: path, host and expected_statuses apply to type = \"http\" checks only"
                        ),
                    ));
                }
                HealthCheckKind::Tcp
            }
            RawHealthCheckKind::Http => {
                let path = match raw.path {
                    None => "/".to_owned(),
                    Some(p)
                        if p.get_ref().starts_with('/')
                            && http::uri::PathAndQuery::try_from(p.get_ref().as_str()).is_ok() =>
                    {
                        p.into_inner()
                    }
                    Some(p) => {
                        return Err(self.error(
                            p.span(),
                            format!(
                                "{}: `{}` is not a path starting with `/`",
                                field("path"),
                                p.get_ref()
                            ),
                        ));
                    }
                };
                let host = match raw.host {
                    None => cluster.to_owned(),
                    Some(h)
                        if http::HeaderValue::from_str(h.get_ref()).is_ok()
                            && !h.get_ref().is_empty() =>
                    {
                        h.into_inner()
                    }
                    Some(h) => {
                        return Err(
                            self.error(h.span(), format!("{}: not a host name", field("host")))
                        );
                    }
                };
                let expected = match raw.expected_statuses {
                    None => vec![200..=200],
                    Some(list) if list.is_empty() => {
                        return Err(self.error(
                            raw.kind.span(),
                            format!("{}: list at least one status", field("expected_statuses")),
                        ));
                    }
                    Some(list) => list
                        .iter()
                        .map(|s| self.status_range(&field("expected_statuses"), s))
                        .collect::<Result<Vec<_>>>()?,
                };
                HealthCheckKind::Http {
                    path,
                    host,
                    expected,
                }
            }
        };
        let threshold = |name: &str, value: Option<Spanned<i64>>, default: u32| -> Result<u32> {
            value.map_or(Ok(default), |v| {
                self.count(&field(name), &v, 1000).map(|n| n as u32)
            })
        };
        Ok(HealthCheck {
            kind,
            interval: self.timeout_or(&field("interval"), raw.interval, DEFAULT_HC_INTERVAL)?,
            timeout: self.timeout_or(&field("timeout"), raw.timeout, DEFAULT_HC_TIMEOUT)?,
            healthy_threshold: threshold("healthy_threshold", raw.healthy_threshold, 2)?,
            unhealthy_threshold: threshold("unhealthy_threshold", raw.unhealthy_threshold, 3)?,
        })
    }

    fn status_range(
        &self,
        field: &str,
        value: &Spanned<RawStatusRange>,
    ) -> Result<std::ops::RangeInclusive<u16>> {
        let status = |n: i64| u16::try_from(n).ok().filter(|s| (100..=599).contains(s));
        let parsed = match value.get_ref() {
            RawStatusRange::Number(n) => status(*n).map(|s| s..=s),
            RawStatusRange::Text(t) => t.split_once('-').and_then(|(a, b)| {
                let a = status(a.trim().parse().ok()?)?;
                let b = status(b.trim().parse().ok()?)?;
                (a <= b).then_some(a..=b)
            }),
        };
        parsed.ok_or_else(|| {
            self.error(
                value.span(),
                format!(
                    "{field}: expected a status from 100 to 599 such as 200, or a range such as \"200-399\""
                ),
            )
        })
    }

    fn outlier(&self, cluster: &str, raw: Spanned<RawOutlier>) -> Result<OutlierDetection> {
        let span = raw.span();
        let raw = raw.into_inner();
        let field = |f: &str| format!("cluster `{cluster}`: outlier_detection.{f}");
        // Zero turns a detector off, as in Envoy's enforcing_* = 0.
        let detector = |name: &str, value: Option<Spanned<i64>>, default: Option<u32>| match value {
            None => Ok(default),
            Some(v) if *v.get_ref() == 0 => Ok(None),
            Some(v) => self.count(&field(name), &v, 1000).map(|n| Some(n as u32)),
        };
        let consecutive_5xx = detector("consecutive_5xx", raw.consecutive_5xx, Some(5))?;
        let consecutive_gateway_failure = detector(
            "consecutive_gateway_failure",
            raw.consecutive_gateway_failure,
            None,
        )?;
        if consecutive_5xx.is_none() && consecutive_gateway_failure.is_none() {
            return Err(self.error(
                span,
                format!(
                    "cluster `{cluster}`: outlier_detection has every detector off; set consecutive_5xx or consecutive_gateway_failure above zero, or remove the table"
                ),
            ));
        }
        let base = self.timeout_or(
            &field("base_ejection_time"),
            raw.base_ejection_time,
            DEFAULT_BASE_EJECTION,
        )?;
        let max_span = raw.max_ejection_time.as_ref().map(|m| m.span());
        let max = self.timeout_or(
            &field("max_ejection_time"),
            raw.max_ejection_time,
            DEFAULT_MAX_EJECTION.max(base),
        )?;
        if max < base {
            return Err(self.error(
                max_span.unwrap_or(span),
                format!(
                    "{}: must not be shorter than base_ejection_time",
                    field("max_ejection_time")
                ),
            ));
        }
        Ok(OutlierDetection {
            consecutive_5xx,
            consecutive_gateway_failure,
            base_ejection_time: base,
            max_ejection_time: max,
            max_ejection_percent: raw
                .max_ejection_percent
                .map(|p| self.percent(&field("max_ejection_percent"), &p))
                .transpose()?
                .unwrap_or(10.0),
        })
    }

    fn breakers(&self, cluster: &str, raw: RawBreakers) -> Result<CircuitBreakers> {
        let field = |f: &str| format!("cluster `{cluster}`: circuit_breakers.{f}");
        let limit = |name: &str, value: Option<Spanned<i64>>, default: usize| {
            value.map_or(Ok(default), |v| self.count(&field(name), &v, 1 << 30))
        };
        let max_retries = match raw.max_retries {
            None => DEFAULT_BREAKERS.max_retries,
            Some(v) => usize::try_from(*v.get_ref()).map_err(|_| {
                self.error(
                    v.span(),
                    format!("{}: must be zero or more", field("max_retries")),
                )
            })?,
        };
        Ok(CircuitBreakers {
            max_connections: limit(
                "max_connections",
                raw.max_connections,
                DEFAULT_BREAKERS.max_connections,
            )?,
            max_pending_requests: limit(
                "max_pending_requests",
                raw.max_pending_requests,
                DEFAULT_BREAKERS.max_pending_requests,
            )?,
            max_requests: limit(
                "max_requests",
                raw.max_requests,
                DEFAULT_BREAKERS.max_requests,
            )?,
            max_retries,
        })
    }
}
