//! Cached: a read on a cached route — answered from the cache while fresh;
//! else asked once for all identical calls at that moment and its good
//! answer kept; a stale entry answers when the provider cannot.

use std::time::Duration;

use http::{HeaderValue, Response};
use tokio::time::Instant;

use super::prepare::Prepared;
use super::{Answer, Gateway};
use crate::base::error::GatewayError;
use crate::net::body::{ResponseBody, UpstreamBody};
use crate::observe::access_log::AccessRecord;
use crate::policy::routes::CacheRule;
use crate::state::cache::{self, CacheResult, CallerWish, Role};

impl Gateway {
    /// A read on a cached route: answered from the cache while fresh; else
    /// asked once for all identical calls at that moment, its good answer
    /// kept; when the provider cannot answer, a stale entry answers.
    pub(super) async fn cached(
        &self,
        rule: CacheRule,
        call: &Prepared<'_>,
        body: UpstreamBody,
        record: &mut AccessRecord,
    ) -> Answer {
        let cache = &self.lasting.cache;
        let wish = call.wish;
        let UpstreamBody::Full(bytes) = &body else {
            record.cache = Some(CacheResult::Bypass.as_str());
            return self.attempts(call, body, record, &mut false).await;
        };
        if wish == CallerWish::Bypass {
            record.cache = Some(CacheResult::Bypass.as_str());
            return self.attempts(call, body, record, &mut false).await;
        }
        let key = cache::KeyOf {
            account: &call.profile.account,
            method: &call.method,
            path: call.uri.path(),
            query: call.uri.query(),
            sort_query: rule.sort_query,
            body: bytes.as_deref().unwrap_or_default(),
            headers: &call.headers,
            keyed: &self.cache_forward,
        }
        .key();
        let found = cache.look_shared(call.uri.path(), &key, rule).await;
        if wish == CallerWish::Any
            && let Some(entry) = &found.fresh
        {
            record.cache = Some(CacheResult::Hit.as_str());
            let answer = entry.answer(CacheResult::Hit, std::time::Instant::now());
            return Ok(answer.map(ResponseBody::local));
        }
        let leader = match cache.lead_or_follow(key) {
            Role::Leader(leader) => Some(leader),
            Role::Follower(mut answer) => {
                let waited = tokio::time::timeout(cache.coalesce_wait(), async {
                    while answer.changed().await.is_ok() {
                        if let Some(entry) = answer.borrow().clone() {
                            return Some(entry);
                        }
                    }
                    None
                })
                .await;
                if let Ok(Some(entry)) = waited {
                    record.cache = Some(CacheResult::Coalesced.as_str());
                    let answer = entry.answer(CacheResult::Coalesced, std::time::Instant::now());
                    return Ok(answer.map(ResponseBody::local));
                }
                // The leader failed or is slow: ask for ourselves.
                None
            }
        };
        record.cache = Some(CacheResult::Miss.as_str());
        let until = Instant::now() + Duration::from_millis(self.retry.deadline_ms);
        let answer = match self.attempts(call, body, record, &mut false).await {
            Ok(response) if response.status() == http::StatusCode::OK => {
                let (parts, body) = response.into_parts();
                let read =
                    tokio::time::timeout_at(until, body.read_within(cache.max_entry_bytes())).await;
                match read {
                    Ok(Ok(Ok(whole))) => {
                        let entry = cache.keepable(
                            call.uri.path(),
                            parts.status,
                            &parts.headers,
                            &whole,
                            (&call.headers, &self.cache_forward),
                            std::time::Instant::now(),
                        );
                        if let Some(leader) = leader {
                            leader.finish(entry, rule.ttl + rule.stale);
                        }
                        Ok(Response::from_parts(parts, ResponseBody::local(whole)))
                    }
                    Ok(Ok(Err(long))) => Ok(Response::from_parts(parts, long)),
                    Ok(Err(_)) => Err(GatewayError::UpstreamFailed),
                    Err(_) => Err(GatewayError::UpstreamTimeout(self.retry.deadline_ms)),
                }
            }
            other => other,
        };
        let failed = match &answer {
            Ok(response) => response.status().is_server_error(),
            Err(e) => {
                e.status().is_server_error() || e.status() == http::StatusCode::TOO_MANY_REQUESTS
            }
        };
        if failed && let Some(entry) = found.stale.or(found.fresh) {
            record.cache = Some(CacheResult::Stale.as_str());
            let answer = entry.answer(CacheResult::Stale, std::time::Instant::now());
            return Ok(answer.map(ResponseBody::local));
        }
        answer.map(|mut response| {
            response
                .headers_mut()
                .insert(cache::X_PANDAGATE_CACHE, HeaderValue::from_static("miss"));
            response
        })
    }
}
