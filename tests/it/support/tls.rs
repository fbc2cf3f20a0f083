//! Certificates made at test time: a CA and the server and client
//! certificates it signs, as PEM files in a temporary directory that lives
//! as long as the [`TestCa`]. Nothing here is ever committed. Also:
//! self-signed certificates for the failures a CA-issued one cannot show
//! (another name, out of date), and the gateway's `[tls]` trust built from
//! a CA file, for the stores and clients a test connects itself.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use pandagate::config::TlsConfig;
use pandagate::tls::{Trust, WithTrust};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};

/// A certificate and its key, as files.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A CA of this test's own.
pub struct TestCa {
    dir: tempfile::TempDir,
    /// The CA certificate, PEM: what `tls.ca_file` names.
    pub ca_file: PathBuf,
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    pub fn new() -> TestCa {
        Self::named("pandagate test CA")
    }

    /// A CA whose subject is `name` (two CAs with different names do not
    /// trust each other's certificates).
    pub fn named(name: &str) -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, cert.pem()).unwrap();
        TestCa {
            dir,
            ca_file,
            cert,
            key,
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1, written as
    /// `NAME.pem` and `NAME-key.pem`.
    pub fn server(&self, name: &str) -> Issued {
        self.for_localhost(name, vec![ExtendedKeyUsagePurpose::ServerAuth])
    }

    /// A certificate for `localhost` and 127.0.0.1 that serves and also
    /// connects as a client, as a Redis Cluster node does on its bus.
    pub fn peer(&self, name: &str) -> Issued {
        self.for_localhost(
            name,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
    }

    fn for_localhost(&self, name: &str, usages: Vec<ExtendedKeyUsagePurpose>) -> Issued {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = usages;
        self.issue(name, params)
    }

    /// A server certificate for the DNS names `dns` only, written as
    /// `NAME.pem` and `NAME-key.pem`.
    pub fn server_for(&self, name: &str, dns: &[&str]) -> Issued {
        let names = dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, dns[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(name, params)
    }

    /// A client certificate whose SANs are `uris` (e.g. `spiffe://…`) and
    /// `dns` names.
    pub fn client(&self, name: &str, uris: &[&str], dns: &[&str]) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI((*uri).try_into().unwrap()));
        }
        for name in dns {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into().unwrap()));
        }
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(name, params)
    }

    fn issue(&self, name: &str, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let issued = Issued {
            cert: self.dir.path().join(format!("{name}.pem")),
            key: self.dir.path().join(format!("{name}-key.pem")),
        };
        std::fs::write(&issued.cert, cert.pem()).unwrap();
        std::fs::write(&issued.key, key.serialize_pem()).unwrap();
        issued
    }
}

/// `[tls]` with the bundled roots and `ca_file` (if any).
pub fn trust(ca_file: Option<&Path>) -> Trust {
    Trust::load(&TlsConfig {
        ca_file: ca_file.map(Path::to_owned),
        ..TlsConfig::default()
    })
    .unwrap()
}

/// `target` trusting the default `[tls]`, as `Loaded` hands it out for a
/// config without a `[tls]` section.
pub fn with_default_trust<T>(target: T) -> WithTrust<T> {
    WithTrust::new(target, trust(None))
}

/// A self-signed certificate for `name` (which is its own CA: name its
/// `cert` as `tls.ca_file` to trust it), written into `dir` as
/// `NAME.pem` and `NAME-key.pem`; out of date when `expired`.
pub fn self_signed(dir: &Path, name: &str, expired: bool) -> Issued {
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let issued = Issued {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&issued.cert, cert.pem()).unwrap();
    std::fs::write(&issued.key, key.serialize_pem()).unwrap();
    issued
}
