//! Name resolution for `strict_dns` clusters (placeholder until the resolver with configurable
//! name servers lands): the system's resolver, through the blocking pool.

use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("{0}")]
    Failed(String),
}

pub struct Resolver {
    timeout: Duration,
}

impl Resolver {
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<Resolver, DnsError> {
        if !nameservers.is_empty() {
            return Err(DnsError::Failed(
                "dns_resolvers are not supported yet".to_owned(),
            ));
        }
        Ok(Resolver { timeout })
    }

    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DnsError> {
        let lookup = tokio::net::lookup_host((host, port));
        let mut addresses: Vec<SocketAddr> = tokio::time::timeout(self.timeout, lookup)
            .await
            .map_err(|_| DnsError::Failed("timed out".to_owned()))?
            .map_err(|e| DnsError::Failed(e.to_string()))?
            .collect();
        addresses.sort();
        addresses.dedup();
        Ok(addresses)
    }
}
