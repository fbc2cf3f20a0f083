//! The provider: how connections to it are made (HTTPS, or HTTP for
//! sandboxes; straight or through the egress proxy, [`crate::net::egress`]),
//! the pools of them each serving thread keeps ([`crate::net::pool`]), and
//! the mapping from the caller's request target to the provider's URL.
//!
//! Each worker thread takes its connections from its own pools, so a call
//! never hands its request to a connection driven by another thread, and
//! `upstream.pool_max_idle` applies per worker.

use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Method, Uri, Version};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::base::error::GatewayError;
use crate::config::{Class, ConfigError, UpstreamConfig, upstream_base};
use crate::net::body::UpstreamBody;
use crate::net::egress::{self, Egress};
use crate::net::pool::Pool;
use crate::net::tls::{FailureLog, Trust};
use crate::net::worker;

/// How connections to the provider are made: TCP or the proxy's tunnel,
/// then TLS, all within the connect timeout.
pub type Connector = egress::Within<HttpsConnector<egress::Connector>>;

/// One serving thread's connections to the provider.
pub type ProviderPool = Pool<Connector, UpstreamBody>;

/// Where calls go, and the client that takes them there.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// One per serving thread, indexed by [`worker::index`].
    pools: std::sync::Arc<[ProviderPool]>,
    /// The same, for calls that are never sent twice.
    write_pools: std::sync::Arc<[ProviderPool]>,
    scheme: Scheme,
    authority: Authority,
    /// Path of the base URL without its trailing `/`; empty for most setups.
    base_path: String,
    /// `Host` for upstream requests.
    pub host: HeaderValue,
    /// `Proxy-Authorization` for each request, when requests go to an
    /// egress proxy in absolute form (an `http://` upstream) and its URL
    /// carries credentials. (A tunnel sends its own, on `CONNECT`.)
    proxy_authorization: Option<HeaderValue>,
    /// TLS failures already told.
    tls_failures: std::sync::Arc<FailureLog>,
}

impl Upstream {
    /// The provider at `cfg.url`, trusted as `trust` says, reached the
    /// `egress` way, with a connection pool for each of `workers` serving
    /// threads.
    pub fn new(
        cfg: &UpstreamConfig,
        trust: &Trust,
        egress: &Egress,
        workers: usize,
    ) -> Result<Upstream, ConfigError> {
        let base = upstream_base(&cfg.url).map_err(|m| ConfigError::new("upstream.url", m))?;
        let parts = base.into_parts();
        let scheme = parts.scheme.expect("validated: has a scheme");
        let authority = parts.authority.expect("validated: has a host");
        let base_path = parts
            .path_and_query
            .map(|pq| pq.path().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        let host = HeaderValue::from_str(authority.as_str())
            .map_err(|_| ConfigError::new("upstream.url", "host is not a valid header value"))?;

        let connect_timeout = Duration::from_millis(cfg.connect_timeout_ms);
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(30)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(trust.client_config())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(egress::Connector::new(http, egress));
        // TCP, the proxy's CONNECT and the TLS handshake, all within the
        // connect timeout.
        let https = egress::Within::new(https, connect_timeout);
        let proxy_authorization = egress
            .proxy()
            .filter(|_| scheme == Scheme::HTTP)
            .and_then(|p| p.authorization().cloned());
        let pool = |idle_ms: u64| {
            Pool::new(
                https.clone(),
                cfg.pool_max_idle,
                Duration::from_millis(idle_ms),
            )
        };
        let workers = workers.max(1);
        Ok(Upstream {
            pools: (0..workers)
                .map(|_| pool(cfg.pool_idle_timeout_ms))
                .collect(),
            write_pools: (0..workers)
                .map(|_| pool(cfg.write_pool_idle_timeout_ms))
                .collect(),
            scheme,
            authority,
            base_path,
            host,
            proxy_authorization,
            tls_failures: std::sync::Arc::default(),
        })
    }

    /// The provider's `host[:port]`, as in its URL.
    pub fn authority(&self) -> &str {
        self.authority.as_str()
    }

    /// `Proxy-Authorization` for each request, when the egress proxy takes
    /// them in absolute form and needs credentials.
    pub fn proxy_authorization(&self) -> Option<&HeaderValue> {
        self.proxy_authorization.as_ref()
    }

    /// The answer for a connection to the provider that failed, when TLS
    /// or the egress proxy is why; a TLS failure is also logged, once per
    /// reason.
    pub fn connect_failure(&self, e: &(dyn std::error::Error + 'static)) -> Option<GatewayError> {
        if let Some(reason) = crate::net::tls::failure(e) {
            self.tls_failures
                .tell("the provider", self.authority(), reason);
            return Some(GatewayError::UpstreamTls {
                host: self.authority().to_owned(),
                reason,
            });
        }
        egress::failure(e).map(|p| GatewayError::UpstreamProxy {
            proxy: p.proxy.clone(),
            detail: p.detail.clone(),
        })
    }

    /// The calling worker's connections for a call of `class`. A call
    /// that is never sent twice takes its connection from a pool of its
    /// own, whose connections idle for at most `write_pool_idle_timeout_ms`
    /// (see `UpstreamConfig`).
    pub fn pool(&self, class: Class) -> &ProviderPool {
        let pools = if class.repeatable() {
            &self.pools
        } else {
            &self.write_pools
        };
        &pools[worker::index() % pools.len()]
    }

    /// The provider URL for a caller's request target.
    pub fn uri_for(&self, target: &Uri) -> Result<Uri, GatewayError> {
        let pq = target.path_and_query().map_or("/", PathAndQuery::as_str);
        // Copied, never a slice of the caller's read buffer: the target is
        // kept for the whole call.
        let pq = if self.base_path.is_empty() {
            PathAndQuery::try_from(pq).map_err(|_| GatewayError::ForeignTarget)?
        } else {
            let mut joined = String::with_capacity(self.base_path.len() + pq.len());
            joined.push_str(&self.base_path);
            joined.push_str(pq);
            PathAndQuery::try_from(joined).map_err(|_| GatewayError::ForeignTarget)?
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|_| GatewayError::ForeignTarget)
    }

    /// Refuses what would make the gateway an open proxy or a tunnel:
    /// `CONNECT`, the asterisk form, and an HTTP/1 absolute-form target
    /// naming a host other than the upstream's. (HTTP/2 always carries an
    /// `:authority`, the equivalent of `Host`, so it is not a target choice.)
    #[cfg(test)]
    fn check_target<B>(&self, req: &http::Request<B>) -> Result<(), GatewayError> {
        self.check(req.method(), req.uri(), req.version())
    }

    /// The check of `check_target` on a request's head.
    pub fn check_target_parts(&self, parts: &http::request::Parts) -> Result<(), GatewayError> {
        self.check(&parts.method, &parts.uri, parts.version)
    }

    fn check(&self, method: &Method, uri: &Uri, version: Version) -> Result<(), GatewayError> {
        if method == Method::CONNECT {
            return Err(GatewayError::Connect);
        }
        if !forwarded(method) {
            return Err(GatewayError::MethodNotAllowed(method.clone()));
        }
        if uri.path() == "*" || !uri.path().starts_with('/') {
            return Err(GatewayError::ForeignTarget);
        }
        if version < Version::HTTP_2
            && let Some(authority) = uri.authority()
            && !authority.host().eq_ignore_ascii_case(self.authority.host())
        {
            return Err(GatewayError::ForeignTarget);
        }
        Ok(())
    }
}

/// Whether `method` is one of [`crate::base::error::ALLOWED_METHODS`].
fn forwarded(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::POST
            | Method::PUT
            | Method::PATCH
            | Method::DELETE
            | Method::OPTIONS
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn upstream(url: &str) -> Upstream {
        Upstream::new(
            &UpstreamConfig {
                url: url.into(),
                ..UpstreamConfig::default()
            },
            &Trust::load(&crate::config::TlsConfig::default()).unwrap(),
            &Egress::direct(),
            1,
        )
        .unwrap()
    }

    #[test]
    fn joins_base_path_and_keeps_query() {
        let u = upstream("https://api.example.test/prefix/");
        let uri = u
            .uri_for(&"/open/product/get?itemId=1".parse().unwrap())
            .unwrap();
        assert_eq!(
            uri.to_string(),
            "https://api.example.test/prefix/open/product/get?itemId=1"
        );
        let u = upstream("http://127.0.0.1:9");
        let uri = u.uri_for(&"/a?b=c".parse().unwrap()).unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:9/a?b=c");
    }

    #[test]
    fn the_target_is_copied_out_of_the_caller_s_head() {
        // hyper parses a target as a slice of the connection's read buffer.
        let head = bytes::Bytes::from_static(b"/open/product/get?itemId=1 HTTP/1.1");
        let target = Uri::from_maybe_shared(head.slice(..26)).unwrap();
        for base in ["http://127.0.0.1:9", "https://api.example.test/prefix"] {
            let uri = upstream(base).uri_for(&target).unwrap();
            let pq = uri.path_and_query().unwrap().as_str();
            assert!(pq.ends_with("/open/product/get?itemId=1"), "{pq}");
            assert!(
                !head.as_ptr_range().contains(&pq.as_ptr()),
                "{base}: the upstream target shares the caller's buffer"
            );
        }
    }

    #[test]
    fn refuses_connect_and_foreign_absolute_targets() {
        let u = upstream("https://api.example.test");
        let req = |m: Method, t: &str| Request::builder().method(m).uri(t).body(()).unwrap();
        assert!(matches!(
            u.check_target(&req(Method::CONNECT, "evil.test:443")),
            Err(GatewayError::Connect)
        ));
        assert!(matches!(
            u.check_target(&req(Method::GET, "http://evil.test/x")),
            Err(GatewayError::ForeignTarget)
        ));
        assert!(matches!(
            u.check_target(&req(Method::OPTIONS, "*")),
            Err(GatewayError::ForeignTarget)
        ));
        assert!(
            u.check_target(&req(Method::GET, "http://API.example.test/x"))
                .is_ok()
        );
        assert!(u.check_target(&req(Method::GET, "/x")).is_ok());
    }

    #[test]
    fn refuses_methods_that_echo_or_that_the_provider_never_uses() {
        let u = upstream("https://api.example.test");
        let req = |m: &str| {
            Request::builder()
                .method(Method::from_bytes(m.as_bytes()).unwrap())
                .uri("/open/product/get")
                .body(())
                .unwrap()
        };
        for m in [
            "TRACE", "TRACK", "DEBUG", "PROPFIND", "MOVE", "trace", "FOO",
        ] {
            assert!(
                matches!(
                    u.check_target(&req(m)),
                    Err(GatewayError::MethodNotAllowed(_))
                ),
                "{m}"
            );
        }
        for m in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
            assert!(u.check_target(&req(m)).is_ok(), "{m}");
        }
    }
}
