//! The accept loop: HTTP/1.1 and h2c from callers, per-connection tasks, and
//! a graceful drain when the shutdown future completes (after
//! `hyper-util/examples/server_graceful.rs`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

use crate::body::BoxError;
use crate::config::ServerConfig;

/// Connection-level limits.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub shutdown_grace: Duration,
}

impl From<&ServerConfig> for ServerOptions {
    fn from(c: &ServerConfig) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(c.header_read_timeout_ms),
            max_header_bytes: c.max_header_bytes,
            max_headers: c.max_headers,
            shutdown_grace: Duration::from_millis(c.shutdown_grace_ms),
        }
    }
}

/// Serves `handler` on `listener` until `shutdown` completes, then stops
/// accepting and gives open connections `shutdown_grace` to finish.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    handler: H,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(opts.max_header_bytes)
        .max_headers(opts.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(opts.max_header_bytes as u32);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = match accepted {
                    Ok(conn) => conn,
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let service = service_fn(move |req| {
                    let response = handler(req);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            () = shutdown.as_mut() => break,
        }
    }
    drop(listener);
    tracing::info!(connections = graceful.count(), "draining");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("drained"),
        () = tokio::time::sleep(opts.shutdown_grace) => {
            tracing::warn!(grace_ms = opts.shutdown_grace.as_millis() as u64, "grace period over, closing remaining connections");
        }
    }
}

/// Binds `addr` and logs where it listens (port 0 picks a free port).
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "{what} listening");
    Ok(listener)
}

/// SIGINT and SIGTERM, as a stream: the first starts a drain, a second
/// one means "now".
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The name of the next signal received.
    pub async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// Completes on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    match Signals::new() {
        Ok(mut signals) => {
            let name = signals.recv().await;
            tracing::info!(signal = name, "shutting down");
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch signals");
            std::future::pending::<()>().await;
        }
    }
}
