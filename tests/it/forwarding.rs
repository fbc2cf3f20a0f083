//! What passes through the gateway, and what never does.

use crate::support;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use support::client::raw_exchange;
use support::gateway::OPS_ACCESS_KEY;
use support::provider::RawUpstream;
use support::*;
use wiremock::matchers::{body_string, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

#[tokio::test]
async fn forwards_method_path_query_and_body_and_returns_the_answer_unchanged() {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/alibaba/order/detail"))
        .and(query_param("orderId", "42"))
        .and(body_string(r#"{"orderId":42}"#))
        .respond_with(
            ResponseTemplate::new(201)
                .insert_header("x-provider-header", "kept")
                .set_body_raw(provider_body("rid-7", 200, "ok"), "application/json"),
        )
        .expect(1)
        .mount(&upstream)
        .await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let req = Request::post(gw.url("/alibaba/order/detail?orderId=42"))
        .header("content-type", "application/json")
        .header("x-custom", "passes")
        .body(Full::new(Bytes::from_static(br#"{"orderId":42}"#)))
        .unwrap();
    let answer = send(req).await;
    assert_eq!(answer.status, 201);
    assert_eq!(answer.headers["x-provider-header"], "kept");
    assert_eq!(answer.headers["content-type"], "application/json");
    assert_eq!(answer.body, provider_body("rid-7", 200, "ok"));
    let r = &upstream.received_requests().await.unwrap()[0];
    assert_eq!(r.headers["x-custom"], "passes");
    assert_eq!(r.headers["content-type"], "application/json");
    gw.stop().await;
    upstream.verify().await;
}

#[tokio::test]
async fn forwards_every_method() {
    let upstream = upstream_answering(ResponseTemplate::new(200)).await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let methods = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
        Method::HEAD,
    ];
    for m in &methods {
        let req = Request::builder()
            .method(m.clone())
            .uri(gw.url("/v2/taobao/order/refund/query?x=1"))
            .body(Full::default())
            .unwrap();
        assert_eq!(send(req).await.status, 200, "{m}");
    }
    let received = upstream.received_requests().await.unwrap();
    let seen: Vec<String> = received.iter().map(|r| r.method.to_string()).collect();
    let sent: Vec<String> = methods.iter().map(|m| m.to_string()).collect();
    assert_eq!(seen, sent);
    assert!(
        received
            .iter()
            .all(|r| r.url.path() == "/v2/taobao/order/refund/query")
    );
    assert!(received.iter().all(|r| r.url.query() == Some("x=1")));
    gw.stop().await;
}

/// `TRACE` and `TRACK` would have the provider (or anything between) echo
/// the request, freshly signed headers included, back to the caller. They
/// and every method outside the standard set get 405 in the envelope, with
/// `Allow`, and are never sent.
#[tokio::test]
async fn echoing_and_unknown_methods_get_405_and_are_never_forwarded() {
    let upstream = RawUpstream::start(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await;
    let gw = spawn_gateway(config(&format!("http://{}", upstream.addr))).await;
    for method in [
        "TRACE", "TRACK", "trace", "DEBUG", "PROPFIND", "LINK", "X-ECHO",
    ] {
        let answer = raw_exchange(
            gw.addr,
            format!("{method} /open/product/get HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 405 "), "{method}: {answer}");
        let head = answer.to_ascii_lowercase();
        assert!(
            head.contains("\r\nallow: get, head, post, put, patch, delete, options\r\n"),
            "{method}: {answer}"
        );
        assert!(
            answer.contains(r#""error":"method_not_allowed""#),
            "{method}: {answer}"
        );
        assert!(
            answer.contains(r#""source":"pandagate""#),
            "{method}: {answer}"
        );
    }
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    let log = gw.access_log_of(7).await;
    assert!(
        log.iter().all(|l| l["status"] == 405 && l["attempts"] == 0),
        "{log:?}"
    );
    gw.stop().await;
}

/// CGI, PHP, WSGI and Rack read `user_id` as `user-id`: no other spelling
/// of a header the gateway owns reaches the provider, so a caller cannot
/// slip a `user-id` past the profile's allow-list, or a key, nonce,
/// signature or control header past the gateway.
#[tokio::test]
async fn other_spellings_of_the_gateways_headers_never_reach_the_provider() {
    let upstream = upstream_answering(ResponseTemplate::new(200)).await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let forged = [
        ("user_id", "99999"),
        ("USER_ID", "99998"),
        ("user.id", "99997"),
        ("access_key", "ak-forged"),
        ("nonce_str", "forged-nonce"),
        ("signature_", "x"),
        ("x_pandagate_profile", "hidden"),
        ("x_request_id", "forged-id"),
        ("transfer_encoding", "chunked"),
        ("proxy_authorization", "Basic Zm9vOmJhcg=="),
    ];
    let mut req = Request::post(gw.url("/alibaba/order/create"))
        .header("x-pandagate-profile", "ops")
        .header("user-id", "22")
        .header("x-custom_header", "kept");
    for (name, value) in forged {
        req = req.header(name, value);
    }
    let answer = send(req.body(Full::default()).unwrap()).await;
    assert_eq!(answer.status, 200);
    let received = upstream.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    let h = &received[0].headers;
    assert_eq!(h.get_all("user-id").iter().collect::<Vec<_>>(), ["22"]);
    assert_eq!(h["access-key"], OPS_ACCESS_KEY);
    for (name, _) in forged {
        let folded = name.to_ascii_lowercase();
        assert!(
            !h.contains_key(folded.as_str()),
            "{name} reached the provider"
        );
    }
    for value in h.values() {
        let v = value.to_str().unwrap_or_default();
        assert!(
            !forged.iter().any(|(_, forged)| v == *forged),
            "a forged value reached the provider: {v}"
        );
    }
    assert_eq!(
        h["x-custom_header"], "kept",
        "headers of the caller's own pass"
    );
    gw.stop().await;
}

#[tokio::test]
async fn drops_hop_by_hop_headers_both_ways_and_sets_host_to_the_upstream() {
    let upstream = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-resp-hop\r\nX-Resp-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Resp-Kept: 1\r\n\r\n{}",
    )
    .await;
    let gw = spawn_gateway(config(&format!("http://{}", upstream.addr))).await;
    let raw = "GET /open/product/get HTTP/1.1\r\nHost: gateway.internal\r\nConnection: x-req-hop\r\nX-Req-Hop: 1\r\n\
         Proxy-Authorization: Basic Zm9vOmJhcg==\r\nTE: trailers\r\nUpgrade: websocket\r\nX-Req-Kept: 1\r\n\r\n";
    let answer = raw_exchange(gw.addr, raw.as_bytes())
        .await
        .to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("x-resp-kept: 1"), "{answer}");
    assert!(!answer.contains("x-resp-hop"), "{answer}");
    assert!(!answer.contains("keep-alive: timeout"), "{answer}");

    let requests = upstream.requests();
    assert_eq!(requests.len(), 1);
    let head = requests[0].to_ascii_lowercase();
    assert!(
        head.contains(&format!("host: {}\r\n", upstream.addr)),
        "{head}"
    );
    assert!(head.contains("x-req-kept: 1"), "{head}");
    for dropped in [
        "x-req-hop",
        "proxy-authorization",
        "te:",
        "upgrade",
        "gateway.internal",
    ] {
        assert!(!head.contains(dropped), "{dropped} forwarded: {head}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn returns_redirects_without_following_them() {
    let upstream = upstream_answering(
        ResponseTemplate::new(302).insert_header("location", "http://127.0.0.1:9/elsewhere"),
    )
    .await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let answer = get(&gw.url("/alibaba/order/pay/url")).await;
    assert_eq!(answer.status, 302);
    assert_eq!(answer.headers["location"], "http://127.0.0.1:9/elsewhere");
    assert_eq!(upstream.received_requests().await.unwrap().len(), 1);
    gw.stop().await;
}

#[tokio::test]
async fn refuses_connect_and_foreign_absolute_targets_without_forwarding() {
    let upstream = upstream_answering(ResponseTemplate::new(200)).await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let attempts = [
        "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        "GET http://evil.example/steal HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for raw in attempts {
        let answer = raw_exchange(gw.addr, raw.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{raw}: {answer}");
        assert!(answer.contains(r#""source":"pandagate""#), "{answer}");
    }
    assert!(upstream.received_requests().await.unwrap().is_empty());
    let log = gw.access_log_of(3).await;
    let errors: Vec<&str> = log.iter().map(|l| l["error"].as_str().unwrap()).collect();
    assert_eq!(
        errors,
        ["connect_method", "foreign_target", "foreign_target"]
    );
    gw.stop().await;
}

#[tokio::test]
async fn accepts_absolute_form_naming_the_upstream_itself() {
    let upstream = MockServer::start().await;
    Mock::given(path("/open/product/get"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&upstream)
        .await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let raw = format!(
        "GET {}/open/product/get HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        upstream.uri()
    );
    let answer = raw_exchange(gw.addr, raw.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    gw.stop().await;
}

#[tokio::test]
async fn passes_the_callers_x_request_id_or_makes_one() {
    let upstream = upstream_answering(ResponseTemplate::new(200)).await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let req = Request::get(gw.url("/a"))
        .header("x-request-id", "caller-id-123")
        .body(Full::default())
        .unwrap();
    let answer = send(req).await;
    assert_eq!(answer.headers["x-request-id"], "caller-id-123");
    let generated = get(&gw.url("/b")).await.headers["x-request-id"].clone();
    assert_eq!(generated.len(), 32);
    let received = upstream.received_requests().await.unwrap();
    assert_eq!(received[0].headers["x-request-id"], "caller-id-123");
    assert_eq!(received[1].headers["x-request-id"], generated);
    gw.stop().await;
}

#[tokio::test]
async fn prefixes_the_base_path_of_the_upstream_url() {
    let upstream = MockServer::start().await;
    Mock::given(path("/sandbox/api/open/product/get"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&upstream)
        .await;
    let gw = spawn_gateway(config(&format!("{}/sandbox/api/", upstream.uri()))).await;
    assert_eq!(get(&gw.url("/open/product/get?i=1")).await.status, 200);
    gw.stop().await;
}
