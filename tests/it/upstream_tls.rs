//! The provider over real TLS: trusted through `tls.ca_file`, calls are
//! signed and answered on one kept-alive connection; untrusted (another CA,
//! bundled roots only, another name, out of date), every call is a 502
//! `upstream_tls` naming the host and the reason, nothing reaches the
//! provider's HTTP layer, and the failure is logged once.

use crate::support;

use support::finished::finish;
use support::provider::expected_signature;
use support::provider_tls::TlsServer;
use support::tls::TestCa;
use support::tls::self_signed;
use support::*;

const CALLS: usize = 5;

/// Checks that `seen` carries a valid signature of the default profile.
fn assert_signed(seen: &support::provider_tls::Seen) {
    assert_eq!(seen.header("access-key"), ACCESS_KEY);
    let expected = expected_signature(
        ACCESS_KEY,
        seen.header("timestamp"),
        seen.header("nonce-str"),
        SECRET,
    );
    assert_eq!(seen.header("signature"), expected, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_calls_reach_a_provider_trusted_through_ca_file_over_one_connection() {
    let ca = TestCa::new();
    let provider = TlsServer::provider(&ca.server("provider")).await;
    let mut cfg = config(&provider.url());
    cfg.tls.ca_file = Some(ca.ca_file.clone());
    let gw = spawn_gateway(cfg).await;

    for i in 0..CALLS {
        let answer = get(&gw.url(&format!("/open/product/get?itemId={i}"))).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        assert_eq!(answer.json()["requestId"], "tls-provider-1");
    }

    let seen = provider.requests();
    assert_eq!(seen.len(), CALLS);
    for (i, s) in seen.iter().enumerate() {
        assert_eq!(s.sni.as_deref(), Some("localhost"), "SNI is the URL's host");
        assert_eq!(s.host().as_deref(), Some(&*provider.authority()));
        assert_eq!(s.uri.path(), "/open/product/get");
        assert_eq!(s.uri.query(), Some(&*format!("itemId={i}")));
        assert_signed(s);
    }
    // Kept alive and reused: one handshake for every call.
    assert_eq!(provider.handshakes(), 1, "handshakes for {CALLS} calls");
    assert_eq!(provider.accepted(), 1);
    gw.stop().await;
}

/// The provider's ALPN answer decides the protocol: HTTP/2 when it offers
/// it (every call on the one connection, however many at once), HTTP/1.1
/// otherwise (a connection per concurrent call, kept for the next ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_s_alpn_choice_decides_http2_or_http1_and_connections_are_kept() {
    let ca = TestCa::new();
    for (alpn, version, connections) in [
        (&["h2", "http/1.1"][..], http::Version::HTTP_2, 1),
        (&["http/1.1"][..], http::Version::HTTP_11, 4),
    ] {
        let provider = TlsServer::provider_offering(&ca.server("provider"), alpn).await;
        let mut cfg = config(&provider.url());
        cfg.tls.ca_file = Some(ca.ca_file.clone());
        let gw = spawn_gateway(cfg).await;
        let one = get(&gw.url("/open/product/get?itemId=0")).await;
        assert_eq!(one.status, 200, "{:?}", one.body);
        let calls: Vec<_> = (1..=4)
            .map(|i| {
                let url = gw.url(&format!("/open/product/get?itemId={i}"));
                tokio::spawn(async move { get(&url).await.status })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap(), 200);
        }
        for i in 5..9 {
            let url = gw.url(&format!("/open/product/get?itemId={i}"));
            assert_eq!(get(&url).await.status, 200);
        }
        let seen = provider.requests();
        assert_eq!(seen.len(), 9);
        assert!(
            seen.iter().all(|s| s.version == version),
            "{alpn:?}: {seen:?}"
        );
        seen.iter().for_each(assert_signed);
        let accepted = provider.accepted();
        assert!(
            (1..=connections).contains(&accepted),
            "{alpn:?}: {accepted} connections for 9 calls, 4 of them at once"
        );
        gw.stop().await;
    }
}

/// A gateway for `provider` trusting `ca_file` (or the bundled roots
/// alone), and the envelope its calls get: each a 502 `upstream_tls`
/// naming the host, with one handshake begun per call.
async fn untrusted(provider: &TlsServer, ca_file: Option<std::path::PathBuf>, reason: &str) {
    let mut cfg = config(&provider.url());
    cfg.tls.ca_file = ca_file;
    let gw = spawn_gateway(cfg).await;
    let before = provider.accepted();
    for _ in 0..3 {
        // A read with attempts to spare: a connect failure would be retried.
        let answer = get(&gw.url("/open/product/get?itemId=1")).await;
        let v = answer.assert_gateway_envelope(502);
        assert_eq!(v["error"], "upstream_tls", "{v}");
        let msg = v["msg"].as_str().unwrap();
        assert!(msg.contains(&provider.authority()), "{msg}");
        assert!(msg.contains(reason), "{msg}");
        assert!(msg.contains("nothing was sent"), "{msg}");
    }
    let lines = gw.access_log_of(3).await;
    for line in &lines {
        assert_eq!(line["error"], "upstream_tls", "{line}");
        assert_eq!(line["attempts"], 1, "not retried: {line}");
    }
    assert_eq!(
        provider.accepted() - before,
        3,
        "one handshake begun per call"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_certificate_from_an_untrusted_ca_is_a_502_upstream_tls_that_sends_nothing() {
    let ca = TestCa::new();
    let other = TestCa::named("another test CA");
    let provider = TlsServer::provider(&ca.server("provider")).await;
    let unknown = "issued by a CA the gateway does not trust";
    // Bundled public roots only.
    untrusted(&provider, None, unknown).await;
    // Another CA's certificate in tls.ca_file.
    untrusted(&provider, Some(other.ca_file.clone()), unknown).await;
    assert!(provider.requests().is_empty(), "nothing reached HTTP");
    assert_eq!(provider.handshakes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_or_out_of_date_is_named_in_the_502() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = self_signed(dir.path(), "elsewhere.test", false);
    let provider = TlsServer::provider(&elsewhere).await;
    untrusted(
        &provider,
        Some(elsewhere.cert.clone()),
        "not valid for that host name",
    )
    .await;
    let expired = self_signed(dir.path(), "localhost", true);
    let provider = TlsServer::provider(&expired).await;
    untrusted(&provider, Some(expired.cert.clone()), "has expired").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_failure_is_logged_once_for_many_calls_and_never_with_a_secret() {
    let ca = TestCa::new();
    let provider = TlsServer::provider(&ca.server("provider")).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pandagate.toml");
    // No tls.ca_file: the bundled roots do not know the test CA.
    std::fs::write(&path, format!("[upstream]\nurl = \"{}\"\n", provider.url())).unwrap();
    let gw = launch(
        &["--config", path.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", ACCESS_KEY),
            ("PANDAPON_ACCESS_SECRET", SECRET),
        ],
    )
    .await;
    for _ in 0..CALLS {
        let answer = get(&format!("http://{}/open/product/get?itemId=1", gw.gateway)).await;
        assert_eq!(answer.assert_gateway_envelope(502)["error"], "upstream_tls");
    }
    let finished = finish(gw).await;
    let told = finished.messages_with("TLS with the provider");
    assert_eq!(
        told.len(),
        1,
        "logged once for {CALLS} calls:\n{}",
        finished.stderr
    );
    assert_eq!(told[0]["level"], "WARN");
    assert_eq!(told[0]["host"], provider.authority());
    assert_eq!(told[0]["reason"], "unknown_ca");
    assert!(!finished.stderr.contains(SECRET));
    assert!(provider.requests().is_empty());
    assert_eq!(provider.accepted(), CALLS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_ends_is_a_connect_failure_within_connect_timeout() {
    // Accepts connections and never answers a ClientHello.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            open.push(tcp);
        }
    });
    let mut cfg = config(&format!("https://localhost:{port}"));
    cfg.upstream.connect_timeout_ms = 200;
    let gw = spawn_gateway(cfg).await;
    let started = std::time::Instant::now();
    // A write: were the handshake counted against the attempt's timeout,
    // it would be a 504 after request_timeout_ms (5 s), never retried.
    let answer = send(
        http::Request::post(gw.url("/open/cart/add"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap(),
    )
    .await;
    let elapsed = started.elapsed();
    assert_eq!(
        answer.assert_gateway_envelope(502)["error"],
        "upstream_connect"
    );
    assert!(elapsed < std::time::Duration::from_secs(3), "{elapsed:?}");
    let line = &gw.access_log_of(1).await[0];
    assert_eq!(line["attempts"], 3, "nothing was sent: retried {line}");
    held.abort();
    gw.stop().await;
}
