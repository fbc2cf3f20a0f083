//! Request and response bodies as the gateway handles them.
//!
//! * [`read_request`] reads a request body whole when it is small (at most
//!   `server.buffer_body_bytes`), so an over-limit body is refused before a
//!   byte is sent upstream and the bytes can be sent again; a larger body
//!   streams through [`UpstreamBody::Stream`], which fails the upload the
//!   moment it passes `server.max_request_body_bytes`. Either way the body
//!   must be in by its deadline (`server.body_read_timeout_ms`): a streamed
//!   one that is not is cut off mid-upload, so the provider never receives
//!   a complete request. The bytes read are held against the process's
//!   body budget (`crate::base::body_budget`) as they arrive, a declared length
//!   at once, before a byte is read; a body that would pass it is refused.
//!   A streamed body holds only its first, buffered part, until that part
//!   has gone upstream: what follows passes through one chunk at a time,
//!   as fast as the provider takes it.
//! * [`ResponseBody`] passes the response through unchanged, showing each
//!   chunk and then how the body ended to a [`BodyWatch`] (the call's log
//!   line rides along that way, see `crate::observe::call_log`).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::base::body_budget::Held;
use crate::base::error::GatewayError;
use crate::net::pool::ProviderBody;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The provider's answer body, as the pool hands it over.
pub type Provided = ProviderBody<UpstreamBody>;

/// Raised inside a streaming upload that passes the size limit; the proxy
/// finds it in the client error's source chain and answers 413.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// Raised inside a streaming upload still incomplete at its deadline; the
/// proxy finds it in the client error's source chain and answers 408.
#[derive(Debug, thiserror::Error)]
#[error("request body not received in time")]
pub struct BodyTimedOut;

/// The body sent upstream.
#[derive(Debug)]
pub enum UpstreamBody {
    /// Read whole; can be sent again.
    Full(Option<Bytes>),
    /// Already-read chunks, then the rest of the caller's body. Boxed: the
    /// rare case, kept out of the size of every request (which hyper's
    /// connections queue in blocks of 32).
    Stream(Box<Streaming>),
}

/// A body that streams through.
#[derive(Debug)]
pub struct Streaming {
    pending: VecDeque<Bytes>,
    rest: Incoming,
    seen: u64,
    max: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The budget `pending` holds, given back once it has gone.
    held: Held,
}

impl UpstreamBody {
    /// A copy for another attempt, when the body was read whole.
    pub fn replay(&self) -> Option<UpstreamBody> {
        match self {
            UpstreamBody::Full(b) => Some(UpstreamBody::Full(b.clone())),
            UpstreamBody::Stream(_) => None,
        }
    }
}

/// Limits on reading one request body.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// Read whole up to this many bytes; stream beyond.
    pub buffer: u64,
    /// Refused past this many bytes.
    pub max: u64,
    /// The whole body must be in by then.
    pub deadline: tokio::time::Instant,
    /// `server.body_read_timeout_ms`, for the error message.
    pub timeout_ms: u64,
}

/// Reads `body` whole if it ends within `limits.buffer` bytes; refuses it
/// past `limits.max` or when it is not in by `limits.deadline`, and when
/// `held` cannot grow to hold what is read ([`GatewayError::Overloaded`]).
///
/// A body read whole comes back with the hold of its bytes, to be kept as
/// long as the bytes are (for a call, until its last attempt); a streamed
/// body carries its own, and an empty one comes back.
pub async fn read_request(
    body: Incoming,
    declared: Option<u64>,
    limits: BodyLimits,
    mut held: Held,
) -> Result<(UpstreamBody, Held), GatewayError> {
    if declared.is_some_and(|len| len > limits.max) {
        return Err(GatewayError::BodyTooLarge { limit: limits.max });
    }
    // What the caller says it sends is taken before a byte is read, up to
    // what would be buffered: a refusal then costs nothing.
    if let Some(len) = declared {
        held.grow_to(len.min(limits.buffer))
            .map_err(|_| GatewayError::Overloaded)?;
    }
    tokio::time::timeout_at(limits.deadline, read_or_stream(body, limits, held))
        .await
        .unwrap_or(Err(GatewayError::BodyTimeout(limits.timeout_ms)))
}

async fn read_or_stream(
    mut body: Incoming,
    limits: BodyLimits,
    mut held: Held,
) -> Result<(UpstreamBody, Held), GatewayError> {
    let BodyLimits { buffer, max, .. } = limits;
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut seen: u64 = 0;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let frame = frame.map_err(|_| GatewayError::BodyRead)?;
        // Request trailers are not forwarded: the provider does not use them.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > max {
            return Err(GatewayError::BodyTooLarge { limit: max });
        }
        held.grow_to(seen).map_err(|_| GatewayError::Overloaded)?;
        if !data.is_empty() {
            chunks.push_back(data);
        }
        if seen > buffer {
            let stream = UpstreamBody::Stream(Box::new(Streaming {
                pending: chunks,
                rest: body,
                seen,
                max,
                deadline: Box::pin(tokio::time::sleep_until(limits.deadline)),
                held: held.take(),
            }));
            return Ok((stream, held));
        }
    }
    let whole = (!chunks.is_empty()).then(|| join(chunks));
    Ok((UpstreamBody::Full(whole), held))
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            UpstreamBody::Stream(streaming) => {
                let Streaming {
                    pending,
                    rest,
                    seen,
                    max,
                    deadline,
                    held,
                } = &mut **streaming;
                if let Some(chunk) = pending.pop_front() {
                    if pending.is_empty() {
                        // The buffered part is on its way upstream; the
                        // rest passes a chunk at a time.
                        held.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                loop {
                    let Poll::Ready(frame) = Pin::new(&mut *rest).poll_frame(cx) else {
                        // Waiting on the caller: only as long as its deadline.
                        return match deadline.as_mut().poll(cx) {
                            Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimedOut.into()))),
                            Poll::Pending => Poll::Pending,
                        };
                    };
                    match frame {
                        None => return Poll::Ready(None),
                        Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                        Some(Ok(frame)) => {
                            let Ok(data) = frame.into_data() else {
                                continue;
                            };
                            *seen += data.len() as u64;
                            if *seen > *max {
                                return Poll::Ready(Some(Err(BodyTooLarge(*max).into())));
                            }
                            // A body that keeps trickling is held to the
                            // same deadline as one that stalls.
                            if deadline.is_elapsed() {
                                return Poll::Ready(Some(Err(BodyTimedOut.into())));
                            }
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Full(b) => b.is_none(),
            UpstreamBody::Stream(s) => s.pending.is_empty() && s.rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpstreamBody::Stream(s) => queued_hint(&s.pending, &s.rest),
        }
    }
}

/// Size of `pending` chunks followed by `rest`.
fn queued_hint(pending: &VecDeque<Bytes>, rest: &impl Body) -> SizeHint {
    let queued: u64 = pending.iter().map(|c| c.len() as u64).sum();
    let r = rest.size_hint();
    let mut hint = SizeHint::new();
    hint.set_lower(r.lower() + queued);
    if let Some(upper) = r.upper() {
        hint.set_upper(upper + queued);
    }
    hint
}

/// Reads `body` until it ends or `limit` bytes were seen. Returns the chunks
/// read, and the rest of the body when it did not end.
pub async fn read_prefix<B>(
    mut body: B,
    limit: usize,
) -> Result<(VecDeque<Bytes>, Option<B>), hyper::Error>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    let mut chunks = VecDeque::new();
    let mut seen = 0;
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        if let Ok(data) = frame?.into_data() {
            seen += data.len();
            chunks.push_back(data);
            if seen >= limit {
                return Ok((chunks, Some(body)));
            }
        }
    }
    Ok((chunks, None))
}

/// Joins chunks into one `Bytes`, copying only when there are several.
pub fn join(mut chunks: VecDeque<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop_front().expect("one chunk"),
        _ => {
            let mut buf = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            chunks.iter().for_each(|c| buf.extend_from_slice(c));
            buf.freeze()
        }
    }
}

/// How a response body ended, for whoever watches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyEnd {
    /// Sent to its end.
    Complete,
    /// The upstream failed mid-body.
    UpstreamFailed,
    /// Dropped before its end: the caller left, or the connection broke.
    Incomplete,
}

/// Watches a response body go by: each data chunk, then how it ended
/// (exactly once), then it is dropped.
pub trait BodyWatch: Send {
    fn chunk(&mut self, data: &Bytes);
    fn end(&mut self, how: BodyEnd);
}

/// The body returned to the caller.
pub struct ResponseBody {
    inner: Inner,
    watch: Option<Box<dyn BodyWatch>>,
}

enum Inner {
    /// The provider's body; `pending` holds chunks already read from it
    /// (while looking for a transient `code`), sent first.
    Upstream {
        pending: VecDeque<Bytes>,
        rest: Provided,
    },
    /// A body held whole: gateway-made, or a provider body read to its end.
    Local(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(body: Provided) -> Self {
        Self::upstream_after(VecDeque::new(), body)
    }

    /// A provider body of which `pending` has already been read.
    pub fn upstream_after(pending: VecDeque<Bytes>, rest: Provided) -> Self {
        Self {
            inner: Inner::Upstream { pending, rest },
            watch: None,
        }
    }

    pub fn local(body: Bytes) -> Self {
        Self {
            inner: Inner::Local(Some(body)),
            watch: None,
        }
    }

    /// Reads the body to its end if it ends within `limit` bytes
    /// (`Ok(Ok(whole))`); otherwise `Ok(Err(body))`, the same body with
    /// what was read put back in front. An unwatched body only.
    pub async fn read_within(mut self, limit: usize) -> Result<Result<Bytes, Self>, hyper::Error> {
        match std::mem::replace(&mut self.inner, Inner::Local(None)) {
            Inner::Local(b) => {
                let b = b.unwrap_or_default();
                if b.len() <= limit {
                    Ok(Ok(b))
                } else {
                    Ok(Err(Self::local(b)))
                }
            }
            Inner::Upstream { mut pending, rest } => {
                let have: usize = pending.iter().map(Bytes::len).sum();
                if have > limit {
                    return Ok(Err(Self::upstream_after(pending, rest)));
                }
                // One byte past the limit tells "ends at the limit" from
                // "goes on".
                let (chunks, rest) = read_prefix(rest, limit - have + 1).await?;
                pending.extend(chunks);
                Ok(match rest {
                    None => Ok(join(pending)),
                    Some(rest) => Err(Self::upstream_after(pending, rest)),
                })
            }
        }
    }

    /// Has `watch` see this body's chunks and its end.
    pub fn watch(&mut self, watch: Box<dyn BodyWatch>) {
        self.watch = Some(watch);
    }

    fn end(&mut self, how: BodyEnd) {
        if let Some(mut w) = self.watch.take() {
            w.end(how);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Local(b) => b.take().map(|b| Ok(Frame::data(b))),
            Inner::Upstream { pending, rest } => match pending.pop_front() {
                Some(chunk) => Some(Ok(Frame::data(chunk))),
                None => ready!(Pin::new(rest).poll_frame(cx)),
            },
        };
        match &polled {
            Some(Ok(frame)) => {
                if let (Some(w), Some(data)) = (this.watch.as_deref_mut(), frame.data_ref()) {
                    w.chunk(data);
                }
                if this.is_end_stream() {
                    this.end(BodyEnd::Complete);
                }
            }
            Some(Err(_)) => this.end(BodyEnd::UpstreamFailed),
            None => this.end(BodyEnd::Complete),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Local(b) => b.is_none(),
            Inner::Upstream { pending, rest } => pending.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Local(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Upstream { pending, rest } => queued_hint(pending, rest),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Still watched: either the body was empty and never polled, or the
        // caller went away or the connection broke before it ended.
        let how = if self.is_end_stream() {
            BodyEnd::Complete
        } else {
            BodyEnd::Incomplete
        };
        // A body held whole that never went out (its caller left first) is
        // still shown to the watcher: the log says what the provider said.
        if let (BodyEnd::Incomplete, Inner::Local(Some(body)), Some(w)) =
            (how, &self.inner, self.watch.as_deref_mut())
        {
            w.chunk(body);
        }
        self.end(how);
    }
}
