//! The one Redis setup, shared by the rate limiter, the idempotency store
//! and the read cache: a lazy connection manager (nothing is dialled until
//! the first command) whose connects and answers are bounded by the
//! caller's timeout, with one retry of a failed connect.
//!
//! `redis_mode` picks the topology: one server, a Redis Cluster (each key
//! sent to the node that owns its slot; keys a script takes together share
//! a hash tag), or the master a set of sentinels names, asked again when
//! its connection fails or it refuses a write as a replica. A lost master
//! or node fails the command in hand, never resends it: each section's
//! own rule decides (`fail_mode`, fail closed, a miss).
//!
//! `redis://` is plaintext. `rediss://` is TLS through the redis crate's
//! rustls support, handed the certificates of `[tls]` as its only roots:
//! the crate's own defaults (the platform store, or Mozilla's roots) are
//! never consulted. A handshake that fails is named as TLS in error texts,
//! which never show the URL's password.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use rustls::pki_types::CertificateDer;

use crate::base::redact;
use crate::config::{ConfigError, RedisMode, RedisUrl};
use crate::net::tls::WithTrust;

/// A connection to the Redis `url` names, in its mode: one server, a
/// Cluster, or the master the sentinels name. Cloned freely; commands go
/// through [`redis::aio::ConnectionLike`], so scripts and commands are the
/// same in every mode.
#[derive(Clone)]
pub enum Conn {
    /// One server, through a lazy connection manager.
    One(ConnectionManager),
    /// Redis Cluster: MOVED and ASK followed to the node that owns a key.
    Cluster(Arc<Cluster>),
    /// The master the sentinels name, asked again after a failover.
    Sentinel(Arc<SentinelMaster>),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::One(_) => "Conn::One",
            Conn::Cluster(_) => "Conn::Cluster",
            Conn::Sentinel(_) => "Conn::Sentinel",
        })
    }
}

/// A Cluster connection, made at the first command.
pub struct Cluster {
    client: redis::cluster::ClusterClient,
    conn: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
}

/// The master the sentinels name for one service, and the connection to it.
pub struct SentinelMaster {
    client: tokio::sync::Mutex<redis::sentinel::SentinelClient>,
    config: ConnectionManagerConfig,
    /// The master's connection and address; none until asked, and again
    /// after a connection error or a `READONLY` (the master moved).
    current: tokio::sync::Mutex<Option<(ConnectionManager, String)>>,
    /// The address last connected to, to log each switch once.
    last: std::sync::Mutex<Option<String>>,
}

/// A connection for `url` (lazy: nothing is dialled until the first
/// command): each connect and each answer within `timeout`. Needs a tokio
/// runtime. Errors name `key` (the section's URL key), never a password.
pub fn connect(
    url: &WithTrust<RedisUrl>,
    key: &str,
    timeout: Duration,
) -> Result<Conn, ConfigError> {
    let fail = |e: redis::RedisError| ConfigError::new(key, describe(&e, url));
    // The redis crate builds its rustls config with the process-wide
    // provider: make it `ring`, the gateway's, whatever else the dependency
    // tree may compile in. Already installed (by an earlier call): fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    match url.mode() {
        RedisMode::Standalone => {
            ConnectionManager::new_lazy_with_config(client(url).map_err(fail)?, config)
                .map(Conn::One)
                .map_err(fail)
        }
        RedisMode::Cluster => {
            let mut builder =
                redis::cluster::ClusterClientBuilder::new(url.all().collect::<Vec<_>>())
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1);
            if url.expose().starts_with("rediss://") {
                builder = builder.tls(redis::TlsMode::Secure).certs(certificates(url));
            }
            Ok(Conn::Cluster(Arc::new(Cluster {
                client: builder.build().map_err(fail)?,
                conn: tokio::sync::OnceCell::new(),
            })))
        }
        RedisMode::Sentinel => {
            let client = sentinel_client(url).map_err(fail)?;
            Ok(Conn::Sentinel(Arc::new(SentinelMaster {
                client: tokio::sync::Mutex::new(client),
                config,
                current: tokio::sync::Mutex::new(None),
                last: std::sync::Mutex::new(None),
            })))
        }
    }
}

/// A sentinel client for `url`'s master: the master is reached with the
/// username, password and TLS of the (first) URL, and the sentinels with
/// the same TLS, and the same credentials unless `redis_sentinel_auth =
/// false` (sentinels that need none refuse an `AUTH`).
fn sentinel_client(
    url: &WithTrust<RedisUrl>,
) -> redis::RedisResult<redis::sentinel::SentinelClient> {
    use redis::IntoConnectionInfo as _;
    let mut sentinels = Vec::new();
    let mut first = None;
    for u in url.all() {
        let info = u.into_connection_info()?;
        first.get_or_insert_with(|| info.clone());
        sentinels.push(info.addr().clone());
    }
    let first = first.expect("validated: at least one sentinel");
    let master = url.sentinel_master().unwrap_or_default();
    let mut builder = redis::sentinel::SentinelClientBuilder::new(
        sentinels,
        master,
        redis::sentinel::SentinelServerType::Master,
    )?;
    let redis = first.redis_settings();
    if let Some(user) = redis.username() {
        builder = builder.set_client_to_redis_username(user);
        if url.sentinel_auth() {
            builder = builder.set_client_to_sentinel_username(user);
        }
    }
    if let Some(password) = redis.password() {
        builder = builder.set_client_to_redis_password(password);
        if url.sentinel_auth() {
            builder = builder.set_client_to_sentinel_password(password);
        }
    }
    if url.expose().starts_with("rediss://") {
        builder = builder
            .set_client_to_redis_tls_mode(redis::TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(redis::TlsMode::Secure)
            .set_client_to_redis_certificates(certificates(url))
            .set_client_to_sentinel_certificates(certificates(url));
    }
    builder.build()
}

fn certificates(url: &WithTrust<RedisUrl>) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem(url.trust().certificates())),
    }
}

impl Cluster {
    async fn conn(&self) -> redis::RedisResult<redis::cluster_async::ClusterConnection> {
        self.conn
            .get_or_try_init(|| self.client.get_async_connection())
            .await
            .cloned()
    }

    /// Every master's address, from `CLUSTER SHARDS`' view of the slots.
    pub async fn masters(&self) -> redis::RedisResult<Vec<(String, u16)>> {
        let mut conn = self.conn().await?;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await?;
        Ok(nodes
            .lines()
            .filter(|l| {
                l.split(' ')
                    .nth(2)
                    .is_some_and(|f| f.contains("master") && !f.contains("fail"))
            })
            .filter_map(|l| {
                let addr = l.split(' ').nth(1)?.split('@').next()?;
                let (host, port) = addr.rsplit_once(':')?;
                Some((host.to_owned(), port.parse().ok()?))
            })
            .collect())
    }

    /// Runs `cmd` on the master at `host:port`.
    pub async fn on_node<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        host: &str,
        port: u16,
    ) -> redis::RedisResult<T> {
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let mut conn = self.conn().await?;
        let value = conn
            .route_command(
                cmd.clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.to_owned(),
                    port,
                }),
            )
            .await?;
        Ok(redis::from_redis_value(value)?)
    }
}

impl SentinelMaster {
    /// The master's connection, asking the sentinels when there is none.
    async fn conn(&self) -> redis::RedisResult<ConnectionManager> {
        let mut current = self.current.lock().await;
        if let Some((conn, _)) = &*current {
            return Ok(conn.clone());
        }
        let client = self.client.lock().await.async_get_client().await?;
        let addr = client.get_connection_info().addr().to_string();
        let conn = ConnectionManager::new_with_config(client, self.config.clone()).await?;
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() != Some(addr.as_str()) {
            if last.is_some() {
                tracing::warn!(master = %addr, "redis sentinel: the master moved; following it");
            }
            *last = Some(addr.clone());
        }
        *current = Some((conn.clone(), addr));
        Ok(conn)
    }

    /// After `e`: a connection error or a write refused by a replica means
    /// the master may have moved: the next command asks the sentinels.
    async fn after(&self, e: &redis::RedisError) {
        let moved = e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
            || e.code() == Some("READONLY");
        if moved && self.current.lock().await.take().is_some() {
            tracing::warn!(error = %e, "redis sentinel: lost the master; asking the sentinels again");
        }
    }
}

impl Conn {
    /// Redis `WAIT`: how many replicas have the writes made so far on the
    /// connection that holds `key` (waiting up to `timeout` for `replicas`
    /// of them). In a Cluster it is asked of the node that owns `key`'s slot.
    pub async fn replicas_having(
        &self,
        key: &str,
        replicas: u32,
        timeout: Duration,
    ) -> redis::RedisResult<u32> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout.as_millis().max(1) as u64);
        match self {
            Conn::Cluster(cluster) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let mut conn = cluster.conn().await?;
                let value = conn
                    .route_command(
                        wait,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                            Route::with_key(key, SlotAddr::Master),
                        )),
                    )
                    .await?;
                Ok(redis::from_redis_value(value)?)
            }
            _ => wait.query_async(&mut self.clone()).await,
        }
    }
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::One(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(cluster) => {
                Box::pin(async move { cluster.conn().await?.req_packed_command(cmd).await })
            }
            Conn::Sentinel(master) => Box::pin(async move {
                let result = master.conn().await?.req_packed_command(cmd).await;
                if let Err(e) = &result {
                    master.after(e).await;
                }
                result
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::One(conn) => conn.req_packed_commands(cmd, offset, count),
            Conn::Cluster(cluster) => Box::pin(async move {
                cluster
                    .conn()
                    .await?
                    .req_packed_commands(cmd, offset, count)
                    .await
            }),
            Conn::Sentinel(master) => Box::pin(async move {
                let result = master
                    .conn()
                    .await?
                    .req_packed_commands(cmd, offset, count)
                    .await;
                if let Err(e) = &result {
                    master.after(e).await;
                }
                result
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::One(conn) => conn.get_db(),
            _ => 0,
        }
    }
}

/// The client `url` names; over TLS, trusting exactly `url.trust()`.
fn client(url: &WithTrust<RedisUrl>) -> redis::RedisResult<redis::Client> {
    let plain = redis::Client::open(url.expose())?;
    if !matches!(
        plain.get_connection_info().addr(),
        redis::ConnectionAddr::TcpTls { .. }
    ) {
        return Ok(plain);
    }
    redis::Client::build_with_tls(url.expose(), certificates(url))
}

/// `certificates` as one PEM text, the form the redis crate takes roots in.
fn pem(certificates: &[CertificateDer<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for cert in certificates {
        out.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        let encoded = base64::engine::general_purpose::STANDARD.encode(cert);
        for line in encoded.as_bytes().chunks(64) {
            out.extend_from_slice(line);
            out.push(b'\n');
        }
        out.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    out
}

/// `e` as a log or error text: the URL's password scrubbed, and a failed
/// TLS handshake (an untrusted certificate, a name that does not match, a
/// server that does not speak TLS) said to be one.
pub fn describe(e: &redis::RedisError, url: &RedisUrl) -> String {
    let text = url
        .all()
        .fold(e.to_string(), |text, one| redact::scrub(&text, one));
    if is_tls_failure(e) {
        format!("TLS handshake with Redis failed: {text}")
    } else {
        text
    }
}

/// Whether a rustls error is among `e`'s causes. The redis crate keeps an
/// I/O error's cause behind an `Arc`, and `io::Error::source` skips the
/// error it wraps, so both are opened by hand.
fn is_tls_failure(e: &redis::RedisError) -> bool {
    let mut next = e.source();
    while let Some(cause) = next {
        let cause = match cause.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
            Some(inner) => &**inner as &(dyn std::error::Error + 'static),
            None => cause,
        };
        if cause.is::<rustls::Error>() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        next = cause.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsConfig;
    use crate::net::tls::Trust;

    #[test]
    fn the_roots_handed_to_redis_are_the_trusts_one_for_one() {
        let trust = Trust::load(&TlsConfig::default()).unwrap();
        let text = pem(trust.certificates());
        let back: Vec<CertificateDer<'static>> =
            rustls::pki_types::pem::PemObject::pem_slice_iter(&text)
                .collect::<Result<_, _>>()
                .unwrap();
        assert_eq!(back.as_slice(), trust.certificates());
    }

    #[test]
    fn a_url_is_plain_or_tls_by_its_scheme() {
        let trust = Trust::load(&TlsConfig::default()).unwrap();
        for (url, tls) in [
            ("redis://:pw@127.0.0.1:1", false),
            ("rediss://:pw@localhost:1", true),
        ] {
            let url = WithTrust::new(RedisUrl::parse(url, "k").unwrap(), trust.clone());
            let client = client(&url).unwrap();
            let is_tls = matches!(
                client.get_connection_info().addr(),
                redis::ConnectionAddr::TcpTls {
                    tls_params: Some(_),
                    ..
                }
            );
            assert_eq!(is_tls, tls, "{url:?}");
        }
    }

    #[test]
    fn an_error_text_never_shows_the_password() {
        let url = RedisUrl::parse("rediss://:pw-in-url-4@localhost:1", "k").unwrap();
        let e = redis::RedisError::from((
            redis::ErrorKind::Io,
            "failed",
            "rediss://:pw-in-url-4@localhost:1 refused".to_owned(),
        ));
        let text = describe(&e, &url);
        assert!(!text.contains("pw-in-url-4"), "{text}");
        assert!(!text.contains("TLS"), "not a handshake: {text}");
        let tls = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        let text = describe(&tls, &url);
        assert!(text.starts_with("TLS handshake"), "{text}");
    }
}
