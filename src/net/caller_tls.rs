//! TLS for callers: the traffic and callback listeners' server side.
//!
//! * The certificate chain and key (`server.tls_cert_file`,
//!   `server.tls_key_file`) are read at start and again whenever either
//!   file changes (polled every `server.secret_poll_ms`, like secret
//!   files): new handshakes get the new certificate, connections already
//!   open keep theirs. A pair that does not load is logged and the running
//!   one kept.
//! * ALPN offers `h2` and `http/1.1` (only `http/1.1` where the listener
//!   speaks HTTP/1.1 only); the connection's first bytes still decide, as
//!   on a plain listener.
//! * With `server.tls_client_ca_file`, the traffic listener requires a
//!   client certificate signed by one of its CAs, and each request carries
//!   the certificate's names as a [`PeerIdentity`] for `[[clients]]`
//!   entries with `cert_san`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::config::{ConfigError, ServerConfig};
use crate::net::tls::PeerIdentity;

/// A listener's TLS: what it serves and, maybe, whom it asks for a
/// certificate.
#[derive(Clone)]
pub struct ListenerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// Client certificates are required and verified.
    pub asks_for_certificates: bool,
}

impl fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerTls")
            .field("asks_for_certificates", &self.asks_for_certificates)
            .finish_non_exhaustive()
    }
}

impl ListenerTls {
    pub fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }
}

/// The certificate and key being served, replaced when their files change.
pub struct ServedCertificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: ArcSwap<CertifiedKey>,
    /// The files' modification times and lengths when last loaded.
    seen: std::sync::Mutex<Option<(Stamp, Stamp)>>,
}

type Stamp = (Option<SystemTime>, u64);

impl fmt::Debug for ServedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServedCertificate")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ServedCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok();
    (
        meta.as_ref().and_then(|m| m.modified().ok()),
        meta.map_or(0, |m| m.len()),
    )
}

impl ServedCertificate {
    /// Loads the pair; an error names the key of the file at fault.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<ServedCertificate, ConfigError> {
        let seen = (stamp(cert_file), stamp(key_file));
        let key = certified_key(cert_file, key_file)?;
        Ok(ServedCertificate {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: ArcSwap::from_pointee(key),
            seen: std::sync::Mutex::new(Some(seen)),
        })
    }

    /// Loads the pair again if either file changed since; `Ok(true)` when
    /// the certificate served changed. A pair that does not load leaves
    /// the current one in place.
    pub fn reload_if_changed(&self) -> Result<bool, ConfigError> {
        let now = (stamp(&self.cert_file), stamp(&self.key_file));
        let mut seen = self.seen.lock().expect("not poisoned");
        if seen.as_ref() == Some(&now) {
            return Ok(false);
        }
        let key = certified_key(&self.cert_file, &self.key_file)?;
        *seen = Some(now);
        let changed = key.cert != self.current.load().cert;
        self.current.store(Arc::new(key));
        Ok(changed)
    }

    /// Polls the files every `every`, forever, logging what happens.
    pub async fn watch(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.reload_if_changed() {
                Ok(true) => tracing::info!(
                    cert_file = %self.cert_file.display(),
                    "TLS certificate reloaded: new handshakes get it"
                ),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate not reloaded; the running one stays")
                }
            }
        }
    }
}

fn certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, ConfigError> {
    let certs = read_pem_certs(cert_file, "server.tls_cert_file")?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        ConfigError::new(
            "server.tls_key_file",
            format_args!("{}: not a PEM private key ({e})", key_file.display()),
        )
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| {
        ConfigError::new(
            "server.tls_key_file",
            format_args!("{}: {e}", key_file.display()),
        )
    })?;
    let certified = CertifiedKey::new(certs, signer);
    certified.keys_match().map_err(|_| {
        ConfigError::new(
            "server.tls_key_file",
            format_args!(
                "{} is not the key of the certificate in {}",
                key_file.display(),
                cert_file.display()
            ),
        )
    })?;
    Ok(certified)
}

fn read_pem_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let fail =
        |m: &dyn fmt::Display| ConfigError::new(key, format_args!("{}: {m}", path.display()));
    let pem = std::fs::read(path).map_err(|e| fail(&e))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&format_args!("not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(fail(&"holds no PEM certificate"));
    }
    Ok(certs)
}

/// The TLS of the traffic and the callback listener, when `server` sets a
/// certificate; the certificate they share, to watch.
#[derive(Debug)]
pub struct CallerTls {
    pub traffic: ListenerTls,
    pub callbacks: ListenerTls,
    pub served: Arc<ServedCertificate>,
}

impl CallerTls {
    /// `None` without `server.tls_cert_file`. `http1_callbacks`: the
    /// callback listener speaks HTTP/1.1 only.
    pub fn load(server: &ServerConfig) -> Result<Option<CallerTls>, ConfigError> {
        let (Some(cert), Some(key)) = (&server.tls_cert_file, &server.tls_key_file) else {
            return Ok(None);
        };
        let served = Arc::new(ServedCertificate::load(cert, key)?);
        let verifier = match &server.tls_client_ca_file {
            None => None,
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_pem_certs(path, "server.tls_client_ca_file")? {
                    roots.add(cert).map_err(|e| {
                        ConfigError::new(
                            "server.tls_client_ca_file",
                            format_args!("{}: not a usable CA ({e})", path.display()),
                        )
                    })?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::new(rustls::crypto::ring::default_provider()),
                )
                .build()
                .map_err(|e| {
                    ConfigError::new(
                        "server.tls_client_ca_file",
                        format_args!("{}: {e}", path.display()),
                    )
                })?;
                Some(verifier)
            }
        };
        let config = |verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
                      alpn: &[&[u8]]| {
            let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions");
            let builder = match verifier {
                Some(v) => builder.with_client_cert_verifier(v),
                None => builder.with_no_client_auth(),
            };
            let mut config = builder.with_cert_resolver(served.clone());
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        };
        let asks = verifier.is_some();
        Ok(Some(CallerTls {
            traffic: ListenerTls {
                acceptor: config(verifier, &[b"h2", b"http/1.1"]),
                asks_for_certificates: asks,
            },
            callbacks: ListenerTls {
                acceptor: config(None, &[b"http/1.1"]),
                asks_for_certificates: false,
            },
            served,
        }))
    }
}

/// The names of a verified client certificate: its URI and DNS subject
/// alternative names.
pub fn peer_identity(cert: &CertificateDer<'_>) -> PeerIdentity {
    use x509_parser::extensions::GeneralName;
    let mut sans = Vec::new();
    if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref())
        && let Ok(Some(ext)) = parsed.subject_alternative_name()
    {
        for name in &ext.value.general_names {
            match name {
                GeneralName::URI(uri) => sans.push((*uri).to_owned()),
                GeneralName::DNSName(dns) => sans.push((*dns).to_owned()),
                _ => {}
            }
        }
    }
    PeerIdentity { sans: sans.into() }
}
