//! The provider connections of one serving thread, and the requests sent
//! on them.
//!
//! A [`Pool`] holds the idle HTTP/1 connections to one destination, most
//! recently used first, and the one HTTP/2 connection when the provider
//! chose HTTP/2 by ALPN. Each serving thread has pools of its own (see
//! [`crate::net::upstream`]), so a request is written by a connection
//! task on the thread that serves the call, and taking or returning a
//! connection touches a lock no other thread holds.
//!
//! An HTTP/1 connection returns to its pool when the provider's answer has
//! been read to its end ([`ProviderBody`]); an answer dropped before its
//! end closes it. At most `max_idle` connections wait idle, none for longer
//! than `idle_timeout`: an expired one is never taken, and a reaper task,
//! running only while connections wait, closes them on time.
//!
//! A request that never left a reused connection (the provider closed it
//! while it sat idle) is sent again on another one, or on a new
//! connection: nothing of it reached the provider. A request that failed
//! on a new connection, or after it was written, is an error for the
//! caller's retry policy to judge. A connection that could not be made is
//! [`SendError::Connect`], with the connector's error as its source.
//!
//! Kept by hand rather than through hyper-util's pooled client: that client
//! keys its pool by a hashed (scheme, authority), races every checkout
//! against a new connection, and spawns a task per request to return its
//! connection; a pool per thread and per destination needs none of it.

use std::collections::VecDeque;
use std::error::Error;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::rt::{Read, Write};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

type BoxError = Box<dyn Error + Send + Sync>;

/// Why a request got no answer.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made: the connector's error (TCP, the egress
    /// proxy, TLS, the connect timeout), or HTTP/2's handshake. Nothing
    /// was sent.
    Connect(BoxError),
    /// The connection failed while the request was written or its answer
    /// awaited: it may have reached the provider.
    Request(hyper::Error),
}

impl SendError {
    /// Whether no connection could be made.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Connect(_) => f.write_str("could not connect to the provider"),
            SendError::Request(_) => f.write_str("the request to the provider failed"),
        }
    }
}

impl Error for SendError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match self {
            SendError::Connect(e) => Some(e.as_ref()),
            SendError::Request(e) => Some(e),
        }
    }
}

/// A new connection that closed before its first request was written.
#[derive(Debug)]
struct ClosedUnused;

impl fmt::Display for ClosedUnused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the new connection closed before the request was written")
    }
}

impl Error for ClosedUnused {}

/// The connections of one serving thread to one destination.
pub struct Pool<C, B> {
    connector: C,
    shelf: Arc<Shelf<B>>,
}

impl<C, B> fmt::Debug for Pool<C, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("max_idle", &self.shelf.max_idle)
            .field("idle_timeout", &self.shelf.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// Where a pool's connections wait.
struct Shelf<B> {
    max_idle: usize,
    idle_timeout: Duration,
    slots: Mutex<Slots<B>>,
}

struct Slots<B> {
    /// Oldest first; taken from the back.
    idle: VecDeque<Idle<B>>,
    /// The provider's HTTP/2 connection, shared by every request.
    h2: Option<http2::SendRequest<B>>,
    /// Whether a reaper task is running.
    reaping: bool,
}

struct Idle<B> {
    sender: http1::SendRequest<B>,
    /// Requests go in absolute form (to an egress proxy).
    absolute: bool,
    since: Instant,
}

enum Conn<B> {
    H1 {
        sender: http1::SendRequest<B>,
        absolute: bool,
    },
    H2(http2::SendRequest<B>),
}

enum Unsent<B> {
    /// Never written: the connection had closed.
    Back(Box<Request<B>>),
    Failed(hyper::Error),
}

impl<C, B> Pool<C, B>
where
    C: Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: Read + Write + Connection + Unpin + Send + 'static,
    C::Error: Into<BoxError>,
    C::Future: Send,
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// A pool that opens connections with `connector` and keeps up to
    /// `max_idle` of them idle for at most `idle_timeout` each.
    pub fn new(connector: C, max_idle: usize, idle_timeout: Duration) -> Self {
        Pool {
            connector,
            shelf: Arc::new(Shelf {
                max_idle,
                idle_timeout,
                slots: Mutex::new(Slots {
                    idle: VecDeque::new(),
                    h2: None,
                    reaping: false,
                }),
            }),
        }
    }

    /// Sends `req`, whose URI is absolute, on an idle connection or a new
    /// one, and returns the answer's head; its body hands the connection
    /// back when read to its end.
    ///
    /// The request comes boxed: it is a few hundred bytes, and every
    /// `async` function it passes through on its way here would keep a
    /// copy of it in the call's state until the answer came.
    pub async fn send(
        &self,
        mut req: Box<Request<B>>,
    ) -> Result<Response<ProviderBody<B>>, SendError> {
        while let Some(conn) = self.shelf.take().await {
            match self.shelf.try_send(conn, *req).await {
                Ok(response) => return Ok(response),
                Err(Unsent::Back(back)) => req = back,
                Err(Unsent::Failed(e)) => return Err(SendError::Request(e)),
            }
        }
        // Boxed: connecting (TLS, HTTP/2's handshake) is rare and its
        // state large, and every caller's future would carry it otherwise.
        let conn = Box::pin(self.connect(req.uri())).await?;
        match self.shelf.try_send(conn, *req).await {
            Ok(response) => Ok(response),
            Err(Unsent::Failed(e)) => Err(SendError::Request(e)),
            Err(Unsent::Back(_)) => Err(SendError::Connect(Box::new(ClosedUnused))),
        }
    }

    /// A new connection to `uri`'s host: HTTP/2 when the TLS handshake
    /// agreed on it, HTTP/1.1 otherwise. Its task runs on this thread's
    /// runtime until the connection closes.
    async fn connect(&self, uri: &Uri) -> Result<Conn<B>, SendError> {
        let connect = |e: BoxError| SendError::Connect(e);
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(|e| connect(e.into()))?;
        let io = connector
            .call(uri.clone())
            .await
            .map_err(|e| connect(e.into()))?;
        let connected = io.connected();
        if connected.is_negotiated_h2() {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| connect(e.into()))?;
            tokio::spawn(Driven {
                connection,
                what: "provider HTTP/2 connection",
            });
            self.shelf.slots.lock().expect("pool lock").h2 = Some(sender.clone());
            return Ok(Conn::H2(sender));
        }
        let (sender, connection) = http1::handshake(io).await.map_err(|e| connect(e.into()))?;
        tokio::spawn(Driven {
            connection,
            what: "provider connection",
        });
        Ok(Conn::H1 {
            sender,
            absolute: connected.is_proxied(),
        })
    }

    /// How many connections wait idle.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.shelf.slots.lock().expect("pool lock").idle.len()
    }
}

impl<B> Shelf<B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// An idle connection, ready for a request; `None` when there is none.
    async fn take(&self) -> Option<Conn<B>> {
        loop {
            let (mut sender, absolute) = {
                let mut slots = self.slots.lock().expect("pool lock");
                if let Some(h2) = &slots.h2 {
                    if !h2.is_closed() {
                        return Some(Conn::H2(h2.clone()));
                    }
                    slots.h2 = None;
                }
                slots.expire(self.idle_timeout);
                let idle = slots.idle.pop_back()?;
                (idle.sender, idle.absolute)
            };
            // A connection goes back to the pool as its answer ends, maybe
            // before its task has seen that end too: wait for the task.
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Some(Conn::H1 { sender, absolute });
            }
        }
    }

    /// Sends `req` on `conn`. A request that never left comes back with
    /// its absolute URI, for another connection of either protocol.
    fn try_send(
        self: &Arc<Self>,
        conn: Conn<B>,
        mut req: Request<B>,
    ) -> impl Future<Output = Result<Response<ProviderBody<B>>, Unsent<B>>> + use<B> {
        // hyper queues the request for the connection's task as it is
        // called: only the wait for the answer is left to the future.
        match conn {
            Conn::H1 {
                mut sender,
                absolute,
            } => {
                let absolute_uri = (!absolute).then(|| origin_form(req.uri_mut()));
                let answer = sender.try_send_request(req);
                let checkin = Checkin {
                    shelf: Arc::downgrade(self),
                    sender,
                    absolute,
                };
                Answering {
                    answer: Either::H1 { answer },
                    checkin: Some(checkin),
                    absolute_uri,
                }
            }
            Conn::H2(mut sender) => Answering {
                answer: Either::H2 {
                    answer: sender.try_send_request(req),
                },
                checkin: None,
                absolute_uri: None,
            },
        }
    }
}

impl<B: Send + 'static> Shelf<B> {
    /// Keeps `sender` idle, unless the shelf is full.
    fn put(self: Arc<Self>, sender: http1::SendRequest<B>, absolute: bool) {
        if sender.is_closed() {
            return;
        }
        let mut slots = self.slots.lock().expect("pool lock");
        if slots.idle.len() >= self.max_idle {
            return;
        }
        slots.idle.push_back(Idle {
            sender,
            absolute,
            since: Instant::now(),
        });
        if !slots.reaping
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            slots.reaping = true;
            runtime.spawn(reap(Arc::downgrade(&self)));
        }
    }

    /// Closes the connections idle for `idle_timeout`; says when the next
    /// one is due, or `None` (and stops reaping) when none waits.
    fn reap_due(&self) -> Option<Instant> {
        let mut slots = self.slots.lock().expect("pool lock");
        let due = slots.expire(self.idle_timeout);
        if due.is_none() {
            slots.reaping = false;
        }
        due
    }
}

impl<B> Slots<B> {
    /// Closes the connections idle for `timeout`; says when the oldest of
    /// the others is due.
    fn expire(&mut self, timeout: Duration) -> Option<Instant> {
        let now = Instant::now();
        while let Some(idle) = self.idle.front() {
            let due = idle.since + timeout;
            if due > now {
                return Some(due);
            }
            self.idle.pop_front();
        }
        None
    }
}

impl<B> Unsent<B> {
    /// What a failed send left: the request, when it never left (with
    /// `absolute_uri` put back, when it was sent in origin form), or the
    /// error.
    fn from_error(
        mut e: hyper::client::conn::TrySendError<Request<B>>,
        absolute_uri: Option<Uri>,
    ) -> Unsent<B> {
        match e.take_message() {
            Some(mut req) => {
                if let Some(uri) = absolute_uri {
                    *req.uri_mut() = uri;
                }
                Unsent::Back(Box::new(req))
            }
            None => Unsent::Failed(e.into_error()),
        }
    }
}

pin_project! {
    /// The wait for the answer to a request hyper has queued on a
    /// connection. Written out rather than as an `async` block, which would
    /// keep a second copy of hyper's future (it holds the request until
    /// the connection takes it) in every call's state.
    struct Answering<H1, H2, B>
    where
        B: Send,
        B: 'static,
    {
        #[pin]
        answer: Either<H1, H2>,
        checkin: Option<Checkin<B>>,
        absolute_uri: Option<Uri>,
    }
}

pin_project! {
    #[project = EitherProj]
    enum Either<H1, H2> {
        H1 { #[pin] answer: H1 },
        H2 { #[pin] answer: H2 },
    }
}

type Sent<B> = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<B>>>;

impl<H1, H2, B> Future for Answering<H1, H2, B>
where
    H1: Future<Output = Sent<B>>,
    H2: Future<Output = Sent<B>>,
    B: Send + 'static,
{
    type Output = Result<Response<ProviderBody<B>>, Unsent<B>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let sent = match this.answer.project() {
            EitherProj::H1 { answer } => ready!(answer.poll(cx)),
            EitherProj::H2 { answer } => ready!(answer.poll(cx)),
        };
        Poll::Ready(match sent {
            Ok(response) => Ok(response.map(|body| ProviderBody::new(body, this.checkin.take()))),
            Err(e) => Err(Unsent::from_error(e, this.absolute_uri.take())),
        })
    }
}

pin_project! {
    /// A connection's task: drives it to its end and logs an error it
    /// ended with. Written out for the reason [`Answering`] is: an `async`
    /// block would hold the connection twice.
    struct Driven<F> {
        #[pin]
        connection: F,
        what: &'static str,
    }
}

impl<F: Future<Output = Result<(), hyper::Error>>> Future for Driven<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if let Err(e) = ready!(this.connection.poll(cx)) {
            tracing::debug!(error = %e, "{} ended", this.what);
        }
        Poll::Ready(())
    }
}

/// Closes a shelf's connections as they pass their idle timeout, while any
/// wait; ends with the shelf.
async fn reap<B: Send + 'static>(shelf: Weak<Shelf<B>>) {
    loop {
        let Some(due) = shelf.upgrade().and_then(|s| s.reap_due()) else {
            return;
        };
        tokio::time::sleep_until(due).await;
    }
}

/// `https://host/p?q` as `/p?q`, for a connection straight to the host;
/// returns the absolute form.
fn origin_form(uri: &mut Uri) -> Uri {
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    std::mem::replace(uri, Uri::from(path))
}

/// An HTTP/1 connection waiting for its answer's end to go back idle.
struct Checkin<B: Send + 'static> {
    shelf: Weak<Shelf<B>>,
    sender: http1::SendRequest<B>,
    absolute: bool,
}

/// The provider's answer body. An HTTP/1 connection goes back to its pool
/// when the body has been read to its end; dropped before, it closes.
pub struct ProviderBody<B: Send + 'static> {
    body: Incoming,
    checkin: Option<Checkin<B>>,
}

impl<B: Send + 'static> ProviderBody<B> {
    fn new(body: Incoming, checkin: Option<Checkin<B>>) -> Self {
        ProviderBody { body, checkin }
    }

    /// Hands the connection back, the body having ended.
    fn ended(&mut self) {
        if let Some(c) = self.checkin.take()
            && let Some(shelf) = c.shelf.upgrade()
        {
            shelf.put(c.sender, c.absolute);
        }
    }
}

impl<B: Send + 'static> fmt::Debug for ProviderBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderBody")
            .field("body", &self.body)
            .field("pooled", &self.checkin.is_some())
            .finish()
    }
}

impl<B: Send + 'static> Body for ProviderBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = ready!(Pin::new(&mut this.body).poll_frame(cx));
        match &polled {
            None => this.ended(),
            Some(Ok(_)) if this.body.is_end_stream() => this.ended(),
            Some(Ok(_)) => {}
            Some(Err(_)) => this.checkin = None,
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B: Send + 'static> Drop for ProviderBody<B> {
    fn drop(&mut self) {
        // An answer with no body (HEAD, 204, 304, `Content-Length: 0`) may
        // never be polled; one dropped before its end closes its connection.
        if self.body.is_end_stream() {
            self.ended();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::connect::HttpConnector;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// How the stand-in provider answers.
    #[derive(Clone, Copy)]
    enum Answer {
        /// `200 ok`, keeping the connection, after `delay_ms`.
        Ok { delay_ms: u64 },
        /// `200 ok`, then closes the connection without saying so.
        OkThenClose,
        /// A head promising 10 bytes, 5 of them, then silence.
        Truncated,
        /// `204`, keeping the connection.
        NoContent,
    }

    #[derive(Default)]
    struct Seen {
        accepted: AtomicUsize,
        closed: AtomicUsize,
        request_lines: Mutex<Vec<String>>,
    }

    /// A raw HTTP/1.1 server on a free loopback port.
    async fn provider(answer: Answer) -> (SocketAddr, Arc<Seen>, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let shared = seen.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                shared.accepted.fetch_add(1, Ordering::SeqCst);
                let seen = shared.clone();
                connections.spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 1024];
                        let n = tcp.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let line = head.lines().next().unwrap_or_default().to_owned();
                        seen.request_lines.lock().unwrap().push(line);
                        let reply: &[u8] = match answer {
                            Answer::Ok { delay_ms } => {
                                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            }
                            Answer::OkThenClose => {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                            }
                            Answer::Truncated => {
                                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello"
                            }
                            Answer::NoContent => b"HTTP/1.1 204 No Content\r\n\r\n",
                        };
                        if tcp.write_all(reply).await.is_err() {
                            break;
                        }
                        match answer {
                            Answer::OkThenClose => break,
                            Answer::Truncated => {
                                // Silent until the client goes.
                                let _ = tcp.read(&mut chunk).await;
                                break;
                            }
                            _ => {}
                        }
                    }
                    seen.closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (addr, seen, task)
    }

    type TestPool = Pool<HttpConnector, Empty<Bytes>>;

    fn pool(max_idle: usize, idle_ms: u64) -> TestPool {
        Pool::new(
            HttpConnector::new(),
            max_idle,
            Duration::from_millis(idle_ms),
        )
    }

    fn get(addr: SocketAddr, path: &str) -> Request<Empty<Bytes>> {
        Request::get(format!("http://{addr}{path}"))
            .header(http::header::HOST, addr.to_string())
            .body(Empty::new())
            .unwrap()
    }

    async fn read(pool: &TestPool, req: Request<Empty<Bytes>>) -> (u16, Bytes) {
        let response = pool.send(Box::new(req)).await.expect("an answer");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    }

    /// Waits, boundedly, for `f` to hold.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never: {what}");
    }

    #[tokio::test]
    async fn requests_one_after_another_share_one_connection_in_origin_form() {
        let (addr, seen, _task) = provider(Answer::Ok { delay_ms: 0 }).await;
        let pool = pool(8, 60_000);
        for i in 0..3 {
            let (status, body) = read(&pool, get(addr, &format!("/open/x?i={i}"))).await;
            assert_eq!((status, &body[..]), (200, &b"ok"[..]));
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(
            *seen.request_lines.lock().unwrap(),
            [
                "GET /open/x?i=0 HTTP/1.1",
                "GET /open/x?i=1 HTTP/1.1",
                "GET /open/x?i=2 HTTP/1.1"
            ]
        );
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn no_more_than_max_idle_connections_wait() {
        let (addr, seen, _task) = provider(Answer::Ok { delay_ms: 100 }).await;
        let pool = pool(1, 60_000);
        let (a, b, c) = tokio::join!(
            read(&pool, get(addr, "/a")),
            read(&pool, get(addr, "/b")),
            read(&pool, get(addr, "/c"))
        );
        assert_eq!([a.0, b.0, c.0], [200; 3]);
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(pool.idle(), 1);
        eventually("two of three connections closed", || {
            seen.closed.load(Ordering::SeqCst) == 2
        })
        .await;
    }

    #[tokio::test]
    async fn an_idle_connection_closes_on_its_idle_timeout_and_is_never_taken_after_it() {
        let (addr, seen, _task) = provider(Answer::Ok { delay_ms: 0 }).await;
        let pool = pool(8, 100);
        assert_eq!(read(&pool, get(addr, "/a")).await.0, 200);
        assert_eq!(pool.idle(), 1);
        eventually("the idle connection closed", || {
            seen.closed.load(Ordering::SeqCst) == 1
        })
        .await;
        assert_eq!(pool.idle(), 0);
        assert_eq!(read(&pool, get(addr, "/b")).await.0, 200);
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_for_a_connection_the_provider_closed_goes_on_a_new_one_once() {
        let (addr, seen, _task) = provider(Answer::OkThenClose).await;
        let pool = pool(8, 60_000);
        for i in 1..=3 {
            assert_eq!(read(&pool, get(addr, "/order")).await.0, 200);
            // The provider's close arrives while the connection is idle.
            eventually("the provider closed", || {
                seen.closed.load(Ordering::SeqCst) == i
            })
            .await;
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(
            seen.request_lines.lock().unwrap().len(),
            3,
            "each sent once"
        );
    }

    #[tokio::test]
    async fn an_answer_dropped_before_its_end_closes_its_connection() {
        let (addr, seen, _task) = provider(Answer::Truncated).await;
        let pool = pool(8, 60_000);
        let response = pool.send(Box::new(get(addr, "/a"))).await.unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"hello");
        drop(body);
        assert_eq!(pool.idle(), 0);
        eventually("the connection closed", || {
            seen.closed.load(Ordering::SeqCst) == 1
        })
        .await;
    }

    #[tokio::test]
    async fn an_answer_without_a_body_gives_its_connection_back_unread() {
        let (addr, seen, _task) = provider(Answer::NoContent).await;
        let pool = pool(8, 60_000);
        for _ in 0..3 {
            let response = pool.send(Box::new(get(addr, "/a"))).await.unwrap();
            assert_eq!(response.status(), 204);
            drop(response);
            assert_eq!(pool.idle(), 1);
        }
        assert_eq!(seen.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error_that_sent_nothing() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let pool = pool(8, 60_000);
        let e = pool.send(Box::new(get(addr, "/a"))).await.unwrap_err();
        assert!(e.is_connect(), "{e:?}");
        let mut source = e.source();
        let mut refused = false;
        while let Some(s) = source {
            refused |= s
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
            source = s.source();
        }
        assert!(refused, "the connector's error is the source: {e:?}");
    }
}
