//! Routes of HTTP listeners: what they match, where they send, and what protects the request.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use super::super::raw::{
    RawDirectResponse, RawHeaderMatch, RawMirror, RawRateLimit, RawRetry, RawRoute,
};
use super::*;

/// Default first retry backoff (Envoy's).
const DEFAULT_RETRY_BASE: Duration = Duration::from_millis(25);
/// What a route lets clients upgrade to when it does not say.
const DEFAULT_UPGRADE: &str = "websocket";

impl Validator<'_> {
    pub(super) fn route(
        &self,
        listener: &str,
        number: usize,
        raw: Spanned<RawRoute>,
        clusters: &HashMap<String, ClusterId>,
    ) -> Result<Route> {
        let span = raw.span();
        let raw = raw.into_inner();
        let what = format!("listener `{listener}` route {number}");
        let hosts = raw
            .hosts
            .unwrap_or_default()
            .iter()
            .map(|h| self.host_pattern(listener, number, h))
            .collect::<Result<Vec<_>>>()?;
        let path = match (raw.path_prefix, raw.path_exact) {
            (Some(_), Some(exact)) => {
                return Err(self.error(
                    exact.span(),
                    format!("{what}: give path_prefix or path_exact, not both"),
                ));
            }
            (None, None) => PathMatch::Prefix("/".to_owned()),
            (Some(p), None) if p.get_ref().starts_with('/') => PathMatch::Prefix(p.into_inner()),
            (None, Some(p)) if p.get_ref().starts_with('/') => PathMatch::Exact(p.into_inner()),
            (Some(p), None) => {
                return Err(self.error(
                    p.span(),
                    format!("{what}: path_prefix `{}` must start with `/`", p.get_ref()),
                ));
            }
            (None, Some(p)) => {
                return Err(self.error(
                    p.span(),
                    format!("{what}: path_exact `{}` must start with `/`", p.get_ref()),
                ));
            }
        };
        let headers = raw
            .headers
            .into_iter()
            .map(|h| self.header_match(&what, h))
            .collect::<Result<Vec<_>>>()?;

        let to_cluster = raw.cluster.is_some() || raw.weighted_clusters.is_some();
        if !to_cluster {
            let extras = [
                raw.timeout.as_ref().map(|t| ("timeout", t.span())),
                raw.per_try_timeout
                    .as_ref()
                    .map(|t| ("per_try_timeout", t.span())),
                raw.retry.as_ref().map(|t| ("retry", t.span())),
                raw.mirror.as_ref().map(|t| ("mirror", t.span())),
                raw.upgrades.as_ref().map(|t| ("upgrades", t.span())),
                raw.upgrade_idle_timeout
                    .as_ref()
                    .map(|t| ("upgrade_idle_timeout", t.span())),
            ];
            if let Some((field, at)) = extras.into_iter().flatten().next() {
                return Err(self.error(
                    at,
                    format!("{what}: `{field}` applies to routes to a cluster"),
                ));
            }
        }
        let rate_limit = raw
            .rate_limit
            .map(|r| self.rate_limit(&what, r.into_inner()))
            .transpose()?;
        let action = match (raw.cluster, raw.weighted_clusters, raw.direct_response) {
            (Some(cluster), None, None) => {
                Some(Target::One(self.cluster_ref_in(&what, &cluster, clusters)?))
            }
            (None, Some(weighted), None) => {
                let weighted_span = weighted.span();
                let mut targets = Vec::new();
                for w in weighted.into_inner() {
                    let w = w.into_inner();
                    let id = self.cluster_ref_in(&what, &w.cluster, clusters)?;
                    let weight = u32::try_from(*w.weight.get_ref())
                        .ok()
                        .filter(|n| *n <= 10_000)
                        .ok_or_else(|| {
                            self.error(
                                w.weight.span(),
                                format!("{what}: weighted_clusters: a weight is from 0 to 10000"),
                            )
                        })?;
                    targets.push((id, weight));
                }
                if targets.iter().all(|&(_, w)| w == 0) {
                    return Err(self.error(
                        weighted_span,
                        format!(
                            "{what}: weighted_clusters needs at least one cluster with a weight above zero"
                        ),
                    ));
                }
                Some(Target::Weighted(targets))
            }
            (None, None, Some(direct)) => {
                return Ok(Route {
                    hosts,
                    path,
                    headers,
                    rate_limit,
                    action: RouteAction::Direct(self.direct_response(listener, number, direct)?),
                });
            }
            (None, None, None) => None,
            _ => {
                return Err(self.error(
                    span,
                    format!(
                        "{what}: give either `cluster`, `weighted_clusters` or `direct_response`, not two of them"
                    ),
                ));
            }
        };
        let Some(target) = action else {
            return Err(self.error(
                span,
                format!(
                    "{what}: a route needs a `cluster`, `weighted_clusters` or a `direct_response`"
                ),
            ));
        };
        let timeout = raw
            .timeout
            .map(|t| self.timeout_or(&format!("{what}: timeout"), Some(t), Duration::ZERO))
            .transpose()?;
        let per_try_span = raw.per_try_timeout.as_ref().map(|t| t.span());
        let per_try_timeout = raw
            .per_try_timeout
            .map(|t| self.timeout_or(&format!("{what}: per_try_timeout"), Some(t), Duration::ZERO))
            .transpose()?;
        if let (Some(per_try), Some(all), Some(at)) = (per_try_timeout, timeout, per_try_span)
            && per_try >= all
        {
            return Err(self.error(
                at,
                format!(
                    "{what}: per_try_timeout ({per_try:?}) must be shorter than timeout ({all:?}), which bounds all the tries together"
                ),
            ));
        }
        let retry = raw.retry.map(|r| self.retry(&what, r)).transpose()?;
        let mirror = raw
            .mirror
            .map(|m| self.mirror(&what, m.into_inner(), clusters))
            .transpose()?;
        let upgrades = match raw.upgrades {
            None => vec![DEFAULT_UPGRADE.to_owned()],
            Some(list) => list
                .into_inner()
                .iter()
                .map(|p| self.upgrade(&what, p))
                .collect::<Result<Vec<_>>>()?,
        };
        let upgrade_idle_timeout = raw
            .upgrade_idle_timeout
            .map(|t| {
                self.timeout_or(
                    &format!("{what}: upgrade_idle_timeout"),
                    Some(t),
                    Duration::ZERO,
                )
            })
            .transpose()?;
        Ok(Route {
            hosts,
            path,
            headers,
            rate_limit,
            action: RouteAction::Cluster(Box::new(ClusterRoute {
                target,
                timeout,
                per_try_timeout,
                retry,
                mirror,
                upgrades,
                upgrade_idle_timeout,
            })),
        })
    }

    /// A protocol of `upgrades`: a token, optionally `/` and a version (RFC 9110, 7.8), kept in
    /// lower case. `h2c` is refused: baton speaks cleartext HTTP/2 by prior knowledge, and a
    /// tunnel to an upstream that switched to HTTP/2 would carry requests no route saw.
    fn upgrade(&self, what: &str, raw: &Spanned<String>) -> Result<String> {
        let protocol = raw.get_ref().to_ascii_lowercase();
        let is_token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        let (name, version) = match protocol.split_once('/') {
            Some((name, version)) => (name, Some(version)),
            None => (protocol.as_str(), None),
        };
        if !is_token(name) || version.is_some_and(|v| !is_token(v)) {
            return Err(self.error(
                raw.span(),
                format!(
                    "{what}: upgrades: `{}` is not a protocol name as `Upgrade` carries it (like \"websocket\")",
                    raw.get_ref()
                ),
            ));
        }
        if name == "h2c" {
            return Err(self.error(
                raw.span(),
                format!(
                    "{what}: upgrades: `h2c` cannot be allowed: a client's `Upgrade: h2c` is always ignored and its request served as HTTP/1.1 (RFC 9113 retired the upgrade); clients reach HTTP/2 on this listener by prior knowledge or TLS"
                ),
            ));
        }
        Ok(protocol)
    }

    fn header_match(&self, what: &str, raw: Spanned<RawHeaderMatch>) -> Result<HeaderMatch> {
        let span = raw.span();
        let raw = raw.into_inner();
        let name = http::HeaderName::from_bytes(raw.name.get_ref().as_bytes()).map_err(|_| {
            self.error(
                raw.name.span(),
                format!("{what}: `{}` is not a header name", raw.name.get_ref()),
            )
        })?;
        let rule = match (raw.exact, raw.prefix, raw.regex, raw.present) {
            (Some(e), None, None, None) => HeaderRule::Exact(e.into_inner()),
            (None, Some(p), None, None) => HeaderRule::Prefix(p.into_inner()),
            (None, None, Some(r), None) => {
                if let Err(e) = regex::Regex::new(r.get_ref()) {
                    return Err(self.error(
                        r.span(),
                        format!("{what}: header regex `{}` is not valid: {e}", r.get_ref()),
                    ));
                }
                // Anchored: the whole value must match, as in Envoy's safe_regex.
                let anchored = format!("^(?:{})$", r.get_ref());
                HeaderRule::Regex(
                    regex::Regex::new(&anchored)
                        .map_err(|e| self.error(r.span(), format!("{what}: header regex: {e}")))?,
                )
            }
            (None, None, None, Some(present)) => {
                if *present.get_ref() {
                    HeaderRule::Present
                } else {
                    return Err(self.error(
                        present.span(),
                        format!(
                            "{what}: to match a request without header `{name}`, write present = true, invert = true"
                        ),
                    ));
                }
            }
            _ => {
                return Err(self.error(
                    span,
                    format!(
                        "{what}: a header match takes `name` and exactly one of exact, prefix, regex, present"
                    ),
                ));
            }
        };
        Ok(HeaderMatch {
            name,
            rule,
            invert: raw.invert,
        })
    }

    fn retry(&self, what: &str, raw: Spanned<RawRetry>) -> Result<RetryPolicy> {
        let span = raw.span();
        let raw = raw.into_inner();
        let field = |f: &str| format!("{what}: retry.{f}");
        let mut on = RetryOn::default();
        let mut statuses = Vec::new();
        let retry_on = raw.retry_on.unwrap_or_default();
        if retry_on.is_empty() {
            return Err(self.error(
                span,
                format!(
                    "{}: list what to retry on: \"connect-failure\", \"reset\", \"5xx\", \"gateway-error\", or statuses like \"503\"",
                    field("retry_on")
                ),
            ));
        }
        for item in &retry_on {
            match item.get_ref().as_str() {
                "connect-failure" => on.connect_failure = true,
                "reset" => on.reset = true,
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                other => match other
                    .parse::<u16>()
                    .ok()
                    .filter(|s| (400..=599).contains(s))
                {
                    Some(status) if statuses.len() < on.statuses.len() => statuses.push(status),
                    Some(_) => {
                        return Err(self.error(
                            item.span(),
                            format!(
                                "{}: at most four statuses; use \"5xx\" or \"gateway-error\" for more",
                                field("retry_on")
                            ),
                        ));
                    }
                    None => {
                        let meant = config_errors::nearest(
                            other,
                            ["connect-failure", "reset", "5xx", "gateway-error"],
                        )
                        .map(|m| format!(" (did you mean \"{m}\"?)"))
                        .unwrap_or_default();
                        return Err(self.error(
                            item.span(),
                            format!(
                                "{}: `{other}`{meant} is not one of \"connect-failure\", \"reset\", \"5xx\", \"gateway-error\", or a status from 400 to 599",
                                field("retry_on")
                            ),
                        ));
                    }
                },
            }
        }
        for (slot, s) in on.statuses.iter_mut().zip(statuses) {
            *slot = s;
        }
        let num_retries = match raw.num_retries {
            None => 1,
            Some(n) => u32::try_from(*n.get_ref())
                .ok()
                .filter(|n| *n <= 10)
                .ok_or_else(|| {
                    self.error(
                        n.span(),
                        format!(
                            "{}: expected a number from 0 (no retry) to 10",
                            field("num_retries")
                        ),
                    )
                })?,
        };
        let base_interval = self.timeout_or(
            &field("base_interval"),
            raw.base_interval,
            DEFAULT_RETRY_BASE,
        )?;
        let max_span = raw.max_interval.as_ref().map(|m| m.span());
        let max_interval = self.timeout_or(
            &field("max_interval"),
            raw.max_interval,
            base_interval.saturating_mul(10),
        )?;
        if max_interval < base_interval {
            return Err(self.error(
                max_span.unwrap_or(span.clone()),
                format!(
                    "{}: must not be shorter than base_interval",
                    field("max_interval")
                ),
            ));
        }
        Ok(RetryPolicy {
            on,
            num_retries,
            retry_non_idempotent: raw.retry_non_idempotent.unwrap_or(false),
            base_interval,
            max_interval,
            budget_percent: raw
                .budget_percent
                .map(|p| self.percent(&field("budget_percent"), &p))
                .transpose()?
                .unwrap_or(20.0),
            min_retry_concurrency: raw
                .min_retry_concurrency
                .map(|n| self.count(&field("min_retry_concurrency"), &n, 1 << 20))
                .transpose()?
                .map_or(3, |n| n as u32),
        })
    }

    fn rate_limit(&self, what: &str, raw: RawRateLimit) -> Result<RateLimit> {
        let field = |f: &str| format!("{what}: rate_limit.{f}");
        let max_tokens = self.count(&field("max_tokens"), &raw.max_tokens, 1 << 30)? as u64;
        let tokens_per_fill = raw
            .tokens_per_fill
            .map(|n| self.count(&field("tokens_per_fill"), &n, 1 << 30))
            .transpose()?
            .map_or(1, |n| n as u64);
        let fill_interval = self.timeout_or(
            &field("fill_interval"),
            Some(raw.fill_interval),
            Duration::ZERO,
        )?;
        Ok(RateLimit {
            max_tokens,
            tokens_per_fill,
            fill_interval,
            bucket: std::sync::Mutex::new((max_tokens, std::time::Instant::now())),
        })
    }

    fn mirror(
        &self,
        what: &str,
        raw: RawMirror,
        clusters: &HashMap<String, ClusterId>,
    ) -> Result<Mirror> {
        Ok(Mirror {
            cluster: self.cluster_ref_in(what, &raw.cluster, clusters)?,
            percent: raw
                .percent
                .map(|p| self.percent(&format!("{what}: mirror.percent"), &p))
                .transpose()?
                .unwrap_or(100.0),
        })
    }

    fn host_pattern(
        &self,
        listener: &str,
        number: usize,
        host: &Spanned<String>,
    ) -> Result<HostPattern> {
        let h = host.get_ref().to_ascii_lowercase();
        let valid_label = |s: &str| {
            !s.is_empty()
                && s.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
        };
        if h == "*" {
            Ok(HostPattern::Any)
        } else if let Some(rest) = h.strip_prefix("*.")
            && valid_label(rest)
        {
            Ok(HostPattern::Suffix(format!(".{rest}")))
        } else if valid_label(&h) {
            Ok(HostPattern::Exact(h))
        } else {
            Err(self.error(
                host.span(),
                format!(
                    "listener `{listener}` route {number}: host `{}` is not a host name; write \"example.com\", \"*.example.com\" or \"*\" (without port)",
                    host.get_ref()
                ),
            ))
        }
    }

    fn direct_response(
        &self,
        listener: &str,
        number: usize,
        raw: Spanned<RawDirectResponse>,
    ) -> Result<DirectResponse> {
        let span = raw.span();
        let raw = raw.into_inner();
        let status = u16::try_from(*raw.status.get_ref())
            .ok()
            .filter(|s| (200..=599).contains(s))
            .and_then(|s| StatusCode::from_u16(s).ok())
            .ok_or_else(|| {
                self.error(
                    raw.status.span(),
                    format!(
                        "listener `{listener}` route {number}: direct_response.status {} is not an HTTP status from 200 to 599",
                        raw.status.get_ref()
                    ),
                )
            })?;
        let mut headers = HeaderMap::new();
        for (name, value) in &raw.headers {
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                self.error(
                    span.clone(),
                    format!(
                        "listener `{listener}` route {number}: `{name}` is not a valid header name"
                    ),
                )
            })?;
            let value_parsed = HeaderValue::from_str(value.get_ref()).map_err(|_| {
                self.error(
                    value.span(),
                    format!(
                        "listener `{listener}` route {number}: the value of header `{name}` holds characters a header cannot carry"
                    ),
                )
            })?;
            headers.append(header, value_parsed);
        }
        if !raw.body.is_empty() && !headers.contains_key(CONTENT_TYPE) {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
        }
        Ok(DirectResponse {
            status,
            headers,
            body: Bytes::from(raw.body),
        })
    }
}
