//! TLS material: certificates and keys loaded at config time, and the SNI resolver that picks one.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// One certificate chain with its key, and the names it answers for.
pub struct LoadedCertificate {
    pub key: Arc<CertifiedKey>,
    /// Lower-case DNS names; `*.example.com` wildcards included as written.
    pub names: Vec<String>,
}

/// The crypto provider every TLS listener uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a PEM chain and a PEM key, checks that they belong together, and returns the names the
/// chain's leaf certificate is valid for (its DNS subject alternative names).
pub fn load_certificate(
    provider: &CryptoProvider,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Arc<CertifiedKey>, Vec<String>), String> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| format!("cannot read certificate file {}: {e}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "certificate file {} is not valid PEM: {e}",
                cert_path.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "certificate file {} holds no CERTIFICATE block",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        format!(
            "cannot load a private key from {}: {e} (expected a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)",
            key_path.display()
        )
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("private key {} is not usable: {e}", key_path.display()))?;
    let names = leaf_dns_names(&chain[0])
        .map_err(|e| format!("certificate {} cannot be parsed: {e}", cert_path.display()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|_| {
        format!(
            "private key {} does not belong to certificate {}",
            key_path.display(),
            cert_path.display()
        )
    })?;
    Ok((Arc::new(certified), names))
}

fn leaf_dns_names(leaf: &CertificateDer<'_>) -> Result<Vec<String>, webpki::Error> {
    let cert = webpki::EndEntityCert::try_from(leaf)?;
    Ok(cert
        .valid_dns_names()
        .map(|name| name.to_ascii_lowercase())
        .collect())
}

/// Builds a server config that picks a certificate by SNI and offers h2 and http/1.1 by ALPN.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    certificates: Vec<LoadedCertificate>,
) -> Result<rustls::ServerConfig, String> {
    let resolver = SniResolver::new(certificates);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot build a TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Picks a certificate by the client's server name: an exact name first, then the longest
/// matching wildcard, then the first certificate of the listener (also when the client sends no
/// SNI), as nginx does with its default server.
#[derive(Debug)]
struct SniResolver {
    keys: Vec<Arc<CertifiedKey>>,
    exact: HashMap<String, usize>,
    /// `(".example.com", index)`, longest suffix first.
    wildcards: Vec<(String, usize)>,
}

impl SniResolver {
    fn new(certificates: Vec<LoadedCertificate>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        let mut keys = Vec::with_capacity(certificates.len());
        for (index, cert) in certificates.into_iter().enumerate() {
            for name in cert.names {
                match name.strip_prefix('*') {
                    Some(suffix) if suffix.starts_with('.') => {
                        wildcards.push((suffix.to_owned(), index))
                    }
                    _ => {
                        exact.entry(name).or_insert(index);
                    }
                }
            }
            keys.push(cert.key);
        }
        wildcards.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        SniResolver {
            keys,
            exact,
            wildcards,
        }
    }

    fn pick(&self, server_name: Option<&str>) -> usize {
        let Some(name) = server_name else { return 0 };
        let name = name.to_ascii_lowercase();
        if let Some(&index) = self.exact.get(&name) {
            return index;
        }
        self.wildcards
            .iter()
            .find(|(suffix, _)| {
                // A wildcard covers exactly one label: `*.example.com` takes `a.example.com`.
                name.strip_suffix(suffix.as_str())
                    .is_some_and(|label| !label.is_empty() && !label.contains('.'))
            })
            .map_or(0, |&(_, index)| index)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.keys
            .get(self.pick(client_hello.server_name()))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolver(names: &[&[&str]]) -> SniResolver {
        let cert = rcgen_free_key();
        SniResolver::new(
            names
                .iter()
                .map(|names| LoadedCertificate {
                    key: cert.clone(),
                    names: names.iter().map(|n| n.to_string()).collect(),
                })
                .collect(),
        )
    }

    /// The resolver's choice depends only on names, so any key will do here.
    fn rcgen_free_key() -> Arc<CertifiedKey> {
        // An Ed25519 PKCS#8 key generated once for this test; it signs nothing.
        const KEY: &[u8] = &[
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20, 0x4b, 0x1e, 0x5c, 0x2f, 0x0a, 0x3d, 0x11, 0x9e, 0x7c, 0x65, 0x21, 0x08,
            0xaa, 0x4f, 0x93, 0x02, 0x6d, 0xc1, 0x5e, 0x77, 0x39, 0x10, 0xbd, 0x48, 0x2a, 0x9f,
            0x63, 0x05, 0xe2, 0x71, 0x5c, 0x0d,
        ];
        let key = PrivateKeyDer::try_from(KEY.to_vec()).unwrap();
        let signing = provider().key_provider.load_private_key(key).unwrap();
        Arc::new(CertifiedKey::new(vec![], signing))
    }

    #[test]
    fn sni_prefers_exact_then_wildcard_then_first() {
        let r = resolver(&[&["default.test"], &["*.example.com"], &["www.example.com"]]);
        assert_eq!(r.pick(Some("www.example.com")), 2);
        assert_eq!(r.pick(Some("API.example.com")), 1);
        assert_eq!(r.pick(Some("a.b.example.com")), 0);
        assert_eq!(r.pick(Some("example.com")), 0);
        assert_eq!(r.pick(Some("other.test")), 0);
        assert_eq!(r.pick(None), 0);
    }
}
