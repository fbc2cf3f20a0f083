//! How the gateway reaches the provider: directly, or through an HTTP
//! egress proxy.
//!
//! The proxy is `upstream.proxy`; when that is unset, the environment's
//! `https_proxy`/`HTTPS_PROXY` (for an `http://` upstream,
//! `http_proxy`/`HTTP_PROXY`), the lower-case name first, as curl reads
//! them; and `no_proxy`/`NO_PROXY` exempts the provider from either (curl's
//! rules, through hyper-util's [`Matcher`]). `upstream.proxy = "none"` turns
//! the proxy off whatever the environment says. `ALL_PROXY` is not read.
//! Unlike curl, upper-case `HTTP_PROXY` is read too: curl skips it because
//! a CGI program's environment holds the caller's headers (httpoxy), and
//! the gateway's never does. As for curl, loopback hosts are not exempt: a
//! local `http://` sandbox with `http_proxy` set needs `NO_PROXY=localhost`.
//!
//! For an `https://` provider the proxy is asked to `CONNECT` to it and TLS
//! runs inside the tunnel, so the proxy sees the host and port, never a
//! call; for an `http://` one each request goes to the proxy in absolute
//! form. Credentials in the proxy's URL become a `Proxy-Authorization:
//! Basic` header, marked sensitive, and are never shown: [`Egress`]
//! displays the URL redacted.
//!
//! [`Within`] bounds the whole connection — TCP, `CONNECT` and the TLS
//! handshake above it — by `upstream.connect_timeout_ms`.
//!
//! Subscribers are reached directly, never through the proxy: they are
//! internal services, which an egress proxy usually cannot reach, and
//! routing them through one because an `HTTPS_PROXY` happened to be set
//! would change where deliveries go.
//!
//! ```
//! use pandagate::config::UpstreamConfig;
//! use pandagate::egress::Egress;
//!
//! let env = |name: &str| (name == "HTTPS_PROXY").then(|| "http://gw:pw@proxy.corp:3128".to_owned());
//! let egress = Egress::resolve(&UpstreamConfig::default(), &env).unwrap();
//! assert_eq!(
//!     egress.to_string(),
//!     "through the proxy http://gw:<redacted>@proxy.corp:3128 (from HTTPS_PROXY)"
//! );
//! ```

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tower_service::Service;

use crate::config::{ConfigError, Env, PROXY_NONE, UpstreamConfig, proxy_url};

/// The proxy calls to the provider go through.
#[derive(Clone)]
pub struct EgressProxy {
    /// `http://host:port/`, without credentials.
    uri: Uri,
    /// `Basic …` from the URL's credentials, marked sensitive.
    authorization: Option<HeaderValue>,
    /// The URL, credentials redacted.
    shown: String,
}

impl fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressProxy")
            .field("url", &self.shown)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl EgressProxy {
    /// The proxy's `host:port`, for messages.
    pub fn authority(&self) -> &str {
        self.uri.authority().map_or("", |a| a.as_str())
    }

    /// `Proxy-Authorization` for the proxy, when its URL has credentials;
    /// marked sensitive.
    pub fn authorization(&self) -> Option<&HeaderValue> {
        self.authorization.as_ref()
    }
}

/// Why calls to the provider go where they go.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Why {
    /// No proxy set anywhere.
    Unset,
    /// `upstream.proxy = "none"`.
    Off,
    /// A proxy is set, and this variable lists the provider's host.
    Exempt(&'static str),
    /// The proxy comes from this key or variable.
    From(&'static str),
}

/// The way to the provider: a proxy or none, and why.
#[derive(Clone, Debug)]
pub struct Egress {
    proxy: Option<EgressProxy>,
    why: Why,
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.proxy, &self.why) {
            (Some(p), Why::From(source)) => {
                write!(f, "through the proxy {} (from {source})", p.shown)
            }
            (_, Why::Exempt(var)) => write!(f, "direct ({var} exempts the provider's host)"),
            (_, Why::Off) => f.write_str("direct (upstream.proxy = \"none\")"),
            _ => f.write_str("direct (no proxy set)"),
        }
    }
}

impl Egress {
    /// Straight to the provider.
    pub fn direct() -> Egress {
        Egress {
            proxy: None,
            why: Why::Unset,
        }
    }

    /// The way to `cfg.url`: `cfg.proxy`, else the environment's, minus
    /// `NO_PROXY`. A proxy URL that cannot be used is an error naming its
    /// key or variable, with its credentials redacted.
    pub fn resolve(cfg: &UpstreamConfig, env: Env<'_>) -> Result<Egress, ConfigError> {
        let upstream: Uri = cfg
            .url
            .parse()
            .map_err(|_| ConfigError::new("upstream.url", "not a URL"))?;
        let https = upstream.scheme_str() == Some("https");
        let (key, given) = match cfg.proxy.as_deref() {
            Some(PROXY_NONE) => {
                return Ok(Egress {
                    proxy: None,
                    why: Why::Off,
                });
            }
            Some(url) => ("upstream.proxy", url.to_owned()),
            None => {
                let names = if https {
                    ["https_proxy", "HTTPS_PROXY"]
                } else {
                    ["http_proxy", "HTTP_PROXY"]
                };
                match first_set(env, names) {
                    Some((name, value)) => (name, value),
                    None => return Ok(Egress::direct()),
                }
            }
        };
        // Set but empty: no proxy, as for curl.
        if given.trim().is_empty() {
            return Ok(Egress::direct());
        }
        let url = proxy_url(&given).map_err(|m| ConfigError::new(key, m))?;
        let (no_var, no_list) =
            first_set(env, ["no_proxy", "NO_PROXY"]).unwrap_or(("", String::new()));
        let matcher = Matcher::builder()
            .http(url.as_str())
            .https(url.as_str())
            .no(no_list)
            .build();
        let Some(intercept) = matcher.intercept(&upstream) else {
            return Ok(Egress {
                proxy: None,
                why: Why::Exempt(no_var),
            });
        };
        let authorization = intercept.basic_auth().cloned().map(|mut v| {
            v.set_sensitive(true);
            v
        });
        Ok(Egress {
            proxy: Some(EgressProxy {
                uri: intercept.uri().clone(),
                authorization,
                shown: crate::base::redact::url(&url).into_owned(),
            }),
            why: Why::From(key),
        })
    }

    /// The proxy in use, if any.
    pub fn proxy(&self) -> Option<&EgressProxy> {
        self.proxy.as_ref()
    }
}

/// The first of `names` that is set, and its value.
fn first_set<const N: usize>(
    env: Env<'_>,
    names: [&'static str; N],
) -> Option<(&'static str, String)> {
    names.into_iter().find_map(|n| env(n).map(|v| (n, v)))
}

/// The proxy failed to open a way to the provider: nothing was sent.
#[derive(Debug, thiserror::Error)]
#[error("egress proxy {proxy}: {detail}")]
pub struct ProxyError {
    /// The proxy's `host:port`.
    pub proxy: String,
    /// What went wrong, from the tunnel's error and its sources (none of
    /// which quotes a header).
    pub detail: String,
}

impl ProxyError {
    fn new(proxy: &str, error: &(dyn Error + 'static)) -> ProxyError {
        let mut detail = error.to_string();
        let mut next = error.source();
        for _ in 0..8 {
            let Some(e) = next else { break };
            detail.push_str(": ");
            detail.push_str(&e.to_string());
            next = e.source();
        }
        ProxyError {
            proxy: proxy.to_owned(),
            detail,
        }
    }
}

/// The proxy failure behind a connection error, if that is what it was.
pub fn failure<'a>(error: &'a (dyn Error + 'static)) -> Option<&'a ProxyError> {
    let mut next = Some(error);
    for _ in 0..32 {
        let e = next?;
        if let Some(p) = e.downcast_ref::<ProxyError>() {
            return Some(p);
        }
        next = e.source();
    }
    None
}

type BoxError = Box<dyn Error + Send + Sync>;

/// A connector that goes to the provider the [`Egress`] way: straight, or
/// to the proxy (a `CONNECT` tunnel for `https://` destinations, the bare
/// connection for `http://` ones, marked as proxied so that the client
/// writes absolute-form requests).
#[derive(Clone, Debug)]
pub struct Connector {
    http: HttpConnector,
    via: Option<Via>,
}

#[derive(Clone, Debug)]
struct Via {
    proxy: Uri,
    tunnel: Tunnel<HttpConnector>,
    /// The proxy's `host:port`, for errors.
    shown: Arc<str>,
}

impl Connector {
    /// `http` is used for every TCP connection, to the provider or to the
    /// proxy; it must not enforce the `http` scheme.
    pub fn new(http: HttpConnector, egress: &Egress) -> Connector {
        let via = egress.proxy.as_ref().map(|p| {
            let mut tunnel = Tunnel::new(p.uri.clone(), http.clone());
            if let Some(auth) = &p.authorization {
                tunnel = tunnel.with_auth(auth.clone());
            }
            Via {
                proxy: p.uri.clone(),
                tunnel,
                shown: p.authority().into(),
            }
        });
        Connector { http, via }
    }
}

impl Service<Uri> for Connector {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // HttpConnector and Tunnel over it are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let Some(via) = &self.via else {
            let connecting = self.http.call(dst);
            return Box::pin(async move {
                let io = connecting.await?;
                Ok(Stream { io, proxied: false })
            });
        };
        let shown = via.shown.clone();
        let tunnelled = dst.scheme_str() != Some("http");
        let connecting: Pin<Box<dyn Future<Output = Result<_, BoxError>> + Send>> = if tunnelled {
            let f = via.tunnel.clone().call(dst);
            Box::pin(async move { f.await.map_err(BoxError::from) })
        } else {
            let f = self.http.call(via.proxy.clone());
            Box::pin(async move { f.await.map_err(BoxError::from) })
        };
        Box::pin(async move {
            let io = connecting.await.map_err(|e| ProxyError::new(&shown, &*e))?;
            Ok(Stream {
                io,
                proxied: !tunnelled,
            })
        })
    }
}

/// A connector whose connections must be ready within `limit`: TCP, the
/// proxy's `CONNECT` and the TLS handshake together. Past it nothing was
/// sent, so it is a connect failure, which any call may retry; left to the
/// attempt's timeout, a handshake that hangs would count as a call that
/// may have reached the provider.
#[derive(Clone, Debug)]
pub struct Within<C> {
    inner: C,
    limit: Duration,
}

impl<C> Within<C> {
    pub fn new(inner: C, limit: Duration) -> Within<C> {
        Within { inner, limit }
    }
}

/// No connection within the connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("no connection within {0} ms")]
pub struct ConnectTimedOut(u128);

impl<C> Service<Uri> for Within<C>
where
    C: Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let (connecting, limit) = (self.inner.call(dst), self.limit);
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(connected) => connected.map_err(Into::into),
                Err(_) => Err(ConnectTimedOut(limit.as_millis()).into()),
            }
        })
    }
}

/// A connection to the provider, or to the proxy in its place.
#[derive(Debug)]
pub struct Stream {
    io: TokioIo<TcpStream>,
    /// Requests on it go in absolute form, to the proxy.
    proxied: bool,
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.proxied)
    }
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::env_of;

    fn upstream(url: &str, proxy: Option<&str>) -> UpstreamConfig {
        UpstreamConfig {
            url: url.into(),
            proxy: proxy.map(str::to_owned),
            ..UpstreamConfig::default()
        }
    }

    fn shown(cfg: &UpstreamConfig, env: &[(&str, &str)]) -> String {
        Egress::resolve(cfg, &env_of(env)).unwrap().to_string()
    }

    #[test]
    fn the_environment_is_read_as_curl_reads_it() {
        let https = upstream("https://api.example.test", None);
        let http = upstream("http://sandbox.example.test", None);
        assert_eq!(shown(&https, &[]), "direct (no proxy set)");
        // Lower case first.
        assert_eq!(
            shown(
                &https,
                &[("HTTPS_PROXY", "http://u:1"), ("https_proxy", "l:2")]
            ),
            "through the proxy http://l:2 (from https_proxy)"
        );
        assert_eq!(
            shown(&https, &[("HTTPS_PROXY", "proxy.corp")]),
            "through the proxy http://proxy.corp:1080 (from HTTPS_PROXY)"
        );
        // Each scheme its own variable.
        assert_eq!(
            shown(&https, &[("HTTP_PROXY", "http://p:1")]),
            "direct (no proxy set)"
        );
        assert_eq!(
            shown(&http, &[("HTTP_PROXY", "http://p:1")]),
            "through the proxy http://p:1 (from HTTP_PROXY)"
        );
        // Set and empty: none.
        assert_eq!(
            shown(
                &https,
                &[("https_proxy", ""), ("HTTPS_PROXY", "http://p:1")]
            ),
            "direct (no proxy set)"
        );
    }

    #[test]
    fn no_proxy_exempts_the_provider_from_either_proxy() {
        let env_proxy = upstream("https://api.example.test", None);
        let set = upstream("https://api.example.test", Some("http://p:3128"));
        for no in [
            "example.test",
            ".example.test",
            "api.example.test, other",
            "*",
        ] {
            for cfg in [&env_proxy, &set] {
                let env = [("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", no)];
                assert_eq!(
                    shown(cfg, &env),
                    "direct (NO_PROXY exempts the provider's host)",
                    "{no}"
                );
            }
        }
        let env = [
            ("HTTPS_PROXY", "http://p:1"),
            ("no_proxy", "other.test,10.0.0.0/8"),
        ];
        assert!(shown(&env_proxy, &env).starts_with("through the proxy"));
        let ip = upstream("https://10.1.2.3:8443", None);
        assert_eq!(
            shown(&ip, &env),
            "direct (no_proxy exempts the provider's host)"
        );
    }

    #[test]
    fn the_config_wins_and_none_turns_the_proxy_off() {
        let env = [("HTTPS_PROXY", "http://env:1")];
        let set = upstream("https://api.example.test", Some("http://cfg:2"));
        assert_eq!(
            shown(&set, &env),
            "through the proxy http://cfg:2 (from upstream.proxy)"
        );
        let off = upstream("https://api.example.test", Some("none"));
        assert_eq!(shown(&off, &env), "direct (upstream.proxy = \"none\")");
    }

    #[test]
    fn credentials_become_a_sensitive_header_and_are_never_shown() {
        let cfg = upstream("https://api.example.test", None);
        let env = env_of(&[("https_proxy", "http://gw:pr%40xy-pw@p:3128")]);
        let egress = Egress::resolve(&cfg, &env).unwrap();
        let proxy = egress.proxy().unwrap();
        let auth = proxy.authorization.as_ref().unwrap();
        assert!(auth.is_sensitive());
        // base64("gw:pr@xy-pw")
        assert_eq!(auth, "Basic Z3c6cHJAeHktcHc=");
        assert_eq!(proxy.uri, "http://p:3128/");
        for text in [egress.to_string(), format!("{egress:?}")] {
            assert!(!text.contains("xy-pw") && !text.contains("Z3c6"), "{text}");
        }
    }

    #[test]
    fn a_proxy_that_cannot_be_used_is_named_without_its_password() {
        let cfg = upstream("https://api.example.test", None);
        for (var, value) in [
            ("HTTPS_PROXY", "https://u:pw-1@p:3128"),
            ("https_proxy", "socks5://u:pw-2@p:1080"),
            ("HTTPS_PROXY", "http://u:pw-3@p:3128/path"),
            ("HTTPS_PROXY", "http://u:pw-4@:3128"),
            ("HTTPS_PROXY", "http://u:pw-5@p:notaport"),
        ] {
            let e = Egress::resolve(&cfg, &env_of(&[(var, value)])).unwrap_err();
            assert_eq!(e.key, var, "{value}: {e}");
            assert!(!e.to_string().contains("pw-"), "{e}");
        }
        let set = upstream("https://api.example.test", Some("https://u:pw-6@p:1"));
        let e = Egress::resolve(&set, &env_of(&[])).unwrap_err();
        assert_eq!(e.key, "upstream.proxy");
        assert!(!e.to_string().contains("pw-6"), "{e}");
    }
}
