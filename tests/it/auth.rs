//! Caller authentication for a shared gateway.

use crate::support;

use http::Request;
use http_body_util::Full;
use pandagate::config::ClientConfig;
use support::client::Answer;
use support::gateway::TestGateway;
use support::*;
use wiremock::ResponseTemplate;

const TOKEN: &str = "caller-token-orders-never-log";

fn shared(upstream: &str) -> pandagate::config::Config {
    let mut c = config(upstream);
    c.clients = vec![ClientConfig {
        name: "orders-svc".into(),
        token_file: Some(token_file().into()),
        profiles: vec!["default".into()],
        ..ClientConfig::default()
    }];
    c
}

fn token_file() -> String {
    let path = std::env::temp_dir().join(format!("pandagate-token-{}", std::process::id()));
    std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
    path.to_string_lossy().into_owned()
}

async fn call(gw: &TestGateway, authorization: Option<&str>, profile: Option<&str>) -> Answer {
    let mut req = Request::get(gw.url("/open/product/get"));
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    if let Some(p) = profile {
        req = req.header("x-pandagate-profile", p);
    }
    send(req.body(Full::default()).unwrap()).await
}

#[tokio::test]
async fn bearer_tokens_decide_who_may_call_and_with_which_profile() {
    let upstream = upstream_answering(
        ResponseTemplate::new(200).set_body_raw(provider_body("r", 200, "ok"), "application/json"),
    )
    .await;
    let gw = spawn_gateway(shared(&upstream.uri())).await;

    call(&gw, None, None).await.assert_gateway_envelope(401);
    call(&gw, Some("Bearer wrong-token"), None)
        .await
        .assert_gateway_envelope(401);
    call(&gw, Some(TOKEN), None)
        .await
        .assert_gateway_envelope(401);
    assert!(upstream.received_requests().await.unwrap().is_empty());

    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(call(&gw, Some(&bearer), None).await.status, 200);
    // "ops" is selectable, but this client may only use "default".
    call(&gw, Some(&bearer), Some("ops"))
        .await
        .assert_gateway_envelope(403);

    let received = upstream.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    assert!(
        received[0].headers.get("authorization").is_none(),
        "never forwarded"
    );
    assert_eq!(received[0].headers["access-key"], ACCESS_KEY);

    let log = gw.access_log_of(5).await;
    assert_eq!(log.len(), 5);
    assert_eq!(log[0]["error"], "unauthenticated");
    assert!(log[0]["client"].is_null());
    assert_eq!(log[3]["client"], "orders-svc");
    assert_eq!(log[3]["status"], 200);
    assert_eq!(log[4]["error"], "profile_not_selectable");
    let all = serde_json::to_string(&log).unwrap();
    assert!(
        !all.contains(TOKEN) && !all.contains("wrong-token"),
        "tokens never logged"
    );
    gw.stop().await;
}

#[test]
fn refuses_to_serve_other_hosts_without_clients_unless_told_to() {
    let mut c = config("http://127.0.0.1:9");
    c.server.listen = "0.0.0.0:8080".parse().unwrap();
    let e = c.validate().unwrap_err();
    assert_eq!(e.key, "server.listen");
    c.allow_unauthenticated = true;
    assert!(c.validate().is_ok());
    c.allow_unauthenticated = false;
    c.clients = vec![ClientConfig {
        name: "a".into(),
        token_sha256: Some(
            "4f66a4283f8bc9768c3cb97fd06d267b79315aee941c9c1727b9354509242ffe".into(),
        ),
        profiles: vec!["default".into()],
        ..ClientConfig::default()
    }];
    assert!(c.validate().is_ok());
    c.clients[0].profiles = vec!["nope".into()];
    assert_eq!(c.validate().unwrap_err().key, "clients[0].profiles");
}
