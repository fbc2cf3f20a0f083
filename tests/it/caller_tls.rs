//! TLS for callers: the traffic listener serves HTTPS (HTTP/1.1 and h2 by
//! ALPN) with a certificate it re-reads when its files change, and with a
//! client CA it asks callers for a certificate, whose names identify
//! `[[clients]]` entries.

use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pandagate::config::{ClientConfig, Config};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::binary::launch_with_callback_listener;
use support::client::raw_exchange;
use support::provider::signed_push;
use support::tls::{Issued, TestCa};
use support::*;
use wiremock::ResponseTemplate;

fn provider_ok() -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_raw(provider_body("prov-tls", 200, "ok"), "application/json")
}

fn tls_config(upstream: &str, server: &Issued) -> Config {
    let mut c = config(upstream);
    c.server.tls_cert_file = Some(server.cert.clone());
    c.server.tls_key_file = Some(server.key.clone());
    c
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// A client config trusting `ca_file`, with `alpn`, presenting `identity`.
fn client_tls(ca_file: &Path, alpn: &[&[u8]], identity: Option<&Issued>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let certs = CertificateDer::pem_file_iter(&id.cert)
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let key = PrivateKeyDer::from_pem_file(&id.key).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// One GET over HTTPS to the gateway at `port`, as `localhost`.
async fn get_tls(
    port: u16,
    path: &str,
    tls: rustls::ClientConfig,
    bearer: Option<&str>,
) -> Result<(u16, Version, Bytes), String> {
    let mut req = Request::get(format!("https://localhost:{port}{path}"));
    if let Some(token) = bearer {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    send_tls(req.body(Full::default()).unwrap(), tls).await
}

/// `req` over HTTPS; ALPN offers h2 and http/1.1, or, when `tls` offers
/// only http/1.1, nothing (HTTP/1.1).
async fn send_tls(
    req: Request<Full<Bytes>>,
    mut tls: rustls::ClientConfig,
) -> Result<(u16, Version, Bytes), String> {
    let http1_only = tls.alpn_protocols == [b"http/1.1".to_vec()];
    // The connector sets ALPN itself.
    tls.alpn_protocols.clear();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let https = if http1_only {
        builder.enable_http1().build()
    } else {
        builder.enable_http1().enable_http2().build()
    };
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(https);
    let answer = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let (status, version) = (answer.status().as_u16(), answer.version());
    let body = answer.into_body().collect().await.unwrap().to_bytes();
    Ok((status, version, body))
}

/// The leaf certificate the server at `port` presents.
async fn served_certificate(port: u16, ca_file: &Path) -> Vec<u8> {
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_tls(ca_file, &[b"http/1.1"], None)));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn callers_reach_the_gateway_over_tls_with_http1_or_h2() {
    let upstream = upstream_answering(provider_ok()).await;
    let ca = TestCa::new();
    let server = ca.server("gateway");
    let gw = spawn_gateway(tls_config(&upstream.uri(), &server)).await;
    let port = gw.addr.port();
    for (alpn, version) in [
        (&[b"h2".as_slice(), b"http/1.1"][..], Version::HTTP_2),
        (&[b"http/1.1".as_slice()][..], Version::HTTP_11),
    ] {
        let (status, got, body) = get_tls(
            port,
            "/open/product/get?itemId=1",
            client_tls(&ca.ca_file, alpn, None),
            None,
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        assert_eq!(got, version);
        assert!(String::from_utf8_lossy(&body).contains("prov-tls"));
    }
    // Plain HTTP on the TLS port gets no answer.
    let plain = raw_exchange(
        gw.addr,
        b"GET /open/product/get HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(
        !plain.starts_with("HTTP/1.1 200"),
        "plain HTTP is not served: {plain}"
    );
    // A caller that does not trust the gateway's CA does not connect.
    let other = TestCa::named("another CA");
    let refused = get_tls(
        port,
        "/open/product/get",
        client_tls(&other.ca_file, &[b"http/1.1"], None),
        None,
    )
    .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(upstream.received_requests().await.unwrap().len(), 2);
    gw.stop().await;
}

/// Replacing the certificate files: new connections get the new
/// certificate, without a restart; a broken pair is not taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_certificate_is_served_to_new_connections() {
    let upstream = upstream_answering(provider_ok()).await;
    let ca = TestCa::new();
    let first = ca.server("first");
    let second = ca.server("second");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let config = dir.path().join("pandagate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nsecret_poll_ms = 100\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n\
             [tls]\nca_file = \"{}\"\n",
            cert.display(),
            key.display(),
            ca.ca_file.display()
        ),
    )
    .unwrap();
    let gw = launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", ACCESS_KEY),
            ("PANDAPON_ACCESS_SECRET", SECRET),
            ("PANDAGATE_UPSTREAM", &upstream.uri()),
        ],
    )
    .await;
    let port: u16 = gw.gateway.rsplit(':').next().unwrap().parse().unwrap();
    let pem = |p: &Path| CertificateDer::from_pem_file(p).unwrap().to_vec();
    assert_eq!(
        served_certificate(port, &ca.ca_file).await,
        pem(&first.cert)
    );

    // A key that is not the certificate's: the running pair stays.
    std::fs::copy(&second.cert, &cert).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        served_certificate(port, &ca.ca_file).await,
        pem(&first.cert)
    );
    // The pair complete: served from the next handshake on.
    std::fs::copy(&second.key, &key).unwrap();
    let mut served = Vec::new();
    for _ in 0..50 {
        served = served_certificate(port, &ca.ca_file).await;
        if served == pem(&second.cert) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        served,
        pem(&second.cert),
        "the new certificate within 2.5 s"
    );
    let (status, _, _) = get_tls(
        port,
        "/open/product/get",
        client_tls(&ca.ca_file, &[b"h2"], None),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
}

/// The callback listener serves TLS with the same certificate (HTTP/1.1
/// only, and no client certificate asked: the provider has none).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_arrive_over_tls_on_the_callback_listener() {
    let ca = TestCa::new();
    let server = ca.server("gateway");
    let dir = tempfile::tempdir().unwrap();
    let tls = format!(
        "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\ntls_client_ca_file = \"{}\"",
        server.cert.display(),
        server.key.display(),
        ca.ca_file.display()
    );
    let (_gw, callbacks) = launch_with_callback_listener(
        dir.path(),
        "http://127.0.0.1:9",
        &format!("{tls}\n[[clients]]\nname = \"orders\"\ncert_san = \"spiffe://corp.test/orders\"\nprofiles = [\"default\"]"),
        &[
            ("PANDAPON_ACCESS_KEY", "ak-tls"),
            ("PANDAPON_ACCESS_SECRET", "sk-tls-push"),
        ],
    )
    .await;
    let (body, signature) = signed_push("sk-tls-push", "T1");
    let push = Request::post(format!(
        "https://localhost:{}/callbacks/pandapon",
        callbacks.port()
    ))
    .header("authorization", signature)
    .body(Full::new(Bytes::from(body)))
    .unwrap();
    let (status, version, _) = send_tls(push, client_tls(&ca.ca_file, &[b"h2", b"http/1.1"], None))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        version,
        Version::HTTP_11,
        "the callback listener speaks HTTP/1.1"
    );
}

fn client(name: &str, cert_san: Option<&str>, token_env: Option<&str>) -> ClientConfig {
    ClientConfig {
        name: name.into(),
        cert_san: cert_san.map(Into::into),
        token_env: token_env.map(Into::into),
        profiles: vec!["default".into()],
        ..ClientConfig::default()
    }
}

/// With a client CA, a caller must present a certificate it signed; a
/// `[[clients]]` entry with `cert_san` is the caller whose certificate
/// names it, and a bearer token still names the others.
#[tokio::test]
async fn client_certificates_identify_clients() {
    let upstream = upstream_answering(provider_ok()).await;
    let ca = TestCa::new();
    let server = ca.server("gateway");
    let mut c = tls_config(&upstream.uri(), &server);
    c.server.tls_client_ca_file = Some(ca.ca_file.clone());
    c.clients = vec![
        client("orders", Some("spiffe://corp.test/ns/shop/sa/orders"), None),
        client("dns-named", Some("billing.corp.test"), None),
        client("by-token", None, Some("TEST_SECRET")),
    ];
    let gw = spawn_gateway(c).await;
    let port = gw.addr.port();
    let orders = ca.client("orders", &["spiffe://corp.test/ns/shop/sa/orders"], &[]);
    let billing = ca.client("billing", &[], &["billing.corp.test"]);
    let stranger = ca.client("stranger", &["spiffe://corp.test/ns/shop/sa/other"], &[]);
    let outsider = TestCa::named("outside CA");
    let forged = outsider.client("forged", &["spiffe://corp.test/ns/shop/sa/orders"], &[]);

    let call = |identity: Option<&Issued>, bearer: Option<&'static str>| {
        let tls = client_tls(&ca.ca_file, &[b"h2", b"http/1.1"], identity);
        async move {
            get_tls(port, "/open/product/get", tls, bearer)
                .await
                .map(|(status, _, _)| status)
        }
    };
    assert_eq!(call(Some(&orders), None).await, Ok(200));
    assert_eq!(call(Some(&billing), None).await, Ok(200));
    assert_eq!(call(Some(&stranger), None).await, Ok(401));
    assert_eq!(call(Some(&stranger), Some(SECRET)).await, Ok(200));
    assert!(
        call(None, Some(SECRET)).await.is_err(),
        "no certificate: no handshake"
    );
    assert!(
        call(Some(&forged), None).await.is_err(),
        "another CA's certificate"
    );
    let log = gw.access_log_of(4).await;
    let clients: Vec<&str> = log
        .iter()
        .map(|l| l["client"].as_str().unwrap_or("-"))
        .collect();
    assert_eq!(clients, ["orders", "dns-named", "-", "by-token"]);
    assert_eq!(upstream.received_requests().await.unwrap().len(), 3);
    gw.stop().await;
}

#[test]
fn tls_settings_that_cannot_work_are_refused() {
    let ca = TestCa::new();
    let server = ca.server("gateway");
    let mut c = config("http://127.0.0.1:1");
    c.server.tls_cert_file = Some(server.cert.clone());
    assert_eq!(c.validate().unwrap_err().key, "server.tls_key_file");
    let mut c = config("http://127.0.0.1:1");
    c.server.tls_client_ca_file = Some(ca.ca_file.clone());
    assert_eq!(c.validate().unwrap_err().key, "server.tls_client_ca_file");
    let mut c = config("http://127.0.0.1:1");
    c.clients = vec![client("orders", Some("spiffe://x/y"), None)];
    assert_eq!(c.validate().unwrap_err().key, "clients[0].cert_san");
    // A key that is not the certificate's, at start: named.
    let other = ca.server("other");
    let mut c = config("http://127.0.0.1:1");
    c.server.tls_cert_file = Some(server.cert.clone());
    c.server.tls_key_file = Some(other.key.clone());
    let env = |name: &str| name.starts_with("TEST_").then(|| "x".to_owned());
    let e = pandagate::loaded::resolve(c, &env).unwrap_err();
    assert_eq!(e.key, "server.tls_key_file", "{e}");
}
