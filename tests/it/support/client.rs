//! The caller: a plain HTTP client and its answers, and raw-TCP requests
//! for what a library client would not send.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::wire::read_message;

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }

    /// Asserts this is a gateway envelope for `status` and returns it.
    pub fn assert_gateway_envelope(&self, status: u16) -> Value {
        assert_eq!(self.status.as_u16(), status, "body: {:?}", self.body);
        let v = self.json();
        assert_eq!(v["code"], status);
        assert_eq!(v["source"], "pandagate");
        assert!(v["data"].is_null());
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()));
        let id = v["requestId"].as_str().expect("requestId is a string");
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        v
    }
}

/// Sends one request through a fresh plain-HTTP client.
pub async fn send(req: Request<Full<Bytes>>) -> Answer {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("answer within 20 s")
        .expect("request succeeds");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body reads").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str) -> Answer {
    send(Request::get(url).body(Full::default()).unwrap()).await
}

/// Writes `raw` to `addr` and reads one response with a Content-Length body
/// (or up to the peer closing; at most 5 s).
pub async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    read_message(&mut stream).await
}

/// A chunked upload of two 600-byte chunks (1200 bytes, no Content-Length).
pub fn chunked_upload_1200(path: &str) -> String {
    let chunk = "x".repeat(600);
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    )
}
