//! Whom the gateway trusts when it opens a TLS connection: the roots of
//! `[tls] roots` (the bundled public ones, or the platform's store) plus the
//! CA certificates of `tls.ca_file`. One [`Trust`] serves every connection
//! the gateway opens — to the provider, subscribers, Redis, PostgreSQL and
//! the OTLP collector — so a corporate CA is added in one place.
//!
//! ```
//! use pandagate::config::TlsConfig;
//! use pandagate::tls::Trust;
//!
//! let trust = Trust::load(&TlsConfig::default()).unwrap();
//! let config = trust.client_config();
//! assert!(config.alpn_protocols.is_empty(), "each client sets its own ALPN");
//! ```

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::config::{ConfigError, Roots, TlsConfig};

/// The trusted roots, loaded once per config.
#[derive(Clone)]
pub struct Trust {
    roots: Arc<RootCertStore>,
    /// Every root of `roots` as the certificate it came from, for clients
    /// that take certificates rather than a `rustls` config (Redis).
    certificates: Arc<[CertificateDer<'static>]>,
    /// `tls.ca_file`'s certificates, for clients that take them apart from
    /// a `rustls` config.
    extra: Arc<[CertificateDer<'static>]>,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("roots", &self.roots.len())
            .field("ca_file_certificates", &self.extra.len())
            .finish()
    }
}

impl Trust {
    /// The roots `config` names: an empty system store or a `ca_file`
    /// without a certificate is an error naming its key.
    pub fn load(config: &TlsConfig) -> Result<Trust, ConfigError> {
        let mut trust = Collected::empty();
        match config.roots {
            Roots::Bundled => {
                for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
                    trust.add_if_usable(cert.clone());
                }
            }
            Roots::System => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    trust.add_if_usable(cert);
                }
                if trust.certificates.is_empty() {
                    return Err(ConfigError::new(
                        "tls.roots",
                        "the system store holds no usable certificate (install ca-certificates, \
                         or use roots = \"bundled\")",
                    ));
                }
            }
        }
        let extra: Vec<CertificateDer<'static>> = match &config.ca_file {
            None => Vec::new(),
            Some(path) => read_certificates(path)?,
        };
        for cert in &extra {
            trust.add(cert.clone()).map_err(|e| {
                ConfigError::new(
                    "tls.ca_file",
                    format_args!("{}: a certificate is not a usable CA: {e}", path_of(config)),
                )
            })?;
        }
        Ok(Trust {
            roots: Arc::new(trust.store),
            certificates: trust.certificates.into(),
            extra: extra.into(),
        })
    }

    /// The trusted roots.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// Every trusted root as a certificate: the same set as
    /// [`roots`](Self::roots), `tls.ca_file`'s included.
    pub fn certificates(&self) -> &[CertificateDer<'static>] {
        &self.certificates
    }

    /// The certificates of `tls.ca_file` alone.
    pub fn extra(&self) -> &[CertificateDer<'static>] {
        &self.extra
    }

    /// A client config trusting these roots (TLS 1.2 and 1.3, the `ring`
    /// provider, no client certificate), without ALPN: each client sets the
    /// protocols it speaks.
    pub fn client_config(&self) -> rustls::ClientConfig {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth()
    }
}

/// A store's or a collector's address with the trust its TLS connections
/// use: what [`Loaded`](crate::loaded::Loaded) hands each client, so that every one of
/// them trusts exactly `[tls]` and nothing a client library would pick on
/// its own. Derefs to the address.
#[derive(Clone)]
pub struct WithTrust<T> {
    target: T,
    trust: Trust,
}

impl<T> WithTrust<T> {
    pub fn new(target: T, trust: Trust) -> WithTrust<T> {
        WithTrust { target, trust }
    }

    pub fn trust(&self) -> &Trust {
        &self.trust
    }
}

impl<T> std::ops::Deref for WithTrust<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.target
    }
}

impl<T: fmt::Debug> fmt::Debug for WithTrust<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} trusting {:?}", self.target, self.trust)
    }
}

/// The crypto every client config of the gateway uses: `ring`'s.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A store and the certificates it was built from, kept in step: a root
/// that `rustls` cannot use is left out of both.
struct Collected {
    store: RootCertStore,
    certificates: Vec<CertificateDer<'static>>,
}

impl Collected {
    fn empty() -> Collected {
        Collected {
            store: RootCertStore::empty(),
            certificates: Vec::new(),
        }
    }

    fn add(&mut self, cert: CertificateDer<'static>) -> Result<(), rustls::Error> {
        self.store.add(cert.clone())?;
        self.certificates.push(cert);
        Ok(())
    }

    /// A platform store may hold a certificate `rustls` cannot parse; it
    /// is skipped, as `RootCertStore::add_parsable_certificates` would.
    fn add_if_usable(&mut self, cert: CertificateDer<'static>) {
        let _ = self.add(cert);
    }
}

fn path_of(config: &TlsConfig) -> String {
    config
        .ca_file
        .as_deref()
        .map_or_else(String::new, |p| p.display().to_string())
}

/// Every certificate of a PEM file; none is an error naming `tls.ca_file`.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let fail = |m: &dyn fmt::Display| {
        ConfigError::new("tls.ca_file", format_args!("{}: {m}", path.display()))
    };
    let pem = std::fs::read(path).map_err(|e| fail(&e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&format_args!("not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(fail(&"holds no PEM certificate"));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_roots_and_a_ca_file_are_trusted_together() {
        let bundled = Trust::load(&TlsConfig::default()).unwrap();
        assert!(bundled.roots().len() > 100, "{bundled:?}");
        let ca = rcgen::generate_simple_self_signed(vec!["test-ca".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, ca.cert.pem()).unwrap();
        let with = Trust::load(&TlsConfig {
            ca_file: Some(file),
            ..TlsConfig::default()
        })
        .unwrap();
        assert_eq!(with.roots().len(), bundled.roots().len() + 1);
        assert_eq!(with.extra().len(), 1);
        // The certificates are the roots, one for one, the CA file's last.
        assert_eq!(bundled.certificates().len(), bundled.roots().len());
        assert_eq!(with.certificates().len(), with.roots().len());
        assert_eq!(with.certificates().last(), Some(&with.extra()[0]));
    }

    #[test]
    fn a_ca_file_that_is_not_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("missing.pem", None),
            ("empty.pem", Some("")),
            ("junk.pem", Some("not a certificate\n")),
            (
                "broken.pem",
                Some("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n"),
            ),
        ];
        for (name, content) in cases {
            let file = dir.path().join(name);
            if let Some(content) = content {
                std::fs::write(&file, content).unwrap();
            }
            let e = Trust::load(&TlsConfig {
                ca_file: Some(file),
                ..TlsConfig::default()
            })
            .unwrap_err();
            assert_eq!(e.key, "tls.ca_file", "{name}: {e}");
            assert!(e.to_string().contains(name), "{e}");
        }
    }
}

/// Who a caller's TLS client certificate says it is: its subject
/// alternative names (URIs such as `spiffe://…`, and DNS names), as the
/// TLS listener found them in the certificate it verified. Each request of
/// the connection carries it as an extension.
#[derive(Clone, Debug, Default)]
pub struct PeerIdentity {
    pub sans: Arc<[String]>,
}
