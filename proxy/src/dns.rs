//! Name resolution for clusters whose endpoints are host names (`strict_dns`, as in Envoy): every
//! IPv4 and IPv6 address of a name, asked of the DNS again at each refresh.
//!
//! [`Resolver::resolve`] is one refresh: it always asks the servers (hickory's cache is off), and
//! it fails rather than return part of an answer, so that its caller can keep the last good
//! answer when DNS misbehaves instead of shrinking a cluster to what one address family gave.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{
    NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RecordType};
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::{ProtoError, ProtoErrorKind};
use hickory_resolver::{ResolveError, ResolveErrorKind, TokioResolver};

/// Why a name could not be resolved, worded for the operator who configured it.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// `/etc/resolv.conf` is missing, unreadable, or names no server.
    #[error("cannot read the system DNS configuration (/etc/resolv.conf): {0}")]
    SystemConfig(#[source] ResolveError),
    /// The host is neither an IP address nor a valid DNS name.
    #[error("{host:?} is not a valid host name: {reason}")]
    InvalidName { host: String, reason: String },
    /// The DNS server answered NXDOMAIN: no such name (a typo, or a record not created yet).
    #[error("DNS name {host:?} does not exist (NXDOMAIN)")]
    NotFound { host: String },
    /// The name exists but has neither A nor AAAA records.
    #[error("DNS name {host:?} has no IPv4 (A) or IPv6 (AAAA) address records")]
    NoAddresses { host: String },
    /// No answer came back in time: the server is down, unreachable, or overloaded.
    #[error("no answer from the DNS server for {host:?} within {timeout:?}")]
    Timeout { host: String, timeout: Duration },
    /// The server answered with an error code: it could not resolve the name right now
    /// (SERVFAIL, typically its own upstream failing) or would not (REFUSED).
    #[error("the DNS server failed to resolve {host:?} ({rcode})")]
    ServerFailure { host: String, rcode: String },
    /// Any other failure, such as a socket error.
    #[error("resolving {host:?} failed: {source}")]
    Other {
        host: String,
        #[source]
        source: ResolveError,
    },
}

/// A stub resolver that asks the system's or the given DNS servers, without caching.
///
/// It belongs to the tokio runtime it is first used on: hickory keeps its connections to the
/// servers as tasks of that runtime. Cheap to clone; clones share those connections.
#[derive(Debug, Clone)]
pub struct Resolver {
    inner: TokioResolver,
    timeout: Duration,
}

impl Resolver {
    /// A resolver that asks `nameservers` (over UDP, and over TCP when an answer comes back
    /// truncated), or with `nameservers` empty, the servers and search domains of
    /// `/etc/resolv.conf`, after `/etc/hosts` (so `localhost` and other local names resolve as
    /// the rest of the system resolves them). Both files are read here, once: a changed system
    /// configuration is seen by the next proxy generation, as a changed baton config is.
    ///
    /// `timeout` bounds each [`resolve`](Self::resolve) call as a whole. Within it a query that
    /// gets no answer is sent once more (UDP loses packets), each try waiting half of it.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<Resolver, DnsError> {
        let (config, mut options) = if nameservers.is_empty() {
            let (config, mut options) = hickory_resolver::system_conf::read_system_conf()
                .map_err(DnsError::SystemConfig)?;
            options.use_hosts_file = ResolveHosts::Always;
            (config, options)
        } else {
            let servers: Vec<NameServerConfig> = nameservers
                .iter()
                .flat_map(|&addr| {
                    [Protocol::Udp, Protocol::Tcp]
                        .map(|protocol| NameServerConfig::new(addr, protocol))
                })
                .collect();
            let config =
                ResolverConfig::from_parts(None, Vec::new(), NameServerConfigGroup::from(servers));
            let mut options = ResolverOpts::default();
            // Exactly these servers: the hosts file is the system's answer, not theirs.
            options.use_hosts_file = ResolveHosts::Never;
            (config, options)
        };
        options.timeout = timeout / 2;
        options.attempts = 1;
        // No caching, so that each resolve() asks the servers and sees a change at once (the
        // refresh interval is the caller's): no entries, and any TTL cut to zero in case an
        // entry is kept anyway (hickory's cache expires an entry once its TTL has passed).
        options.cache_size = 0;
        options.positive_max_ttl = Some(Duration::ZERO);
        options.negative_max_ttl = Some(Duration::ZERO);
        let inner = TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(options)
            .build();
        Ok(Resolver { inner, timeout })
    }

    /// Every IPv4 and IPv6 address of `host`, each with `port`, sorted and without duplicates.
    ///
    /// An IP address (`10.0.0.1`, `::1` or `[::1]`) is its own answer, without asking DNS. A
    /// name is asked for A and AAAA records at once; a name with addresses of one family only is
    /// an answer, but a family whose query failed (timeout, SERVFAIL) fails the whole call, so
    /// that a transient failure never passes for a smaller set of addresses.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DnsError> {
        if let Some(ip) = ip_literal(host) {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let name = Name::from_utf8(host).map_err(|e| DnsError::InvalidName {
            host: host.to_owned(),
            reason: e.to_string(),
        })?;
        let lookups = async {
            tokio::join!(
                self.inner.lookup(name.clone(), RecordType::A),
                self.inner.lookup(name, RecordType::AAAA),
            )
        };
        let (v4, v6) = tokio::time::timeout(self.timeout, lookups)
            .await
            .map_err(|_| self.timeout_error(host))?;

        let mut addrs = Vec::new();
        let mut nxdomain = 0;
        for lookup in [v4, v6] {
            match lookup {
                Ok(lookup) => addrs.extend(
                    lookup
                        .iter()
                        .filter_map(|rdata| rdata.ip_addr().map(|ip| SocketAddr::new(ip, port))),
                ),
                Err(e) => match classify(&e) {
                    Outcome::NxDomain => nxdomain += 1,
                    Outcome::NoData => {}
                    Outcome::Timeout => return Err(self.timeout_error(host)),
                    Outcome::Failed(rcode) => {
                        return Err(DnsError::ServerFailure {
                            host: host.to_owned(),
                            rcode,
                        });
                    }
                    Outcome::Other => {
                        return Err(DnsError::Other {
                            host: host.to_owned(),
                            source: e,
                        });
                    }
                },
            }
        }
        if addrs.is_empty() {
            return Err(if nxdomain == 2 {
                DnsError::NotFound {
                    host: host.to_owned(),
                }
            } else {
                DnsError::NoAddresses {
                    host: host.to_owned(),
                }
            });
        }
        addrs.sort_unstable();
        addrs.dedup();
        Ok(addrs)
    }

    fn timeout_error(&self, host: &str) -> DnsError {
        DnsError::Timeout {
            host: host.to_owned(),
            timeout: self.timeout,
        }
    }
}

/// `host` as an IP address, IPv6 with or without the brackets of a URL authority.
fn ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}

/// What one failed A or AAAA lookup means for the whole resolution.
enum Outcome {
    /// The name does not exist.
    NxDomain,
    /// The name exists without records of this type.
    NoData,
    Timeout,
    /// The server answered with this error code.
    Failed(String),
    Other,
}

fn classify(error: &ResolveError) -> Outcome {
    let ResolveErrorKind::Proto(proto) = error.kind() else {
        return Outcome::Other;
    };
    classify_proto(proto)
}

fn classify_proto(error: &ProtoError) -> Outcome {
    match error.kind() {
        ProtoErrorKind::NoRecordsFound { response_code, .. } => match *response_code {
            ResponseCode::NXDomain => Outcome::NxDomain,
            ResponseCode::NoError => Outcome::NoData,
            code => Outcome::Failed(rcode_name(code)),
        },
        ProtoErrorKind::Timeout => Outcome::Timeout,
        _ => Outcome::Other,
    }
}

/// The mnemonic an operator knows from `dig` for the common error codes, else hickory's words.
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::ServFail => "SERVFAIL".to_owned(),
        ResponseCode::Refused => "REFUSED".to_owned(),
        ResponseCode::FormErr => "FORMERR".to_owned(),
        ResponseCode::NotImp => "NOTIMP".to_owned(),
        code => code.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Instant;

    use baton_tests::dns::{DnsServer, Failure};

    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(2);

    async fn server_and_resolver() -> (DnsServer, Resolver) {
        let server = DnsServer::start().await;
        let resolver = Resolver::new(&[server.addr()], TIMEOUT).expect("resolver");
        (server, resolver)
    }

    fn addrs(ips: &[&str], port: u16) -> Vec<SocketAddr> {
        ips.iter()
            .map(|ip| SocketAddr::new(ip.parse().unwrap(), port))
            .collect()
    }

    #[tokio::test]
    async fn resolves_every_address_of_both_families_sorted() {
        let (server, resolver) = server_and_resolver().await;
        server.set(
            "backend.test",
            vec![
                "2001:db8::2".parse().unwrap(),
                "192.0.2.20".parse().unwrap(),
                "2001:db8::1".parse().unwrap(),
                "192.0.2.3".parse().unwrap(),
                "192.0.2.20".parse().unwrap(),
            ],
        );
        let got = resolver.resolve("backend.test", 8080).await.unwrap();
        assert_eq!(
            got,
            addrs(
                &["192.0.2.3", "192.0.2.20", "2001:db8::1", "2001:db8::2"],
                8080
            )
        );
        assert!(server.queries() >= 2, "asked for both A and AAAA");
    }

    #[tokio::test]
    async fn a_name_with_one_family_is_an_answer() {
        let (server, resolver) = server_and_resolver().await;
        server.set("v4.test", vec![Ipv4Addr::new(192, 0, 2, 1).into()]);
        server.set("v6.test", vec![Ipv6Addr::LOCALHOST.into()]);
        assert_eq!(
            resolver.resolve("v4.test", 80).await.unwrap(),
            addrs(&["192.0.2.1"], 80)
        );
        assert_eq!(
            resolver.resolve("v6.test", 80).await.unwrap(),
            addrs(&["::1"], 80)
        );
    }

    #[tokio::test]
    async fn each_call_asks_again_and_sees_a_changed_answer() {
        let (server, resolver) = server_and_resolver().await;
        server.set("backend.test", vec![Ipv4Addr::new(192, 0, 2, 1).into()]);
        assert_eq!(
            resolver.resolve("backend.test", 80).await.unwrap(),
            addrs(&["192.0.2.1"], 80)
        );
        let asked = server.queries();
        // Within the answers' TTL: a caching resolver would still give the old address.
        server.set("backend.test", vec![Ipv4Addr::new(192, 0, 2, 2).into()]);
        assert_eq!(
            resolver.resolve("backend.test", 80).await.unwrap(),
            addrs(&["192.0.2.2"], 80)
        );
        assert!(server.queries() > asked, "the second call asked the server");
    }

    #[tokio::test]
    async fn an_unknown_name_is_not_found() {
        let (server, resolver) = server_and_resolver().await;
        server.set("other.test", vec![Ipv4Addr::new(192, 0, 2, 1).into()]);
        let err = resolver.resolve("missing.test", 80).await.unwrap_err();
        assert!(matches!(err, DnsError::NotFound { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "DNS name \"missing.test\" does not exist (NXDOMAIN)"
        );
    }

    #[tokio::test]
    async fn a_name_without_addresses_has_no_addresses() {
        let (server, resolver) = server_and_resolver().await;
        server.set("empty.test", Vec::new());
        let err = resolver.resolve("empty.test", 80).await.unwrap_err();
        assert!(matches!(err, DnsError::NoAddresses { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn servfail_is_a_server_failure() {
        let (server, resolver) = server_and_resolver().await;
        server.set("backend.test", vec![Ipv4Addr::new(192, 0, 2, 1).into()]);
        server.fail(Failure::ServFail);
        let err = resolver.resolve("backend.test", 80).await.unwrap_err();
        assert!(matches!(err, DnsError::ServerFailure { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "the DNS server failed to resolve \"backend.test\" (SERVFAIL)"
        );
        // And the server recovering is seen at once: no failure was cached either.
        server.fail(Failure::None);
        assert_eq!(
            resolver.resolve("backend.test", 80).await.unwrap(),
            addrs(&["192.0.2.1"], 80)
        );
    }

    #[tokio::test]
    async fn a_silent_server_times_out_within_the_timeout() {
        let server = DnsServer::start().await;
        server.set("backend.test", vec![Ipv4Addr::new(192, 0, 2, 1).into()]);
        server.fail(Failure::Silent);
        let timeout = Duration::from_millis(600);
        let resolver = Resolver::new(&[server.addr()], timeout).unwrap();
        let started = Instant::now();
        let err = resolver.resolve("backend.test", 80).await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(err, DnsError::Timeout { .. }), "{err:?}");
        assert!(server.queries() > 0, "the server was asked");
        // Not earlier than the first try's wait, and not much later than the whole budget.
        assert!(took >= timeout / 2, "gave up after {took:?}");
        assert!(took < timeout + Duration::from_secs(1), "took {took:?}");
    }

    #[tokio::test]
    async fn an_ip_address_answers_itself_without_asking() {
        let (server, resolver) = server_and_resolver().await;
        assert_eq!(
            resolver.resolve("192.0.2.7", 443).await.unwrap(),
            addrs(&["192.0.2.7"], 443)
        );
        assert_eq!(
            resolver.resolve("2001:db8::7", 443).await.unwrap(),
            addrs(&["2001:db8::7"], 443)
        );
        assert_eq!(
            resolver.resolve("[::1]", 443).await.unwrap(),
            addrs(&["::1"], 443)
        );
        assert_eq!(server.queries(), 0);
    }

    #[tokio::test]
    async fn the_system_configuration_resolves_localhost() {
        let resolver = Resolver::new(&[], TIMEOUT).expect("system DNS configuration");
        let got = resolver.resolve("localhost", 9000).await.unwrap();
        assert!(!got.is_empty());
        for addr in &got {
            assert!(addr.ip().is_loopback(), "{got:?}");
            assert_eq!(addr.port(), 9000);
        }
    }

    /// As on the proxy's main thread: a current-thread runtime, inside a `LocalSet`.
    #[test]
    fn works_on_a_current_thread_runtime_in_a_local_set() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let (server, resolver) = server_and_resolver().await;
            server.set("backend.test", vec![Ipv4Addr::new(192, 0, 2, 1).into()]);
            let task = tokio::task::spawn_local(async move {
                resolver.resolve("backend.test", 80).await.unwrap()
            });
            assert_eq!(task.await.unwrap(), addrs(&["192.0.2.1"], 80));
        });
    }
}
