//! The floor under pandagate's cost per call: a bare hyper HTTP/1.1 server
//! in front of the same pooled hyper-util client pandagate uses, forwarding
//! every request unchanged (no signing, no logging, no limits, no timers).
//! `bench/floor.sh` runs it next to pandagate and nginx; it is a measuring
//! stick, not a product.
//!
//!     LISTEN=127.0.0.1:8081 UPSTREAM=http://127.0.0.1:8082 \
//!         cargo run --release --example bare_proxy
//!
//! `FLAVOR=current_thread` runs it on one thread instead of the multi-thread
//! runtime.

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() {
    let listen = std::env::var("LISTEN").expect("LISTEN=ip:port");
    let upstream: http::Uri = std::env::var("UPSTREAM")
        .expect("UPSTREAM=http://ip:port")
        .parse()
        .expect("UPSTREAM is a URI");
    let runtime = match std::env::var("FLAVOR").as_deref() {
        Ok("current_thread") => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
    .expect("runtime");
    runtime.block_on(async move {
        let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build_http();
        let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (client, upstream) = (client.clone(), upstream.clone());
            tokio::spawn(async move {
                let service = service_fn(move |mut req: hyper::Request<Incoming>| {
                    let mut parts = upstream.clone().into_parts();
                    parts.path_and_query = req.uri().path_and_query().cloned();
                    *req.uri_mut() = http::Uri::from_parts(parts).expect("valid parts");
                    client.request(req)
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
