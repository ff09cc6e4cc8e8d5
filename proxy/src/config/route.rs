//! The route types and their matching: which requests a route takes (hosts, path, headers), and
//! what it does with them (clusters, retries, mirror, rate limit, or a direct answer).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::ClusterId;

#[derive(Debug)]
pub struct Route {
    pub hosts: Vec<HostPattern>,
    pub path: PathMatch,
    /// Every one must match.
    pub headers: Vec<HeaderMatch>,
    /// Requests past it are answered 429.
    pub rate_limit: Option<RateLimit>,
    pub action: RouteAction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Prefix(String),
    Exact(String),
}

/// A condition on a request header.
#[derive(Debug)]
pub struct HeaderMatch {
    pub name: http::HeaderName,
    pub rule: HeaderRule,
    /// The route matches when the rule does not.
    pub invert: bool,
}

#[derive(Debug)]
pub enum HeaderRule {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
    /// The header is there (any value).
    Present,
}

#[derive(Debug)]
pub enum RouteAction {
    Cluster(Box<ClusterRoute>),
    Direct(DirectResponse),
}

/// A route to one or more clusters, with what protects the request on its way.
#[derive(Debug)]
pub struct ClusterRoute {
    pub target: Target,
    /// All tries together; the cluster's `request_timeout` when not given.
    pub timeout: Option<Duration>,
    /// Each try.
    pub per_try_timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub mirror: Option<Mirror>,
    /// Protocols an HTTP/1.1 client may switch to (`Upgrade`), in lower case, each a name with
    /// or without a version (`websocket`, `foo/2`); never `h2c`.
    pub upgrades: Vec<String>,
    /// How long a tunnel (after a `101`) may carry no byte either way; the listener's
    /// `idle_timeout` when not given.
    pub upgrade_idle_timeout: Option<Duration>,
}

/// Which cluster a request goes to.
#[derive(Debug, Clone)]
pub enum Target {
    One(ClusterId),
    /// Drawn by weight for each request (canary, blue/green).
    Weighted(Vec<(ClusterId, u32)>),
}

impl Target {
    /// The cluster for one request; `draw` is a random number.
    pub fn pick(&self, draw: u64) -> ClusterId {
        match self {
            Target::One(id) => *id,
            Target::Weighted(weights) => {
                let total: u64 = weights.iter().map(|&(_, w)| u64::from(w)).sum();
                let mut at = draw % total.max(1);
                for &(id, w) in weights {
                    if at < u64::from(w) {
                        return id;
                    }
                    at -= u64::from(w);
                }
                weights[0].0
            }
        }
    }

    pub fn clusters(&self) -> Vec<ClusterId> {
        match self {
            Target::One(id) => vec![*id],
            Target::Weighted(w) => w.iter().map(|&(id, _)| id).collect(),
        }
    }
}

/// When a failed try is made again.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub on: RetryOn,
    pub num_retries: u32,
    /// Retry POST and PATCH too (they may have had an effect upstream).
    pub retry_non_idempotent: bool,
    /// Backoff before a retry: exponential from `base_interval`, with jitter, up to `max_interval`.
    pub base_interval: Duration,
    pub max_interval: Duration,
    /// Retries in flight at most, as a share (percent) of requests in flight to the cluster...
    pub budget_percent: f64,
    /// ...but always this many.
    pub min_retry_concurrency: u32,
}

/// What a retry is for (Envoy's `retry_on` values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    /// No connection could be made.
    pub connect_failure: bool,
    /// The connection broke before a response, or the try timed out.
    pub reset: bool,
    /// Any 5xx answer (and what `connect_failure` and `reset` cover).
    pub server_error: bool,
    /// 502, 503, 504 (and what `connect_failure` and `reset` cover).
    pub gateway_error: bool,
    /// Specific statuses.
    pub statuses: [u16; 4],
}

/// A token bucket per route, shared by the generation's workers: `max_tokens` at most, refilled
/// with `tokens_per_fill` every `fill_interval`; a request without a token is answered 429.
#[derive(Debug)]
pub struct RateLimit {
    pub max_tokens: u64,
    pub tokens_per_fill: u64,
    pub fill_interval: Duration,
    /// (tokens, when the last fill was counted).
    pub bucket: std::sync::Mutex<(u64, std::time::Instant)>,
}

impl RateLimit {
    /// Takes a token if there is one; if not, says how long until the next fill.
    pub fn take(&self) -> Result<(), Duration> {
        let now = std::time::Instant::now();
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let (tokens, since) = *bucket;
        let fills =
            now.saturating_duration_since(since).as_nanos() / self.fill_interval.as_nanos().max(1);
        let (mut tokens, since) = if fills > 0 {
            let added = u64::try_from(fills)
                .unwrap_or(u64::MAX)
                .saturating_mul(self.tokens_per_fill);
            let fills = u32::try_from(fills).unwrap_or(u32::MAX);
            (
                tokens.saturating_add(added).min(self.max_tokens),
                since + self.fill_interval.saturating_mul(fills),
            )
        } else {
            (tokens, since)
        };
        let taken = tokens > 0;
        if taken {
            tokens -= 1;
        }
        *bucket = (tokens, since);
        if taken {
            Ok(())
        } else {
            Err((since + self.fill_interval).saturating_duration_since(now))
        }
    }
}

/// A copy of a share of a route's requests, sent to another cluster; its answers are dropped.
#[derive(Debug, Clone, Copy)]
pub struct Mirror {
    pub cluster: ClusterId,
    pub percent: f64,
}

#[derive(Debug)]
pub struct DirectResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A host that a route answers for; ports are ignored and case does not matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`
    Any,
    /// `example.com`, kept in lower case.
    Exact(String),
    /// `*.example.com`, kept as `.example.com` in lower case.
    Suffix(String),
}

impl Route {
    /// Whether this route takes a request for `host` (without port), `path` and `headers`.
    pub fn matches(&self, host: &str, path: &str, headers: &HeaderMap) -> bool {
        let path_matches = match &self.path {
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Exact(exact) => path == exact,
        };
        path_matches
            && (self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(host)))
            && self.headers.iter().all(|m| m.matches(headers, host))
    }
}

impl HeaderMatch {
    /// `host` is the request's host without port: a match on `host` reads it, so that it works
    /// for HTTP/2 requests too (their host is the `:authority`, not a header).
    pub fn matches(&self, headers: &HeaderMap, host: &str) -> bool {
        let test = |v: &str| match &self.rule {
            HeaderRule::Exact(e) => v == e,
            HeaderRule::Prefix(p) => v.starts_with(p.as_str()),
            HeaderRule::Regex(r) => r.is_match(v),
            HeaderRule::Present => true,
        };
        let hit = if self.name == http::header::HOST {
            !host.is_empty() && test(host)
        } else {
            let mut values = headers.get_all(&self.name).iter();
            match &self.rule {
                HeaderRule::Present => values.next().is_some(),
                _ => values.any(|v| v.to_str().is_ok_and(test)),
            }
        };
        hit != self.invert
    }
}

impl HostPattern {
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Exact(name) => host.eq_ignore_ascii_case(name),
            HostPattern::Suffix(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_match_reads_the_host_of_http2_requests_too() {
        let m = HeaderMatch {
            name: http::header::HOST,
            rule: HeaderRule::Exact("api.test".into()),
            invert: false,
        };
        // An HTTP/2 request: no Host header, the host comes from :authority.
        assert!(m.matches(&HeaderMap::new(), "api.test"));
        assert!(!m.matches(&HeaderMap::new(), "web.test"));
        let other = HeaderMatch {
            name: http::HeaderName::from_static("x-a"),
            rule: HeaderRule::Present,
            invert: true,
        };
        assert!(other.matches(&HeaderMap::new(), "api.test"));
    }

    #[test]
    fn host_patterns_match_case_insensitively() {
        assert!(HostPattern::Exact("example.com".into()).matches("EXAMPLE.com"));
        assert!(!HostPattern::Exact("example.com".into()).matches("www.example.com"));
        let wildcard = HostPattern::Suffix(".example.com".into());
        assert!(wildcard.matches("www.Example.com"));
        assert!(!wildcard.matches(".example.com"));
        assert!(!wildcard.matches("example.com"));
        assert!(!wildcard.matches("wwwexample.com"));
        assert!(HostPattern::Any.matches(""));
    }
}
