//! The gateway under test, in this process: the test config (profiles and
//! their credentials), a gateway serving it on a free loopback port, and
//! its access log captured for the test to read.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pandagate::access_log::AccessLog;
use pandagate::config::{Config, LogFormat, ProfileConfig};
use pandagate::server::{self, ServerOptions};
use serde_json::Value;
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
    let lasting = pandagate::gateway::Lasting::open(&loaded, log.clone()).expect("stores open");
    let gateway =
        Arc::new(pandagate::gateway::Gateway::new(&loaded, lasting).expect("gateway builds"));
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

/// Calls `path` from `workers` tasks against each gateway until `run`
/// passes; returns how many were answered 200.
pub async fn hammer(gateways: &[&TestGateway], workers: usize, run: Duration, path: &str) -> usize {
    let until = std::time::Instant::now() + run;
    let mut tasks = Vec::new();
    for gw in gateways {
        for _ in 0..workers {
            let url = gw.url(path);
            tasks.push(tokio::spawn(async move {
                let mut ok = 0;
                while std::time::Instant::now() < until {
                    if super::client::get(&url).await.status == 200 {
                        ok += 1;
                    }
                }
                ok
            }));
        }
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    ok
}
