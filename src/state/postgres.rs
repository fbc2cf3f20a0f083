//! PostgreSQL over TLS: the URL's `sslmode` ([`SslMode`], libpq's
//! meanings) turned into a rustls connector for tokio-postgres that checks
//! what the mode asks for, against the roots of `[tls]`.
//!
//! The connector is `tokio-postgres-rustls`'s, which also gives SCRAM its
//! channel binding; only the certificate checks are ours:
//!
//! | sslmode | TLS | chain to `[tls]` | host name |
//! |---|---|---|---|
//! | `disable` | never | – | – |
//! | `prefer` (default) | if the server offers it | no | no |
//! | `require` | always | when `tls.ca_file` is set | no |
//! | `verify-ca` | always | yes | no |
//! | `verify-full` | always | yes | yes |

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::base::redact;
use crate::config::{PostgresUrl, SslMode};
use crate::net::tls::{Trust, WithTrust};

/// The connector for `url`'s `sslmode`, trusting `url.trust()`. Used with
/// [`PostgresUrl::client_config`], which tells tokio-postgres whether TLS
/// is tried and required; with `disable` it is never called.
pub fn connector(url: &WithTrust<PostgresUrl>) -> MakeRustlsConnect {
    MakeRustlsConnect::new(client_config(url.ssl_mode(), url.trust()))
}

/// `e` with its causes, the URL's password scrubbed: tokio-postgres says
/// only "error performing TLS handshake", and what failed (an untrusted
/// certificate, a name that does not match, a server without TLS) is in
/// the causes.
pub fn describe(e: &(dyn std::error::Error + 'static), url: &PostgresUrl) -> String {
    redact::scrub(&causes(e), url.expose())
}

/// `e`'s text followed by each cause's that it does not already hold.
pub fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        next = cause.source();
    }
    text
}

fn client_config(mode: SslMode, trust: &Trust) -> rustls::ClientConfig {
    let provider = crate::net::tls::provider();
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier(mode, trust, provider))
        .with_no_client_auth()
}

/// What checks the server's certificate in `mode`. `disable` never gets
/// to a handshake; it gets the strictest.
fn verifier(
    mode: SslMode,
    trust: &Trust,
    provider: Arc<CryptoProvider>,
) -> Arc<dyn ServerCertVerifier> {
    let chain = || {
        WebPkiServerVerifier::builder_with_provider(trust.roots(), provider.clone())
            .build()
            .expect("a trust holds at least one root")
    };
    match mode {
        SslMode::VerifyFull | SslMode::Disable => chain(),
        SslMode::VerifyCa => Arc::new(AnyName(chain())),
        SslMode::Require if !trust.extra().is_empty() => Arc::new(AnyName(chain())),
        SslMode::Require | SslMode::Prefer => Arc::new(Unchecked(provider.clone())),
    }
}

/// `verify-ca` (and `require` with a CA file): the chain must lead to a
/// trusted root, for whatever name the certificate is.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`, and `require` without a CA file: encryption only, as libpq
/// does without a root file. The handshake's signatures are still checked
/// (the peer holds the key of the certificate it sent); who it is, is not.
#[derive(Debug)]
struct Unchecked(Arc<CryptoProvider>);

impl ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // A certificate that does not even parse is refused.
        ParsedCertificate::try_from(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsConfig;

    /// A CA, a certificate it signs for `name`, and a trust holding the CA
    /// (as `tls.ca_file`) or not.
    struct Issued {
        chain: CertificateDer<'static>,
        with_ca: Trust,
        without_ca: Trust,
    }

    fn issued(name: &str) -> Issued {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ca.pem");
        std::fs::write(&file, ca.pem()).unwrap();
        Issued {
            chain: leaf.der().clone(),
            with_ca: Trust::load(&TlsConfig {
                ca_file: Some(file),
                ..TlsConfig::default()
            })
            .unwrap(),
            without_ca: Trust::load(&TlsConfig::default()).unwrap(),
        }
    }

    /// Whether a config for `mode` accepts `cert` from a server reached as `host`.
    fn accepts(mode: SslMode, trust: &Trust, cert: &CertificateDer<'_>, host: &str) -> bool {
        let name = ServerName::try_from(host.to_owned()).unwrap();
        verifier(mode, trust, crate::net::tls::provider())
            .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn each_sslmode_checks_what_libpq_checks() {
        let db = issued("db.internal");
        // (mode, trust has the CA, host connected to, accepted)
        let table = [
            (SslMode::VerifyFull, true, "db.internal", true),
            (SslMode::VerifyFull, true, "other.internal", false),
            (SslMode::VerifyFull, false, "db.internal", false),
            (SslMode::VerifyCa, true, "other.internal", true),
            (SslMode::VerifyCa, false, "db.internal", false),
            (SslMode::Require, true, "other.internal", true),
            (SslMode::Require, false, "db.internal", true),
            (SslMode::Prefer, false, "other.internal", true),
        ];
        for (mode, with_ca, host, expected) in table {
            let trust = if with_ca { &db.with_ca } else { &db.without_ca };
            assert_eq!(
                accepts(mode, trust, &db.chain, host),
                expected,
                "{mode:?}, CA trusted: {with_ca}, host {host}"
            );
        }
        // `require` with a CA file checks the chain: a certificate of
        // another CA is refused.
        let other = issued("db.internal");
        assert!(!accepts(
            SslMode::Require,
            &db.with_ca,
            &other.chain,
            "db.internal"
        ));
    }

    #[test]
    fn nothing_unparsable_passes_even_unchecked() {
        let trust = Trust::load(&TlsConfig::default()).unwrap();
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(!accepts(SslMode::Prefer, &trust, &junk, "db.internal"));
    }
}
