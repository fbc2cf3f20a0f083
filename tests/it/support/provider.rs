//! The provider (the PandaPon OpenAPI) over plain HTTP: its envelope,
//! fake upstreams (wiremock, or raw HTTP/1.1 that records what it got),
//! its check of a call's signature, done here independently of the
//! gateway's signer, and the signed pushes it sends to the callback
//! listener. Over TLS: [`super::provider_tls`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use md5::{Digest, Md5};
use tokio::io::AsyncWriteExt;

use super::client::send;
use super::wire::read_message;

/// A provider-shaped envelope body.
pub fn provider_body(request_id: &str, code: i64, msg: &str) -> String {
    serde_json::json!({"requestId": request_id, "code": code, "developId": "1", "msg": msg, "data": {"ok": true}})
        .to_string()
}

/// A fake upstream speaking raw HTTP/1.1: it records each request head and
/// body as text and answers every request with `response`, then closes.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start(response: &'static [u8]) -> RawUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let request = read_message(&mut stream).await;
                    seen.lock().unwrap().push(request);
                    let _ = stream.write_all(response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        RawUpstream {
            addr,
            received,
            task,
        }
    }

    pub fn requests(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A fake provider answering every request with `answer`.
pub async fn upstream_answering(answer: wiremock::ResponseTemplate) -> wiremock::MockServer {
    let upstream = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::any())
        .respond_with(answer)
        .mount(&upstream)
        .await;
    upstream
}

/// A fake provider answering the first `n` requests with `first`, then `then`.
pub async fn upstream_failing_first(
    n: u64,
    first: wiremock::ResponseTemplate,
    then: wiremock::ResponseTemplate,
) -> wiremock::MockServer {
    let upstream = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::any())
        .respond_with(first)
        .up_to_n_times(n)
        .with_priority(1)
        .mount(&upstream)
        .await;
    wiremock::Mock::given(wiremock::matchers::any())
        .respond_with(then)
        .mount(&upstream)
        .await;
    upstream
}

/// The signature computed here, independently of the gateway's signer, for
/// the default recipe: MD5(access-key + timestamp + nonce + secret), upper hex.
pub fn expected_signature(access_key: &str, timestamp: &str, nonce: &str, secret: &str) -> String {
    md5_upper(&format!("{access_key}{timestamp}{nonce}{secret}"))
}

pub fn md5_upper(s: &str) -> String {
    let digest = Md5::digest(s.as_bytes());
    digest.iter().map(|b| format!("{b:02X}")).collect()
}

/// POSTs a provider-shaped push for `order` to the gateway's callback path,
/// signed with `key` (hex HMAC-SHA256 of the body); returns the status.
pub async fn push_signed(gateway: &str, key: &str, order: &str) -> u16 {
    let (body, signature) = signed_push(key, order);
    let req = Request::post(format!("http://{gateway}/callbacks/pandapon"))
        .header("authorization", signature)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    send(req).await.status.as_u16()
}

/// A provider-shaped push for `order` and its `Authorization` (hex
/// HMAC-SHA256 of the body with `key`).
pub fn signed_push(key: &str, order: &str) -> (String, String) {
    use hmac::{KeyInit, Mac};
    let body = serde_json::json!({
        "messageType": "ORDER_CANCEL",
        "messageBody": format!(r#"{{"orderId":"{order}"}}"#),
        "messagePlatform": 0,
        "timestamp": "1715669977082",
    })
    .to_string();
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    (body, hex::encode(mac.finalize().into_bytes()))
}
