//! The accept loop: HTTP/1.1 and h2c from callers, per-connection tasks, and
//! a graceful drain when the shutdown future completes (after
//! `hyper-util/examples/server_graceful.rs`).
//!
//! What bounds a connection, whatever its peer does:
//!
//! * an HTTP/1 head must arrive within `header_read_timeout` once its first
//!   byte has ([`Activity`]);
//! * a request body must arrive within `body_read_timeout` (the handlers,
//!   which answer 408);
//! * with no request being handled, a connection that did nothing for
//!   `idle_timeout` is closed ([`Activity`]): one that never sends a byte,
//!   a kept-alive one left unused, and one whose peer stopped reading its
//!   answer. On HTTP/1 doing something is moving a byte; on HTTP/2 it is
//!   a stream beginning or ending, or a byte of an answer's body (a DATA
//!   frame) written: control frames (PING, SETTINGS, WINDOW_UPDATE,
//!   PRIORITY...) keep no connection open;
//! * a listener holds at most `max_connections` ([`Connections`]); HTTP/2
//!   allows `http2_max_concurrent_streams` streams per connection, each
//!   with a head of at most `max_header_bytes`, 64 KiB of unread request
//!   data (1 MiB for the whole connection) and 64 KiB of answer queued;
//! * the bodies its requests read whole hold at most a quarter of the
//!   process's body budget ([`ConnectionBodies`], handed to each request as
//!   an extension).
//!
//! A request being handled (its body read, or the provider's answer awaited)
//! is never cut by the idle timer: the handlers bound their own time.
//!
//! One watcher per connection keeps both deadlines, the idle one and the
//! head's, so a request costs no timer of its own: the socket wrapper notes
//! when bytes move and when a head begins (a byte read while no request is
//! being handled), and the watcher looks at least once per
//! `header_read_timeout` (never at a deadline already past). A head that
//! begins while it sleeps therefore has its deadline after the watcher's
//! next look, which then sleeps until exactly that deadline.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::base::body_budget::ConnectionBodies;
use crate::config::ServerConfig;
use crate::net::caller_tls::ListenerTls;
use crate::net::connections::Connections;
use crate::net::tls::PeerIdentity;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connection-level limits.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_connections: usize,
    pub http2_max_concurrent_streams: u32,
    pub shutdown_grace: Duration,
    /// Speak HTTP/1.1 only (no h2c): one request at a time per connection.
    pub http1_only: bool,
    /// Serve TLS (`server.tls_cert_file`): the handshake must be done within
    /// `header_read_timeout`.
    pub tls: Option<ListenerTls>,
}

impl From<&ServerConfig> for ServerOptions {
    fn from(c: &ServerConfig) -> Self {
        Self {
            header_read_timeout: Duration::from_millis(c.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            max_header_bytes: c.max_header_bytes,
            max_headers: c.max_headers,
            max_connections: c.max_connections,
            http2_max_concurrent_streams: c.http2_max_concurrent_streams,
            shutdown_grace: Duration::from_millis(c.shutdown_grace_ms),
            http1_only: false,
            tls: None,
        }
    }
}

/// HTTP/2 flow-control windows: what one stream, and one connection, may
/// have sent that the gateway has not read yet (Envoy's edge settings).
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// What an HTTP/2 stream's answer may have queued that the peer has not
/// taken yet (hyper's default is 400 KiB): a stream's window's worth,
/// so a hundred slow-reading streams hold 6.4 MiB, not 40.
const H2_SEND_BUFFER: usize = H2_STREAM_WINDOW as usize;

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
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let connections = Connections::new("unnamed", opts.max_connections);
    serve_counted(listener, handler, opts, connections, shutdown).await;
}

/// [`serve`], counting connections in `connections` (whose cap applies).
pub async fn serve_counted<H, F, B>(
    listener: TcpListener,
    handler: H,
    opts: ServerOptions,
    connections: Arc<Connections>,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let builder = connection_builder(&opts);
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
                // Over the cap: accepted only to be closed, so the peer
                // learns at once instead of waiting in the backlog.
                let Some(slot) = connections.admit() else {
                    tracing::debug!(listener = connections.listener, "connection over max_connections closed");
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                let (idle, head) = (opts.idle_timeout, opts.header_read_timeout);
                let (tls, builder, graceful) = (opts.tls.clone(), builder.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let _slot = slot;
                    // The handshake first, within the head's time: a peer
                    // that stalls in it holds a slot no longer than one
                    // that stalls in its head.
                    let Some((io, peer)) = Io::accept(stream, tls.as_ref(), head).await else {
                        return;
                    };
                    let activity = Arc::new(Activity::new());
                    let calls = activity.clone();
                    let bodies = ConnectionBodies::new();
                    let service = service_fn(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(bodies.clone());
                        if let Some(peer) = &peer {
                            req.extensions_mut().insert(peer.clone());
                        }
                        let handling = Handling::enter(calls.clone());
                        // Boxed: hyper keeps the call's future in its own slot,
                        // which then moves a pointer, not the whole call.
                        let response = Box::pin(handler(req));
                        async move {
                            let response = response.await;
                            let activity = handling.answered();
                            Ok::<_, Infallible>(response.map(|body| Tracked { body, activity }))
                        }
                    });
                    let io = TokioIo::new(Watched::new(io, activity.clone()));
                    let conn = builder.serve_connection(io, service).into_owned();
                    let conn = graceful.watch(conn);
                    let conn = std::pin::pin!(conn);
                    tokio::select! {
                        result = conn => {
                            if let Err(e) = result {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        }
                        why = activity.watch(idle, head) => {
                            // Nothing being handled: dropping the connection
                            // loses nothing the peer was still taking part in.
                            tracing::debug!(why = why.as_str(), "closing a connection");
                        }
                    }
                });
            }
            () = shutdown.as_mut() => break,
        }
    }
    drop(listener);
    drain(connections.listener, graceful, opts.shutdown_grace).await;
}

/// HTTP/1.1 and HTTP/2 with the listener's limits.
fn connection_builder(opts: &ServerOptions) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if opts.http1_only {
        builder = builder.http1_only();
    }
    // No timer for HTTP/1: the head's deadline is the connection watcher's
    // (hyper's would arm a timer per request).
    builder
        .http1()
        .max_buf_size(opts.max_header_bytes)
        .max_headers(opts.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(opts.max_header_bytes as u32)
        .max_concurrent_streams(opts.http2_max_concurrent_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_send_buf_size(H2_SEND_BUFFER);
    builder
}

/// Gives open connections `grace` to finish their calls, then lets go.
async fn drain(listener: &str, graceful: GracefulShutdown, grace: Duration) {
    tracing::info!(listener, connections = graceful.count(), "draining");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("drained"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_ms = grace.as_millis() as u64, "grace period over, closing remaining connections");
        }
    }
}

/// What a connection did last: requests being handled, when it was last
/// active, and when the head being read began.
struct Activity {
    started: Instant,
    /// Requests whose handler has not answered yet.
    handling: AtomicUsize,
    /// Nanoseconds after `started`: when a byte last moved either way
    /// (HTTP/1), or a stream began or ended or an answer's DATA was
    /// written (HTTP/2).
    last_io: AtomicU64,
    /// Nanoseconds after `started`, plus one, when the first byte of the
    /// HTTP/1 head being read arrived; 0 when no head is being read.
    head_since: AtomicU64,
    /// HTTP/2: heads are frames, bounded by hyper's stream limits.
    h2: AtomicBool,
}

/// Why the watcher closes a connection.
#[derive(Debug, PartialEq, Eq)]
enum Quiet {
    Idle,
    SlowHead,
}

impl Quiet {
    fn as_str(&self) -> &'static str {
        match self {
            Quiet::Idle => "idle",
            Quiet::SlowHead => "slow_head",
        }
    }
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            handling: AtomicUsize::new(0),
            last_io: AtomicU64::new(0),
            head_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn touch(&self) {
        self.last_io.store(self.now(), Ordering::Relaxed);
    }

    /// Bytes were read: with no request being handled, they begin a head
    /// (unless one is already being read). On HTTP/2 reading is no
    /// activity: a stream's frames count once hyper hands it over as a
    /// request, and control frames never do.
    fn read(&self) {
        if self.is_http2() {
            return;
        }
        let now = self.now();
        self.last_io.store(now, Ordering::Relaxed);
        if self.handling.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            self.head_since.store(now + 1, Ordering::Relaxed);
        }
    }

    /// The connection speaks HTTP/2: no head deadline.
    fn http2(&self) {
        self.h2.store(true, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
    }

    fn is_http2(&self) -> bool {
        self.h2.load(Ordering::Relaxed)
    }

    fn at(&self, nanos: u64, plus: Duration) -> tokio::time::Instant {
        (self.started + Duration::from_nanos(nanos) + plus).into()
    }

    /// When the connection becomes idle if nothing happens before then.
    fn idle_at(&self, idle: Duration) -> tokio::time::Instant {
        self.at(self.last_io.load(Ordering::Relaxed), idle)
    }

    /// When the head being read must be complete, if one is.
    fn head_due(&self, limit: Duration) -> Option<tokio::time::Instant> {
        let since = self.head_since.load(Ordering::Relaxed);
        (since != 0 && self.handling.load(Ordering::Acquire) == 0)
            .then(|| self.at(since - 1, limit))
    }

    fn idle_for(&self, idle: Duration) -> bool {
        self.handling.load(Ordering::Acquire) == 0
            && self.started.elapsed()
                >= Duration::from_nanos(self.last_io.load(Ordering::Relaxed)) + idle
    }

    /// Completes once no request is being handled and either no byte has
    /// moved for `idle`, or a head begun `head` ago is still incomplete.
    /// Each look is at most `head` after the previous one, and never at a
    /// deadline already past: the watcher wakes at most once per `head`
    /// while nothing is due, and a request costs it nothing.
    async fn watch(&self, idle: Duration, head: Duration) -> Quiet {
        loop {
            let now = tokio::time::Instant::now();
            let mut next = if self.handling.load(Ordering::Acquire) > 0 {
                now + idle
            } else {
                self.idle_at(idle)
            };
            if let Some(due) = self.head_due(head) {
                next = next.min(due);
            }
            tokio::time::sleep_until(next.min(now + head)).await;
            if self.idle_for(idle) {
                return Quiet::Idle;
            }
            if self
                .head_due(head)
                .is_some_and(|due| due <= tokio::time::Instant::now())
            {
                return Quiet::SlowHead;
            }
        }
    }
}

/// One request being handled, from its head to its handler's answer (or
/// to the caller leaving first).
struct Handling(Option<Arc<Activity>>);

impl Handling {
    fn enter(activity: Arc<Activity>) -> Handling {
        activity.handling.fetch_add(1, Ordering::AcqRel);
        // Its head is complete.
        activity.head_since.store(0, Ordering::Relaxed);
        Handling(Some(activity))
    }

    /// The handler answered: the request no longer holds the connection
    /// open; its answer's body takes the activity along.
    fn answered(mut self) -> Arc<Activity> {
        let activity = self.0.take().expect("answered once");
        leave(&activity);
        activity
    }
}

fn leave(activity: &Activity) {
    activity.touch();
    activity.handling.fetch_sub(1, Ordering::AcqRel);
}

impl Drop for Handling {
    fn drop(&mut self) {
        if let Some(activity) = self.0.take() {
            leave(&activity);
        }
    }
}

/// A response body that marks the connection active when hyper is done
/// with it, so the idle timer runs from the end of the answer.
struct Tracked<B> {
    body: B,
    activity: Arc<Activity>,
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.activity.touch();
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The caller's socket, noting in [`Activity`] each byte read or written
/// (HTTP/1) or each byte of answer written (HTTP/2), and whether the
/// connection opens with the HTTP/2 preface.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
    /// Bytes of the HTTP/2 preface matched so far; `None` once decided.
    preface: Option<usize>,
    /// The frames written, on HTTP/2.
    frames: FrameScan,
}

/// A caller's connection: plain TCP, or TLS over it.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Io {
    /// The connection as served: with `tls`, after its handshake (within
    /// `within`), with the names of the client certificate it verified.
    /// `None`: the handshake failed or took too long; the connection is
    /// closed.
    async fn accept(
        stream: TcpStream,
        tls: Option<&ListenerTls>,
        within: Duration,
    ) -> Option<(Io, Option<PeerIdentity>)> {
        let Some(tls) = tls else {
            return Some((Io::Plain(stream), None));
        };
        match tokio::time::timeout(within, tls.acceptor().accept(stream)).await {
            Ok(Ok(stream)) => {
                let peer = tls
                    .asks_for_certificates
                    .then(|| stream.get_ref().1.peer_certificates())
                    .flatten()
                    .and_then(|certs| certs.first())
                    .map(crate::net::caller_tls::peer_identity);
                Some((Io::Tls(Box::new(stream)), peer))
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!("TLS handshake not done in time");
                None
            }
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What an HTTP/2 connection opens with (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl<T> Watched<T> {
    fn new(io: T, activity: Arc<Activity>) -> Watched<T> {
        Watched {
            io,
            activity,
            preface: Some(0),
            frames: FrameScan::default(),
        }
    }

    /// `n` bytes were written, the first of `bufs`: active on HTTP/1, and
    /// on HTTP/2 when some of them carry an answer's body.
    fn wrote(&mut self, n: usize, bufs: &[std::io::IoSlice<'_>]) {
        if n == 0 {
            return;
        }
        if !self.activity.is_http2() {
            self.activity.touch();
            return;
        }
        let mut left = n;
        let mut data = false;
        for buf in bufs {
            let take = left.min(buf.len());
            data |= self.frames.written(&buf[..take]);
            left -= take;
            if left == 0 {
                break;
            }
        }
        if data {
            self.activity.touch();
        }
    }

    /// Follows the first bytes read until they are, or are not, the
    /// HTTP/2 preface.
    fn sniff(&mut self, bytes: &[u8]) {
        let Some(matched) = self.preface else { return };
        let want = &H2_PREFACE[matched..];
        let n = bytes.len().min(want.len());
        self.preface = if bytes[..n] != want[..n] {
            None
        } else if n == want.len() {
            self.activity.http2();
            None
        } else {
            Some(matched + n)
        };
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.sniff(&buf.filled()[before..]);
            self.activity.read();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.wrote(n, &[std::io::IoSlice::new(buf)]);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.wrote(n, bufs);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Follows the frames a server writes on an HTTP/2 connection (its first
/// byte is a frame's), to tell an answer's DATA from control frames.
#[derive(Debug, Default)]
struct FrameScan {
    /// The head of the frame being written, as far as it has been.
    head: [u8; FRAME_HEAD],
    have: usize,
    /// Payload bytes of the frame being written still to come.
    left: usize,
    /// The frame being written is DATA.
    data: bool,
}

/// Length of an HTTP/2 frame's head (RFC 9113, section 4.1).
const FRAME_HEAD: usize = 9;
const FRAME_DATA: u8 = 0x0;

impl FrameScan {
    /// Follows `bytes`, written next; true when some of them are DATA
    /// payload.
    fn written(&mut self, mut bytes: &[u8]) -> bool {
        let mut data = false;
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = self.left.min(bytes.len());
                data |= self.data;
                self.left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEAD - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FRAME_HEAD {
                let [a, b, c, kind, ..] = self.head;
                self.left = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
                self.data = kind == FRAME_DATA;
                self.have = 0;
            }
        }
        data
    }
}

/// Binds `addr` and logs where it listens (port 0 picks a free port).
pub async fn bind(addr: SocketAddr, what: &str) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "{what} listening");
    Ok(listener)
}

/// Pending connections a listener holds before the kernel refuses more.
const BACKLOG: u32 = 1024;

/// `count` listening sockets on one address, one per serving thread, with
/// `SO_REUSEPORT`: the kernel spreads new connections over them, so no
/// thread accepts for another. Port 0 picks one free port for them all.
/// Logs where they listen. Returned as standard sockets, to be taken into
/// each thread's own runtime.
pub fn bind_shared(
    addr: SocketAddr,
    count: usize,
    what: &str,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        #[cfg(unix)]
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        let listener = socket.listen(BACKLOG)?.into_std()?;
        // The others join the port the first one got.
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    tracing::info!(addr = %addr, listeners = listeners.len(), "{what} listening");
    Ok(listeners)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            0,
            0,
            0,
            0,
            1,
        ];
        f.extend_from_slice(payload);
        f
    }

    /// Whatever the write boundaries, only DATA payload counts.
    #[test]
    fn frame_scan_tells_data_from_control_frames_across_writes() {
        let settings = frame(0x4, &[0, 3, 0, 0, 0, 100]);
        let ping_ack = frame(0x6, &[7; 8]);
        let data = frame(FRAME_DATA, &[b'x'; 20]);
        let empty_data = frame(FRAME_DATA, &[]);
        let headers = frame(0x1, &[0x88]);

        let mut scan = FrameScan::default();
        assert!(!scan.written(&[settings.clone(), ping_ack.clone(), headers.clone()].concat()));
        assert!(!scan.written(&empty_data));
        assert!(scan.written(&data));
        assert!(!scan.written(&ping_ack));

        // The same frames one byte at a time: only DATA's payload bytes.
        let all = [settings, data.clone(), ping_ack, empty_data, headers].concat();
        let mut scan = FrameScan::default();
        let payload_at = 15 + FRAME_HEAD..15 + FRAME_HEAD + 20;
        for (i, byte) in all.iter().enumerate() {
            assert_eq!(
                scan.written(std::slice::from_ref(byte)),
                payload_at.contains(&i),
                "byte {i}"
            );
        }
        // Split mid-head and mid-payload.
        let mut scan = FrameScan::default();
        assert!(!scan.written(&data[..4]));
        assert!(!scan.written(&data[4..9]));
        assert!(scan.written(&data[9..12]));
        assert!(scan.written(&data[12..]));
        assert!(!scan.written(&frame(0x8, &[0, 0, 1, 0])));
    }
}
