//! Test support: a gateway on a free loopback port with a captured access
//! log, a plain HTTP client, raw-TCP helpers and an independent signature.
#![allow(dead_code)]

pub mod finished;
pub mod provider_tls;
pub mod tinyproxy;
pub mod tls;
pub mod tls_stores;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use md5::{Digest, Md5};
use pandagate::access_log::AccessLog;
use pandagate::config::{Config, LogFormat, ProfileConfig};
use pandagate::server::{self, ServerOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

pub const ACCESS_KEY: &str = "ak-test-main";
pub const SECRET: &str = "sk-test-main-never-log-me";
pub const USER_ID: &str = "2100007341207";
pub const OPS_ACCESS_KEY: &str = "ak-test-ops";
pub const OPS_SECRET: &str = "sk-test-ops-never-log-me";

/// A config pointing at `upstream` with a default profile ("default") and a
/// selectable one ("ops", user-ids 11 and 22 allowed) plus a hidden one.
pub fn config(upstream: &str) -> Config {
    let mut c = Config::default();
    c.server.listen = ([127, 0, 0, 1], 0).into();
    c.upstream.url = upstream.to_owned();
    c.upstream.request_timeout_ms = 5_000;
    c.upstream.connect_timeout_ms = 1_000;
    c.profiles = vec![
        ProfileConfig {
            name: "default".into(),
            access_key: Some(ACCESS_KEY.into()),
            secret_env: Some("TEST_SECRET".into()),
            user_id: Some(USER_ID.into()),
            ..ProfileConfig::default()
        },
        ProfileConfig {
            name: "ops".into(),
            access_key: Some(OPS_ACCESS_KEY.into()),
            secret_env: Some("TEST_OPS_SECRET".into()),
            user_id: Some("11".into()),
            allowed_user_ids: Some(vec!["11".into(), "22".into()]),
            selectable: true,
            ..ProfileConfig::default()
        },
        ProfileConfig {
            name: "hidden".into(),
            access_key: Some("ak-hidden".into()),
            secret_env: Some("TEST_SECRET".into()),
            ..ProfileConfig::default()
        },
    ];
    c
}

fn test_env(name: &str) -> Option<String> {
    match name {
        "TEST_SECRET" => Some(SECRET.into()),
        "TEST_OPS_SECRET" => Some(OPS_SECRET.into()),
        _ => None,
    }
}

/// Bytes written by the access log, shared with the test.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub struct TestGateway {
    pub addr: SocketAddr,
    pub gateway: Arc<pandagate::gateway::Gateway>,
    log: AccessLog,
    captured: Captured,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts a gateway for `config` on a free loopback port.
pub async fn spawn_gateway(config: Config) -> TestGateway {
    spawn_gateway_with_env(config, &[]).await
}

/// Like [`spawn_gateway`], with `extra` variables in the environment the
/// config reads (besides the profiles' secrets): `HTTPS_PROXY`, say.
pub async fn spawn_gateway_with_env(config: Config, extra: &[(&str, &str)]) -> TestGateway {
    let env = |name: &str| {
        extra
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
            .or_else(|| test_env(name))
    };
    let loaded = pandagate::loaded::resolve(config, &env).expect("test config is valid");
    let captured = Captured::default();
    let (log, _writer) = AccessLog::spawn(LogFormat::Json, Box::new(captured.clone()));
    let gateway = pandagate::gateway::build(&loaded, log.clone()).expect("gateway builds");
    let handle = gateway.clone();
    let listener = server::bind(loaded.config.server.listen, "test gateway")
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(server::serve(
        listener,
        move |req| {
            let gateway = gateway.clone();
            async move { gateway.handle(req).await }
        },
        ServerOptions {
            tls: loaded.caller_tls.as_ref().map(|t| t.traffic.clone()),
            ..ServerOptions::from(&loaded.config.server)
        },
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    TestGateway {
        addr,
        gateway: handle,
        log,
        captured,
        stop,
        task,
    }
}

impl TestGateway {
    pub fn url(&self, target: &str) -> String {
        format!("http://{}{}", self.addr, target)
    }

    /// The access-log lines written so far, parsed.
    pub fn access_log(&self) -> Vec<Value> {
        self.log.flush();
        let bytes = self.captured.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).expect("each access-log line is JSON"))
            .collect()
    }

    /// Waits (bounded) until `n` lines were logged; lines are written when a
    /// response body ends, which can be a moment after the client saw it.
    pub async fn access_log_of(&self, n: usize) -> Vec<Value> {
        for _ in 0..200 {
            let lines = self.access_log();
            if lines.len() >= n {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.access_log()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }

    /// Asserts this is a gateway envelope for `status` and returns it.
    pub fn assert_gateway_envelope(&self, status: u16) -> Value {
        assert_eq!(self.status.as_u16(), status, "body: {:?}", self.body);
        let v = self.json();
        assert_eq!(v["code"], status);
        assert_eq!(v["source"], "pandagate");
        assert!(v["data"].is_null());
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()));
        let id = v["requestId"].as_str().expect("requestId is a string");
        assert_eq!(id.len(), 32);
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
        v
    }
}

/// Sends one request through a fresh plain-HTTP client.
pub async fn send(req: Request<Full<Bytes>>) -> Answer {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .expect("answer within 20 s")
        .expect("request succeeds");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body reads").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str) -> Answer {
    send(Request::get(url).body(Full::default()).unwrap()).await
}

/// Writes `raw` to `addr` and reads one response with a Content-Length body
/// (or up to the peer closing; at most 5 s).
pub async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    read_message(&mut stream).await
}

/// The signature computed here, independently of the gateway's signer, for
/// the default recipe: MD5(access-key + timestamp + nonce + secret), upper hex.
pub fn expected_signature(access_key: &str, timestamp: &str, nonce: &str, secret: &str) -> String {
    md5_upper(&format!("{access_key}{timestamp}{nonce}{secret}"))
}

pub fn md5_upper(s: &str) -> String {
    let digest = Md5::digest(s.as_bytes());
    digest.iter().map(|b| format!("{b:02X}")).collect()
}

/// A loopback address on which nothing listens.
pub fn dead_address() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A provider-shaped envelope body.
pub fn provider_body(request_id: &str, code: i64, msg: &str) -> String {
    serde_json::json!({"requestId": request_id, "code": code, "developId": "1", "msg": msg, "data": {"ok": true}})
        .to_string()
}

/// A fake upstream speaking raw HTTP/1.1: it records each request head and
/// body as text and answers every request with `response`, then closes.
pub struct RawUpstream {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    pub async fn start(response: &'static [u8]) -> RawUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let request = read_message(&mut stream).await;
                    seen.lock().unwrap().push(request);
                    let _ = stream.write_all(response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        RawUpstream {
            addr,
            received,
            task,
        }
    }

    pub fn requests(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one message head and its Content-Length body (bounded by 5 s).
pub async fn read_message(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break;
                }
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&buf).into_owned()
}

/// A fake provider answering every request with `answer`.
pub async fn upstream_answering(answer: wiremock::ResponseTemplate) -> wiremock::MockServer {
    let upstream = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::any())
        .respond_with(answer)
        .mount(&upstream)
        .await;
    upstream
}

/// A fake provider answering the first `n` requests with `first`, then `then`.
pub async fn upstream_failing_first(
    n: u64,
    first: wiremock::ResponseTemplate,
    then: wiremock::ResponseTemplate,
) -> wiremock::MockServer {
    let upstream = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::any())
        .respond_with(first)
        .up_to_n_times(n)
        .with_priority(1)
        .mount(&upstream)
        .await;
    wiremock::Mock::given(wiremock::matchers::any())
        .respond_with(then)
        .mount(&upstream)
        .await;
    upstream
}

/// A chunked upload of two 600-byte chunks (1200 bytes, no Content-Length).
pub fn chunked_upload_1200(path: &str) -> String {
    let chunk = "x".repeat(600);
    format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    )
}

/// A `redis-server` on a free loopback port, stopped when dropped. Needs the
/// Debian package `redis-server` (`.ci/run` installs it).
pub struct RedisServer {
    pub port: u16,
    child: std::process::Child,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_on(dead_address().port())
    }

    pub fn start_on(port: u16) -> RedisServer {
        Self::start_with(port, &[])
    }

    /// A server that answers only clients that `AUTH` with `password`.
    pub fn start_with_password(password: &str) -> RedisServer {
        Self::start_with(dead_address().port(), &["--requirepass", password])
    }

    fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        let mut child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server runs (install the Debian package redis-server)");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return RedisServer { port, child };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not listen on {port} within 2 s");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self) {
        signal(self.child.id(), "-STOP");
    }

    pub fn thaw(&self) {
        signal(self.child.id(), "-CONT");
    }
}

/// Sends `sig` (e.g. "-TERM") to process `pid`.
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        signal(self.child.id(), "-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real binary, serving, with its listeners known.
pub struct Running {
    pub child: tokio::process::Child,
    /// Diagnostics not yet read; kept so the pipe stays open.
    pub stderr: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    pub gateway: String,
    pub admin: String,
    /// The control listener (state-changing operator endpoints).
    pub control: String,
}

impl Running {
    /// Sends `sig` (e.g. "-TERM") to the gateway process.
    pub fn signal(&self, sig: &str) {
        signal(self.child.id().expect("still running"), sig);
    }
}

/// Starts `pandagate ARGS` with only `env` (plus free loopback ports and
/// JSON logs) and waits until both listeners are up.
pub async fn launch(args: &[&str], env: &[(&str, &str)]) -> Running {
    launch_with_stdout(args, env, std::process::Stdio::null()).await
}

/// Like [`launch`], with stdout (the access log) a pipe that is never read:
/// it stays open in `Running::child`.
pub async fn launch_stdout_unread(args: &[&str], env: &[(&str, &str)]) -> Running {
    launch_with_stdout(args, env, std::process::Stdio::piped()).await
}

async fn launch_with_stdout(
    args: &[&str],
    env: &[(&str, &str)],
    stdout: std::process::Stdio,
) -> Running {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pandagate"))
        .args(args)
        .env_clear()
        .env("PANDAGATE_LISTEN", "127.0.0.1:0")
        .env("PANDAGATE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PANDAGATE_CONTROL_LISTEN", "127.0.0.1:0")
        .env("PANDAGATE_LOG_FORMAT", "json")
        .envs(env.iter().copied())
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut gateway, mut admin, mut control) = (None, None, None);
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap();
            let addr = v["addr"].as_str().map(str::to_owned);
            match v["message"].as_str() {
                Some("gateway listening") => gateway = addr,
                Some("admin listening") => admin = addr,
                Some("control listening") => control = addr,
                _ => {}
            }
            if gateway.is_some() && admin.is_some() && control.is_some() {
                return;
            }
        }
        panic!("exited before listening");
    })
    .await;
    assert!(found.is_ok(), "listening within 20 s");
    Running {
        child,
        stderr,
        gateway: gateway.unwrap(),
        admin: admin.unwrap(),
        control: control.unwrap(),
    }
}

/// Starts the binary with `server_extra` in `[server]`, `upstream`, a local
/// push store in `dir` and a callback listener of its own, with `env`;
/// returns it with the callback listener's address.
pub async fn launch_with_callback_listener(
    dir: &std::path::Path,
    upstream: &str,
    server_extra: &str,
    env: &[(&str, &str)],
) -> (Running, SocketAddr) {
    let config = dir.join("pandagate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\n{server_extra}\n\n[upstream]\nurl = \"{upstream}\"\n\n\
             [callbacks]\nlisten = \"127.0.0.1:0\"\nstore = \"{}\"\n",
            dir.join("store").display()
        ),
    )
    .unwrap();
    let mut gw = launch(&["--config", config.to_str().unwrap()], env).await;
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = gw.stderr.next_line().await.unwrap() {
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["message"] == "callbacks listening" {
                return v["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap();
            }
        }
        panic!("exited before the callback listener was up");
    })
    .await;
    (gw, found.expect("callback listener within 10 s"))
}

/// POSTs a provider-shaped push for `order` to the gateway's callback path,
/// signed with `key` (hex HMAC-SHA256 of the body); returns the status.
pub async fn push_signed(gateway: &str, key: &str, order: &str) -> u16 {
    let (body, signature) = signed_push(key, order);
    let req = Request::post(format!("http://{gateway}/callbacks/pandapon"))
        .header("authorization", signature)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    send(req).await.status.as_u16()
}

/// A provider-shaped push for `order` and its `Authorization` (hex
/// HMAC-SHA256 of the body with `key`).
pub fn signed_push(key: &str, order: &str) -> (String, String) {
    use hmac::{KeyInit, Mac};
    let body = serde_json::json!({
        "messageType": "ORDER_CANCEL",
        "messageBody": format!(r#"{{"orderId":"{order}"}}"#),
        "messagePlatform": 0,
        "timestamp": "1715669977082",
    })
    .to_string();
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    (body, hex::encode(mac.finalize().into_bytes()))
}

/// A PostgreSQL 15 server on a free loopback port, in a temporary data
/// directory, stopped (fast shutdown) when dropped. Needs the Debian package
/// `postgresql` (`scripts/test` installs it). PostgreSQL refuses to run as
/// root, so as root it runs as the `postgres` system user.
pub struct PostgresServer {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<std::process::Child>,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn as_postgres(program: &str) -> std::process::Command {
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let path = format!("{PG_BIN}/{program}");
    if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        std::process::Command::new(path)
    }
}

impl PostgresServer {
    pub fn start() -> PostgresServer {
        let dir = tempfile::tempdir().unwrap();
        let _ = std::process::Command::new("chown")
            .args(["postgres:postgres", dir.path().to_str().unwrap()])
            .status();
        let data = dir.path().join("data");
        let ok = as_postgres("initdb")
            .args(["-A", "trust", "-U", "pandagate", "--no-sync", "-D"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("initdb runs (install the Debian package postgresql)")
            .success();
        assert!(ok, "initdb");
        let port = dead_address().port();
        let mut pg = PostgresServer {
            dir,
            port,
            child: None,
        };
        pg.resume();
        pg
    }

    /// Starts the server again on its data directory and port.
    pub fn resume(&mut self) {
        let child = as_postgres("postgres")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("postgres runs");
        self.child = Some(child);
        for _ in 0..200 {
            let ready = std::process::Command::new(format!("{PG_BIN}/pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "postgres did not accept connections on {} within 10 s",
            self.port
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://pandagate@127.0.0.1:{}/postgres", self.port)
    }

    /// Fast shutdown (SIGINT to the postmaster, through its pid file:
    /// runuser does not pass signals on), waiting for it to end.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid_file = self.dir.path().join("data").join("postmaster.pid");
        if let Some(pid) = std::fs::read_to_string(pid_file)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_owned))
        {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid])
                .status();
        }
        for _ in 0..200 {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One HTTP/1.1 request read off `stream`: its head as sent and its
/// `Content-Length` body; `None` at EOF or when the connection breaks. For
/// the stand-ins (providers, subscribers, collectors) the tests write.
pub async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> Option<(String, Vec<u8>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len = head_field(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.ok()?;
    Some((head, body))
}

/// The value of header `name` (any case) in a request head.
pub fn head_field<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// One HTTP/2 frame: type, flags, stream and payload.
pub fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A GET request's header block in HPACK, literals only.
pub fn h2_get(path: &str) -> Vec<u8> {
    // :method GET and :scheme http from the static table; :path and
    // :authority as literals without indexing, names from the static table.
    let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, 1, b'x']);
    block
}

/// A frame received: type, flags, stream, payload.
#[derive(Debug, Clone)]
pub struct H2Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// What waiting for the next frame gave.
#[derive(Debug)]
pub enum H2Read {
    Frame(H2Frame),
    /// Nothing within the time given.
    Quiet,
    /// The server closed the connection.
    Closed,
}

/// An h2c client spoken frame by frame, for what a library client would
/// not send (or not send on its own).
pub struct RawH2 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawH2 {
    /// Connects and sends the preface and a SETTINGS frame of `settings`
    /// (identifier, value).
    pub async fn connect(addr: SocketAddr, settings: &[(u16, u32)]) -> RawH2 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let payload: Vec<u8> = settings
            .iter()
            .flat_map(|(id, v)| [id.to_be_bytes().as_slice(), &v.to_be_bytes()].concat())
            .collect();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(h2_frame(0x4, 0, 0, &payload));
        stream.write_all(&hello).await.unwrap();
        RawH2 {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends `frame`; false once the server has closed the connection.
    pub async fn send(&mut self, frame: &[u8]) -> bool {
        self.stream.write_all(frame).await.is_ok()
    }

    /// The next frame, if one comes within `within`.
    pub async fn next(&mut self, within: Duration) -> H2Read {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.buf.len() >= 9 {
                let b = &self.buf;
                let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
                if b.len() >= 9 + len {
                    let frame = H2Frame {
                        kind: b[3],
                        flags: b[4],
                        stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
                        payload: b[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return H2Read::Frame(frame);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return H2Read::Quiet,
                Ok(Ok(0)) | Ok(Err(_)) => return H2Read::Closed,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}
