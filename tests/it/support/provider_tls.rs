//! A TLS server stand-in for the provider or a subscriber: hyper (HTTP/1.1
//! and HTTP/2, by ALPN) behind tokio-rustls, with a certificate made at test
//! time. It counts TCP connections and completed handshakes, and keeps
//! every request that reached its HTTP layer with the SNI it came under.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::tls::Issued;

/// One request as the stand-in's HTTP layer saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The server name the client asked for in its handshake.
    pub sni: Option<String>,
    pub method: Method,
    pub version: http::Version,
    /// The request target (with HTTP/2, the `:authority` is in it).
    pub uri: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    /// `Host`, or HTTP/2's `:authority` when there is no `Host`.
    pub fn host(&self) -> Option<String> {
        self.headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| self.uri.authority().map(|a| a.to_string()))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    handshakes: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
}

/// A TLS server on a free loopback port, answering every request with
/// `status` and `body`; stopped (with its connections) when dropped.
pub struct TlsServer {
    pub addr: SocketAddr,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsServer {
    /// A provider stand-in answering 200 with a provider envelope.
    pub async fn provider(cert: &Issued) -> TlsServer {
        let body = super::provider::provider_body("tls-provider-1", 200, "success");
        Self::start(cert, 200, body).await
    }

    pub async fn start(cert: &Issued, status: u16, body: String) -> TlsServer {
        Self::offering(cert, &["h2", "http/1.1"], status, body).await
    }

    /// A provider stand-in offering `alpn`, in its order of preference.
    pub async fn provider_offering(cert: &Issued, alpn: &[&str]) -> TlsServer {
        let body = super::provider::provider_body("tls-provider-1", 200, "success");
        Self::offering(cert, alpn, 200, body).await
    }

    async fn offering(cert: &Issued, alpn: &[&str], status: u16, body: String) -> TlsServer {
        let mut config = server_config(cert);
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        let body = Bytes::from(body);
        let task = tokio::spawn(async move {
            // Dropped with the task: its connections end with it.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let (acceptor, counts, body) = (acceptor.clone(), shared.clone(), body.clone());
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counts.handshakes.fetch_add(1, Ordering::SeqCst);
                    let sni = tls.get_ref().1.server_name().map(str::to_owned);
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (counts, body, sni) = (counts.clone(), body.clone(), sni.clone());
                        async move {
                            let (parts, incoming) = req.into_parts();
                            let received = incoming.collect().await?.to_bytes();
                            counts.seen.lock().unwrap().push(Seen {
                                sni,
                                method: parts.method,
                                version: parts.version,
                                uri: parts.uri,
                                headers: parts.headers,
                                body: received,
                            });
                            let mut response = Response::new(Full::new(body));
                            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            response.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TlsServer { addr, counts, task }
    }

    /// `https://localhost:PORT`: the name its certificate is for.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// `localhost:PORT`, as the gateway names the host in messages.
    pub fn authority(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    /// TCP connections accepted: each one a handshake begun.
    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Handshakes completed.
    pub fn handshakes(&self) -> usize {
        self.counts.handshakes.load(Ordering::SeqCst)
    }

    /// Requests that reached the HTTP layer, in order.
    pub fn requests(&self) -> Vec<Seen> {
        self.counts.seen.lock().unwrap().clone()
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn server_config(cert: &Issued) -> rustls::ServerConfig {
    let chain = CertificateDer::pem_file_iter(&cert.cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&cert.key).unwrap();
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap()
}
