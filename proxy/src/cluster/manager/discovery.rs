//! `strict_dns` discovery: each cluster's names resolved again and again on a task of its own,
//! and the manager's membership brought in line with each answer.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{DNS_TIMEOUT, Manager, new_member};
use crate::cluster::Event;
use crate::config::LookupFamily;
use crate::dns::{DnsError, Resolver};

impl Manager {
    pub(super) fn resolved(
        &self,
        cluster: usize,
        addresses: Vec<(SocketAddr, u32)>,
        failure: Option<String>,
    ) {
        let config = &self.config.clusters[cluster];
        let ids = &self.stats.ids.clusters[cluster];
        let shard = &self.stats.shard;
        shard.inc(ids.update_attempt);
        match failure {
            None => shard.inc(ids.update_success),
            Some(e) => {
                shard.inc(ids.update_failure);
                warn!(cluster = %config.name, "DNS resolution failed; keeping that name's last answer: {e}");
            }
        }
        let mut states = self.state.borrow_mut();
        let state = &mut states[cluster];
        state.resolved = true;
        let mut changed = false;
        // Members that DNS no longer names: gone at once, unless health checking vouches for
        // them (health checking has precedence over discovery): then until they fail a check.
        let mut i = 0;
        while i < state.members.len() {
            let m = &mut state.members[i];
            let named = addresses.iter().any(|(a, _)| *a == m.host.address);
            if named {
                if m.flags.pending_removal {
                    m.flags.pending_removal = false;
                    changed = true;
                }
                i += 1;
                continue;
            }
            let vouched = config.health_check.is_some()
                && !m.flags.failed_active_hc
                && !m.flags.pending_active_hc;
            if vouched {
                if !m.flags.pending_removal {
                    m.flags.pending_removal = true;
                    changed = true;
                }
                i += 1;
            } else {
                info!(cluster = %config.name, upstream = %m.host.address, "endpoint left DNS: removed");
                state.members.remove(i);
                changed = true;
            }
        }
        for (address, weight) in addresses {
            let known = state.members.iter().position(|m| m.host.address == address);
            match known {
                Some(i) if state.members[i].host.weight == weight => {}
                Some(i) => {
                    // A new weight: a new host (its counters start again).
                    let old = &mut state.members[i];
                    let mut member = new_member(cluster, config, address, weight, &self.events);
                    member.flags = old.flags;
                    member.passes = old.passes;
                    member.fails = old.fails;
                    member.ejections = old.ejections;
                    member.unejected = old.unejected;
                    member.last_failure = old.last_failure.take();
                    state.members[i] = member;
                    changed = true;
                }
                None => {
                    info!(cluster = %config.name, upstream = %address, "endpoint joined from DNS");
                    state
                        .members
                        .push(new_member(cluster, config, address, weight, &self.events));
                    changed = true;
                }
            }
        }
        drop(states);
        if changed {
            self.state.borrow_mut()[cluster].dirty = true;
        }
    }
}

impl Manager {
    /// Resolves a `strict_dns` cluster's names now and every `refresh`, telling the manager each
    /// answer. A name whose resolution fails (no answer, SERVFAIL) keeps its last answer, so that
    /// the manager does not drop its endpoints; a name that does not exist or has no address is a
    /// real answer: it has no endpoints now.
    pub(super) async fn resolve_forever(
        cluster: usize,
        name: String,
        names: Vec<crate::config::DnsName>,
        refresh: Duration,
        (servers, family): (Vec<SocketAddr>, LookupFamily),
        events: mpsc::UnboundedSender<Event>,
    ) {
        let mut last: Vec<Vec<SocketAddr>> = vec![Vec::new(); names.len()];
        // Names said to have no address, so that it is said once, not at every refresh.
        let mut warned = vec![false; names.len()];
        let mut resolver = None;
        loop {
            if resolver.is_none() {
                match Resolver::new(&servers, DNS_TIMEOUT) {
                    Ok(r) => resolver = Some(r),
                    Err(e) => {
                        warn!(cluster = %name, "cannot set up DNS resolution (tried again every dns_refresh_rate): {e}")
                    }
                }
            }
            let mut failure = None;
            match &resolver {
                None => failure = Some("no resolver".to_owned()),
                Some(resolver) => {
                    for (i, (n, kept)) in names.iter().zip(last.iter_mut()).enumerate() {
                        match resolver.resolve(&n.host, n.port).await {
                            Ok(mut addresses) => {
                                family.filter(&mut addresses);
                                if addresses.is_empty() && (!kept.is_empty() || !warned[i]) {
                                    warn!(cluster = %name, "DNS name {} has no address of dns_lookup_family; it has no endpoints now", n.host);
                                }
                                warned[i] = addresses.is_empty();
                                *kept = addresses;
                            }
                            Err(e @ (DnsError::NotFound { .. } | DnsError::NoAddresses { .. })) => {
                                if !kept.is_empty() || !warned[i] {
                                    warn!(cluster = %name, "{e}; it has no endpoints now");
                                }
                                warned[i] = true;
                                kept.clear()
                            }
                            Err(e) => failure = Some(e.to_string()),
                        }
                    }
                }
            }
            let mut addresses: Vec<(SocketAddr, u32)> = Vec::new();
            for (n, kept) in names.iter().zip(&last) {
                for a in kept {
                    if !addresses.iter().any(|(b, _)| b == a) {
                        addresses.push((*a, n.weight));
                    }
                }
            }
            let event = Event::Resolved {
                cluster,
                addresses,
                failure,
            };
            if events.send(event).is_err() {
                return;
            }
            tokio::time::sleep(refresh).await;
        }
    }
}
