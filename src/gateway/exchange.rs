//! Exchange: one attempt on the wire — the provider's answer or the
//! failure, and how it went (the outcome the retry policy judges),
//! including a read's 2xx whose `code` says "try again".

use std::time::{Duration, SystemTime};

use http::header;
use http::{Request, Response};

use super::{Answer, Gateway};
use crate::base::error::GatewayError;
use crate::config::Class;
use crate::net::body::{self, BodyTimedOut, BodyTooLarge, Provided, ResponseBody, UpstreamBody};
use crate::net::pool::SendError;
use crate::pandapon::envelope;
use crate::pandapon::headers;
use crate::policy::retry::{self, Outcome};

impl Gateway {
    /// Sends one attempt and says how it went.
    pub(super) async fn exchange(
        &self,
        req: Box<Request<UpstreamBody>>,
        timeout: Duration,
        class: Class,
    ) -> (Outcome, Answer) {
        let exchange = async {
            let mut response = match self.upstream.pool(class).send(req).await {
                Ok(response) => response,
                Err(e) => {
                    // TLS and the egress proxy fail while connecting.
                    let known = e.is_connect().then(|| self.upstream.connect_failure(&e));
                    let error = known.flatten().unwrap_or_else(|| {
                        classify(&e, self.max_body, self.server.body_read_timeout_ms)
                    });
                    let outcome = match error {
                        GatewayError::UpstreamConnect | GatewayError::UpstreamProxy { .. } => {
                            Outcome::ConnectFailed
                        }
                        GatewayError::UpstreamTls { .. } => Outcome::TlsFailed,
                        GatewayError::BodyTooLarge { .. } | GatewayError::BodyTimeout(_) => {
                            Outcome::Refused
                        }
                        _ => Outcome::Dropped,
                    };
                    return (outcome, Err(error));
                }
            };
            // Response filter: connection-level headers stay on their hop.
            headers::strip_hop_by_hop(response.headers_mut());
            let status = response.status().as_u16();
            let retry_after = matches!(status, 429 | 503)
                .then(|| response.headers().get(header::RETRY_AFTER))
                .flatten()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
            let outcome = Outcome::Response {
                status,
                retry_after,
            };
            if class.repeatable()
                && response.status().is_success()
                && !self.retry.transient_codes.is_empty()
            {
                return self.look_for_transient_code(response, outcome).await;
            }
            (outcome, Ok(response.map(ResponseBody::upstream)))
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => (
                Outcome::TimedOut,
                Err(GatewayError::UpstreamTimeout(timeout.as_millis() as u64)),
            ),
        }
    }

    /// Reads the start of a read's 2xx body to see whether its `code` is one
    /// of `retry.transient_codes`. A body longer than `log.inspect_bytes` is
    /// not judged (and so not retried on its code): it streams on.
    async fn look_for_transient_code(
        &self,
        response: Response<Provided>,
        outcome: Outcome,
    ) -> (Outcome, Answer) {
        let (parts, incoming) = response.into_parts();
        match body::read_prefix(incoming, self.inspect_bytes).await {
            Err(_) => (Outcome::Dropped, Err(GatewayError::UpstreamFailed)),
            Ok((chunks, Some(rest))) => (
                outcome,
                Ok(Response::from_parts(
                    parts,
                    ResponseBody::upstream_after(chunks, rest),
                )),
            ),
            Ok((chunks, None)) => {
                let whole = body::join(chunks);
                let code = envelope::inspect(&whole).code;
                let outcome = match code {
                    Some(code) if self.retry.is_transient(&code) => Outcome::TransientCode(
                        code.as_str()
                            .map_or_else(|| code.to_string(), str::to_owned),
                    ),
                    _ => outcome,
                };
                (
                    outcome,
                    Ok(Response::from_parts(parts, ResponseBody::local(whole))),
                )
            }
        }
    }
}

/// Maps a client error to the gateway's answer.
fn classify(e: &SendError, max_body: u64, body_timeout_ms: u64) -> GatewayError {
    if e.is_connect() {
        return GatewayError::UpstreamConnect;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.downcast_ref::<BodyTooLarge>().is_some() {
            return GatewayError::BodyTooLarge { limit: max_body };
        }
        if err.downcast_ref::<BodyTimedOut>().is_some() {
            return GatewayError::BodyTimeout(body_timeout_ms);
        }
        source = err.source();
    }
    tracing::debug!(error = %e, "upstream request failed");
    GatewayError::UpstreamFailed
}
