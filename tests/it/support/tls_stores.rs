//! The stores and the collector behind TLS, with certificates of a
//! [`TestCa`]: `redis-server` on a TLS port only, PostgreSQL with
//! `ssl = on`, and a TLS listener for an OTLP receiver. Each listens on
//! 127.0.0.1 only and is stopped as its plain counterpart is.

use std::path::Path;
use std::sync::Arc;

use pandagate::config::TlsConfig;
use pandagate::tls::{Trust, WithTrust};

use super::tls::{Issued, TestCa};
use super::{PostgresServer, RedisServer, dead_address};

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

/// A `redis-server` listening only on a TLS port, with `cert`, requiring
/// `password` when one is given.
pub fn redis_tls(ca: &TestCa, cert: &Issued, password: Option<&str>) -> RedisServer {
    let port = dead_address().port().to_string();
    let mut args: Vec<String> = [
        "--port",
        "0",
        "--tls-port",
        &port,
        "--tls-auth-clients",
        "no",
    ]
    .map(str::to_owned)
    .into();
    for (flag, file) in [
        ("--tls-cert-file", &cert.cert),
        ("--tls-key-file", &cert.key),
        ("--tls-ca-cert-file", &ca.ca_file),
    ] {
        args.push(flag.to_owned());
        args.push(file.display().to_string());
    }
    if let Some(password) = password {
        args.extend(["--requirepass".to_owned(), password.to_owned()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    RedisServer::start_with(port.parse().unwrap(), &args)
}

/// The `rediss://` URL of a TLS `redis-server`, with `password` if any.
pub fn rediss_url(server: &RedisServer, password: Option<&str>) -> String {
    match password {
        Some(pw) => format!("rediss://:{pw}@127.0.0.1:{}", server.port),
        None => format!("rediss://127.0.0.1:{}", server.port),
    }
}

/// A PostgreSQL server with `ssl = on` and `cert`. With `tls_only`, a TCP
/// client that does not use TLS is refused (`hostssl` in `pg_hba.conf`).
pub fn postgres_tls(cert: &Issued, tls_only: bool) -> PostgresServer {
    let mut pg = PostgresServer::start();
    pg.stop();
    let data = pg.dir.path().join("data");
    std::fs::copy(&cert.cert, data.join("server.crt")).unwrap();
    std::fs::copy(&cert.key, data.join("server.key")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        data.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    // As root, the server runs as `postgres`, which must own its key.
    let _ = std::process::Command::new("chown")
        .args(["postgres:postgres"])
        .arg(data.join("server.crt"))
        .arg(data.join("server.key"))
        .stderr(std::process::Stdio::null())
        .status();
    let conf = data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    std::fs::write(&conf, text).unwrap();
    if tls_only {
        let hba = data.join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba).unwrap();
        let only_tls: String = text
            .lines()
            .map(|line| match line.strip_prefix("host ") {
                Some(rest) => format!("hostssl {rest}\n"),
                None => format!("{line}\n"),
            })
            .collect();
        std::fs::write(&hba, only_tls).unwrap();
    }
    pg.resume();
    pg
}

/// `pg.url()` with `params` (`sslmode=…`) as its query.
pub fn postgres_url(pg: &PostgresServer, params: &str) -> String {
    if params.is_empty() {
        pg.url()
    } else {
        format!("{}?{params}", pg.url())
    }
}

/// A TLS acceptor serving `cert` (HTTP/1.1 only).
pub fn acceptor(cert: &Issued) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A connection to the Redis at `url` (`rediss://`) trusting `ca_file`,
/// made the gateway's way: for a test to look at what the gateway wrote.
pub fn redis_manager(url: &str, ca_file: &Path) -> redis::aio::ConnectionManager {
    let url = pandagate::config::RedisUrl::parse(url, "test").unwrap();
    pandagate::redis::connect(
        &WithTrust::new(url, trust(Some(ca_file))),
        "test",
        std::time::Duration::from_secs(5),
    )
    .unwrap()
}
