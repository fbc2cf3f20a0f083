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

use std::collections::HashSet;
use std::error::Error;
use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{CertificateError, RootCertStore};

use crate::base::error::TlsReason;
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
/// use: what [`Loaded`](crate::policy::loaded::Loaded) hands each client, so that every one of
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

/// The TLS failure behind a connection error, if that is what it was: the
/// TLS library's error, found in the error's chain of sources. An
/// `io::Error` hides the error it wraps from `source()` (it skips to that
/// error's own source), so each one is opened as well.
pub fn failure(error: &(dyn Error + 'static)) -> Option<TlsReason> {
    let mut next = Some(error);
    // Bounded: a chain is a few links long; a cycle would be a bug elsewhere.
    for _ in 0..32 {
        let e = next?;
        if let Some(reason) = reason_in(e) {
            return Some(reason);
        }
        next = e.source();
    }
    None
}

/// `e` itself, or the error an `io::Error` wraps (at any depth of
/// `io::Error`s), as a TLS failure.
fn reason_in(mut e: &(dyn Error + 'static)) -> Option<TlsReason> {
    for _ in 0..8 {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(reason_of(tls));
        }
        e = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    }
    None
}

fn reason_of(e: &rustls::Error) -> TlsReason {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => TlsReason::UnknownIssuer,
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsReason::WrongName
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                TlsReason::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                TlsReason::NotYetValid
            }
            CertificateError::Revoked => TlsReason::Revoked,
            _ => TlsReason::BadCertificate,
        },
        E::NoCertificatesPresented => TlsReason::NoCertificate,
        E::AlertReceived(_) => TlsReason::Refused,
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => TlsReason::NotTls,
        _ => TlsReason::Other,
    }
}

/// Most (host, reason) pairs remembered; past it the set starts afresh, so
/// a pair may be told again, but memory stays bounded.
const REMEMBERED: usize = 256;

/// Tells each TLS failure once per host and reason, not once per call: a
/// wrong trust setting fails every call alike, and its cause needs saying
/// once. Each call still carries its own failure (its answer, its
/// access-log line, a delivery's `last_error`).
#[derive(Debug, Default)]
pub struct FailureLog {
    told: Mutex<HashSet<(String, TlsReason)>>,
}

impl FailureLog {
    /// Logs a warning about TLS with `peer` (what the host is to the
    /// gateway: "the provider", "a subscriber") at `host`, the first time
    /// this host fails for this reason. Returns whether it did.
    pub fn tell(&self, peer: &str, host: &str, reason: TlsReason) -> bool {
        let mut told = self.told.lock().expect("not poisoned");
        if told.contains(&(host.to_owned(), reason)) {
            return false;
        }
        if told.len() >= REMEMBERED {
            told.clear();
        }
        told.insert((host.to_owned(), reason));
        drop(told);
        tracing::warn!(
            peer,
            host,
            reason = reason.as_str(),
            "TLS with {peer} at {host} failed: {reason}; every connection fails so until \
             that changes (logged once per host and reason)"
        );
        true
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
    fn a_tls_error_is_found_through_io_errors_and_sources() {
        #[derive(Debug)]
        struct Outer(Box<dyn Error + Send + Sync>);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("client error (Connect)")
            }
        }
        impl Error for Outer {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                Some(&*self.0)
            }
        }
        // As hyper-rustls hands it over: io::Error::other(io::Error(rustls::Error)).
        let wrapped = |e: rustls::Error| {
            Outer(Box::new(std::io::Error::other(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e,
            ))))
        };
        let cases = [
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                TlsReason::UnknownIssuer,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
                TlsReason::WrongName,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                TlsReason::Expired,
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::BadSignature),
                TlsReason::BadCertificate,
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
                TlsReason::Refused,
            ),
            (
                rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
                TlsReason::NotTls,
            ),
        ];
        for (error, reason) in cases {
            assert_eq!(failure(&wrapped(error.clone())), Some(reason), "{error}");
        }
        let refused = Outer(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert_eq!(failure(&refused), None);
    }

    #[test]
    fn a_failure_is_told_once_per_host_and_reason() {
        let log = FailureLog::default();
        assert!(log.tell("the provider", "a:443", TlsReason::UnknownIssuer));
        assert!(!log.tell("the provider", "a:443", TlsReason::UnknownIssuer));
        assert!(log.tell("the provider", "a:443", TlsReason::Expired));
        assert!(log.tell("the provider", "b:443", TlsReason::UnknownIssuer));
        for i in 0..2 * REMEMBERED {
            log.tell("a subscriber", &format!("h{i}"), TlsReason::Other);
        }
        assert!(log.told.lock().unwrap().len() <= REMEMBERED);
    }

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
