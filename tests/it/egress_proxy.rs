//! Through a real egress proxy (Debian's tinyproxy): a `CONNECT` tunnel to
//! an HTTPS provider, with TLS to the provider inside it; the proxy from
//! `upstream.proxy` or from `HTTPS_PROXY` in the environment the config
//! reads; `NO_PROXY` going around it; basic credentials that let the
//! gateway through and never show; absolute-form requests to an `http://`
//! provider.

use crate::support;

use support::binary::launch_stdout_unread;
use support::finished::watch;
use support::gateway::{TestGateway, spawn_gateway_with_env};
use support::provider_tls::TlsServer;
use support::tinyproxy::Tinyproxy;
use support::tls::TestCa;
use support::*;
use wiremock::ResponseTemplate;

const PROXY_USER: &str = "gw-egress";
const PROXY_PASSWORD: &str = "pr0xy-pw-never-log-me";
/// base64 of `PROXY_USER:PROXY_PASSWORD`: what `Proxy-Authorization` carries.
const PROXY_BASIC: &str = "Z3ctZWdyZXNzOnByMHh5LXB3LW5ldmVyLWxvZy1tZQ==";

/// Three calls, each answered 200 by the provider.
async fn three_calls(gw: &TestGateway) {
    for i in 0..3 {
        let answer = get(&gw.url(&format!("/open/product/get?itemId={i}"))).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_an_https_provider_go_through_one_connect_tunnel_with_tls_inside() {
    let ca = TestCa::new();
    let provider = TlsServer::provider(&ca.server("provider")).await;
    let proxy = Tinyproxy::start(&[provider.addr.port()], None);
    let mut cfg = config(&provider.url());
    cfg.tls.ca_file = Some(ca.ca_file.clone());
    cfg.upstream.proxy = Some(proxy.url());
    let gw = spawn_gateway(cfg).await;
    three_calls(&gw).await;
    gw.stop().await;

    proxy.requests_of(1).await;
    assert_eq!(
        proxy.connects(),
        vec![provider.authority()],
        "one tunnel, kept alive:\n{}",
        proxy.log()
    );
    let seen = provider.requests();
    assert_eq!(seen.len(), 3);
    for s in &seen {
        // The TLS inside the tunnel is the provider's, by name.
        assert_eq!(s.sni.as_deref(), Some("localhost"));
        assert_eq!(s.host().as_deref(), Some(&*provider.authority()));
        assert!(!s.header("signature").is_empty());
    }
    assert_eq!(provider.handshakes(), 1);

    // Through the tunnel, an untrusted certificate is still a 502 that
    // sends nothing.
    let mut cfg = config(&provider.url());
    cfg.upstream.proxy = Some(proxy.url());
    let gw = spawn_gateway(cfg).await;
    let answer = get(&gw.url("/open/product/get?itemId=9")).await;
    assert_eq!(answer.assert_gateway_envelope(502)["error"], "upstream_tls");
    assert_eq!(provider.requests().len(), 3, "nothing more reached HTTP");
    proxy.requests_of(2).await;
    assert_eq!(proxy.connects().len(), 2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_from_the_environment_is_used_and_no_proxy_goes_around_it() {
    let ca = TestCa::new();
    let provider = TlsServer::provider(&ca.server("provider")).await;
    let proxy = Tinyproxy::start(&[provider.addr.port()], None);
    let mut cfg = config(&provider.url());
    cfg.tls.ca_file = Some(ca.ca_file.clone());

    let url = proxy.url();
    let gw = spawn_gateway_with_env(cfg.clone(), &[("HTTPS_PROXY", url.as_str())]).await;
    three_calls(&gw).await;
    gw.stop().await;
    proxy.requests_of(1).await;
    assert_eq!(
        proxy.connects(),
        vec![provider.authority()],
        "{}",
        proxy.log()
    );

    // With the proxy gone, only a gateway going around it is answered.
    drop(proxy);
    let env = [
        ("https_proxy", &*url),
        ("NO_PROXY", "example.test, localhost"),
    ];
    let gw = spawn_gateway_with_env(cfg.clone(), &env).await;
    three_calls(&gw).await;
    gw.stop().await;
    assert_eq!(provider.requests().len(), 6);
    let gw = spawn_gateway_with_env(cfg, &[("https_proxy", &*url)]).await;
    let answer = get(&gw.url("/open/product/get?itemId=1")).await;
    assert_eq!(
        answer.assert_gateway_envelope(502)["error"],
        "upstream_proxy"
    );
    gw.stop().await;
}

fn write_config(dir: &std::path::Path, provider: &TlsServer, ca: &TestCa, proxy: &str) -> String {
    let path = dir.join("pandagate.toml");
    let proxy = if proxy.is_empty() {
        String::new()
    } else {
        format!("proxy = \"{proxy}\"\n")
    };
    std::fs::write(
        &path,
        format!(
            // One serving thread: one pool, so one tunnel for every call.
            "[server]\nworker_threads = 1\n\n[upstream]\nurl = \"{}\"\n{proxy}\n\
             [tls]\nca_file = \"{}\"\n",
            provider.url(),
            ca.ca_file.display()
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

const CREDS: [(&str, &str); 2] = [
    ("PANDAPON_ACCESS_KEY", ACCESS_KEY),
    ("PANDAPON_ACCESS_SECRET", SECRET),
];

/// `pandagate check` with only `env`: its stdout, which must say it is valid.
fn check(config: &str, env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pandagate"))
        .args(["check", "--config", config])
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(!stderr.contains(PROXY_PASSWORD), "{stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_credentials_let_the_gateway_through_and_never_show() {
    let ca = TestCa::new();
    let provider = TlsServer::provider(&ca.server("provider")).await;
    let proxy = Tinyproxy::start(&[provider.addr.port()], Some((PROXY_USER, PROXY_PASSWORD)));
    let dir = tempfile::tempdir().unwrap();
    let with_credentials = format!(
        "http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{}",
        proxy.port
    );
    let shown = format!("http://{PROXY_USER}:<redacted>@127.0.0.1:{}", proxy.port);

    // Set in the config.
    let config = write_config(dir.path(), &provider, &ca, &with_credentials);
    let checked = check(&config, &CREDS);
    assert!(!checked.contains(PROXY_PASSWORD), "{checked}");
    assert!(
        checked.contains(&format!(
            "# upstream: through the proxy {shown} (from upstream.proxy)"
        )),
        "{checked}"
    );
    assert!(
        checked.contains(&format!("proxy = \"{shown}\"")),
        "{checked}"
    );
    // Every diagnostic there is, read as it comes.
    let mut env = CREDS.to_vec();
    env.push(("RUST_LOG", "trace"));
    let gw = watch(launch_stdout_unread(&["--config", &config], &env).await);
    for _ in 0..3 {
        let answer = get(&format!("http://{}/open/product/get?itemId=1", gw.gateway)).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
    }
    let finished = gw.finish().await;
    assert!(
        finished.diagnostics.len() > 100,
        "traced: {}",
        finished.diagnostics.len()
    );
    proxy.requests_of(1).await;
    assert_eq!(
        proxy.connects(),
        vec![provider.authority()],
        "{}",
        proxy.log()
    );
    for output in [&finished.stderr, &finished.stdout] {
        assert!(!output.contains(PROXY_PASSWORD), "{output}");
        assert!(!output.contains(PROXY_BASIC), "{output}");
    }
    assert_eq!(
        finished.stdout.lines().count(),
        3,
        "the access log was read"
    );

    // From the environment: shown the same way, naming the variable.
    let config = write_config(dir.path(), &provider, &ca, "");
    let mut env = CREDS.to_vec();
    env.push(("HTTPS_PROXY", &with_credentials));
    let checked = check(&config, &env);
    assert!(!checked.contains(PROXY_PASSWORD), "{checked}");
    assert!(
        checked.contains(&format!(
            "# upstream: through the proxy {shown} (from HTTPS_PROXY)"
        )),
        "{checked}"
    );

    // The wrong password: the proxy refuses the tunnel, and the caller
    // gets a 502 that says so, without the password.
    let wrong = format!(
        "http://{PROXY_USER}:not-{PROXY_PASSWORD}@127.0.0.1:{}",
        proxy.port
    );
    let mut cfg = support::config(&provider.url());
    cfg.tls.ca_file = Some(ca.ca_file.clone());
    cfg.upstream.proxy = Some(wrong);
    let gw = spawn_gateway(cfg).await;
    let answer = get(&gw.url("/open/product/get?itemId=1")).await;
    let v = answer.assert_gateway_envelope(502);
    assert_eq!(v["error"], "upstream_proxy", "{v}");
    let msg = v["msg"].as_str().unwrap();
    assert!(msg.contains(&format!("127.0.0.1:{}", proxy.port)), "{msg}");
    // tinyproxy refuses with a 401, which hyper-util's tunnel reports as
    // "unsuccessful" (only a 407 gets words of its own).
    assert!(msg.contains("tunnel error: unsuccessful"), "{msg}");
    assert!(
        !msg.contains(PROXY_PASSWORD) && !msg.contains(PROXY_USER),
        "{msg}"
    );
    let logged = gw.access_log_of(1).await;
    assert!(!logged[0].to_string().contains(PROXY_PASSWORD));
    gw.stop().await;
    assert_eq!(
        provider.requests().len(),
        3,
        "the refused call sent nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_provider_gets_absolute_form_requests_through_the_proxy_with_its_credentials() {
    let provider = upstream_answering(
        ResponseTemplate::new(200).set_body_string(provider_body("r-1", 200, "success")),
    )
    .await;
    let proxy = Tinyproxy::start(&[], Some((PROXY_USER, PROXY_PASSWORD)));
    let url = format!(
        "http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{}",
        proxy.port
    );
    let gw = spawn_gateway_with_env(config(&provider.uri()), &[("http_proxy", url.as_str())]).await;
    three_calls(&gw).await;
    gw.stop().await;

    let requests = proxy.requests_of(3).await;
    let target = format!("GET {}/open/product/get?itemId=0 HTTP/1.1", provider.uri());
    assert_eq!(requests.first(), Some(&target), "{}", proxy.log());
    let got = provider.received_requests().await.unwrap();
    assert_eq!(got.len(), 3);
    for r in &got {
        // Forwarded by the proxy, signed by the gateway.
        let via = r.headers.get("via").and_then(|v| v.to_str().ok());
        assert!(
            via.is_some_and(|v| v.contains("tinyproxy")),
            "{:?}",
            r.headers
        );
        assert!(r.headers.contains_key("signature"));
    }
}
