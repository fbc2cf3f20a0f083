//! `pandagate demo`: the sandbox provider and a gateway in front of it, in one
//! process, and a few representative calls through both.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use crate::config::{self, Config, LogFormat, ProfileConfig};
use crate::gateway::{Gateway, Lasting};
use crate::net::server::{self, ServerOptions};
use crate::observe::access_log::AccessLog;
use crate::pandapon::envelope;
use crate::pandapon::sandbox::{DEMO_ACCESS_KEY, DEMO_SECRET, DEMO_USER_ID, Sandbox};

/// (label, method, path and query, JSON body)
const CALLS: [(&str, Method, &str, &str); 3] = [
    (
        "Taobao product read",
        Method::GET,
        "/open/product/get?itemId=652874751412",
        "",
    ),
    (
        "1688 keyword search",
        Method::POST,
        "/alibaba/product/keywords/query",
        r#"{"keyword":"mug","beginPage":1,"pageSize":2}"#,
    ),
    (
        "1688 order create",
        Method::POST,
        "/alibaba/order/create",
        r#"{"flow":"general","addressParam":{"fullName":"Demo Buyer"},"cargoParamList":[{"offerId":610947572360,"quantity":2}]}"#,
    ),
];

type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// Each of [`CALLS`] through the gateway at `gateway`: its label, whether
/// it succeeded (HTTP 2xx and envelope `code` 200), and what came back.
async fn make_calls(
    gateway: std::net::SocketAddr,
) -> Result<Vec<(&'static str, bool, String)>, DemoError> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut outcomes = Vec::new();
    for (label, method, target, body) in CALLS {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{gateway}{target}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))?;
        let outcome = match client.request(req).await {
            Ok(resp) => {
                let status = resp.status();
                let body = resp.into_body().collect().await?.to_bytes();
                let found = envelope::inspect(&body);
                let ok = status.is_success() && found.code == Some(200.into());
                (
                    label,
                    ok,
                    format!("HTTP {status}, code {:?}, msg {:?}", found.code, found.msg),
                )
            }
            Err(e) => (label, false, format!("request failed: {e}")),
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Runs the demo; `Ok(true)` when every call succeeded.
pub async fn run(format: LogFormat) -> Result<bool, DemoError> {
    let (stop, stopped) = watch::channel(false);
    let until_stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let opts = ServerOptions::from(&config::ServerConfig::default());

    let sandbox = Arc::new(Sandbox::demo());
    let sandbox_listener = server::bind(([127, 0, 0, 1], 0).into(), "sandbox").await?;
    let sandbox_addr = sandbox_listener.local_addr()?;
    let sandbox_task = tokio::spawn(server::serve(
        sandbox_listener,
        move |req| {
            let sandbox = sandbox.clone();
            async move { sandbox.handle(req).await }
        },
        opts.clone(),
        until_stopped(stopped.clone()),
    ));

    let mut config = Config::default();
    config.server.listen = ([127, 0, 0, 1], 0).into();
    config.upstream.url = format!("http://{sandbox_addr}");
    config.profiles = vec![ProfileConfig {
        name: config::ENV_PROFILE.into(),
        access_key: Some(DEMO_ACCESS_KEY.into()),
        secret_env: Some("PANDAGATE_DEMO_SECRET".into()),
        user_id: Some(DEMO_USER_ID.into()),
        ..ProfileConfig::default()
    }];
    let demo_env = |name: &str| (name == "PANDAGATE_DEMO_SECRET").then(|| DEMO_SECRET.to_owned());
    let loaded = crate::policy::loaded::resolve(config, &demo_env)?;
    let (log, _writer) = AccessLog::spawn(format, Box::new(std::io::stdout()));
    let gateway = Arc::new(Gateway::new(&loaded, Lasting::open(&loaded, log.clone())?)?);
    let gateway_listener = server::bind(loaded.config.server.listen, "gateway").await?;
    let gateway_addr = gateway_listener.local_addr()?;
    let gateway_task = tokio::spawn(server::serve(
        gateway_listener,
        move |req| {
            let gateway = gateway.clone();
            async move { gateway.handle(req).await }
        },
        opts,
        until_stopped(stopped),
    ));

    let outcomes = make_calls(gateway_addr).await?;
    log.flush();

    let passed = outcomes.iter().filter(|o| o.1).count();
    println!("demo: sandbox provider on {sandbox_addr}, gateway on {gateway_addr}");
    for (label, ok, detail) in &outcomes {
        println!(
            "demo: {} {label}: {detail}",
            if *ok { "ok  " } else { "FAIL" }
        );
    }
    println!("demo: {passed} of {} calls succeeded", outcomes.len());

    let _ = stop.send(true);
    let _ = tokio::join!(sandbox_task, gateway_task);
    Ok(passed == outcomes.len())
}
