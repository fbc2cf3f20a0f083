//! The serving process, assembled in one place: the gateway (swapped whole
//! on reload), the push receiver and its delivery loop, three listeners,
//! the signals, SIGHUP reloads and the secret-file watcher.
//!
//! ```text
//!                 ┌─────────── App ───────────────────────────────────────┐
//! callers ──────► │ gateway listener ──► Gateway (current, via ArcSwap)   │
//!                 │        └─ callbacks.path ──► Callbacks::receive       │
//! provider ─────► │ callback listener (optional) ──► Callbacks::receive   │
//! kubelet, ─────► │ admin listener ──► Admin (health, readiness, metrics) │
//! Prometheus      │ signals: TERM/INT drain, a second exits; HUP reloads  │
//!                 │ secret files polled; deliveries to subscribers        │
//!                 └───────────────────────────────────────────────────────┘
//! ```
//!
//! Each listener has its own connection cap, so a flood on one (the
//! internet-facing callback listener, say) leaves the others, and the
//! health checks on the admin listener, answering. The admin listener
//! outlives the traffic listener, so readiness reports the drain while
//! calls finish.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::callbacks::{Backend, Callbacks};
use crate::config::{ConfigError, process_env};
use crate::gateway::{Gateway, Lasting};
use crate::net::caller_tls::CallerTls;
use crate::net::connections::Connections;
use crate::net::server::{self, ServerOptions};
use crate::observe::access_log::AccessLog;
use crate::observe::log_queue::LogQueue;
use crate::policy::loaded::Loaded;
use crate::process::admin::{Admin, Control, Drain};
use crate::process::exporter::Process;
use crate::process::reload::{self, Reloader};
use crate::state::idempotency::{self, LocalStore, Store};
use crate::{net::worker, observe::diagnostics};

/// Longest an access-log line waits in its worker's batch before the
/// batch goes to the writer (which writes within another 20 ms).
const ACCESS_LOG_HAND_OVER: Duration = Duration::from_millis(10);

/// How long logs get to reach their readers on the way out.
pub const EXIT_FLUSH: Duration = Duration::from_secs(2);

/// Why the process could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}{what}: {source}")]
    Listen {
        addr: SocketAddr,
        /// `""` for the traffic listener, else ` (admin)`, ` (control)`,
        /// ` (callbacks)`.
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot watch signals: {0}")]
    Signals(std::io::Error),
    #[error("cannot start a serving thread: {0}")]
    Worker(std::io::Error),
}

/// How often the local idempotency store drops expired keys, and how
/// many it removes per write transaction (keyed calls wait for at most one).
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const SWEEP_BATCH: usize = 1_000;

/// Removes expired keys from the local idempotency store, forever. They
/// already read as vacant; this keeps the file from growing.
async fn sweep_expired_keys(store: LocalStore) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        match store.sweep(idempotency::now_ms(), SWEEP_BATCH).await {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "idempotency: expired keys removed"),
            Err(e) => tracing::warn!(error = %e, "idempotency: sweeping expired keys failed"),
        }
    }
}

/// Everything the process serves with.
pub struct App {
    loaded: Loaded,
    config_path: Option<PathBuf>,
    /// Outlives config reloads; the gateway itself is swapped whole.
    lasting: Lasting,
    current: reload::Current,
    callbacks: Option<Arc<Callbacks>>,
}

/// The bound listeners: the traffic and callback listeners once per
/// serving thread (`SO_REUSEPORT`), the admin listener once.
struct Listeners {
    gateway: Vec<std::net::TcpListener>,
    admin: TcpListener,
    control: TcpListener,
    callbacks: Option<Vec<std::net::TcpListener>>,
}

/// What every serving thread serves with: all of it shared.
#[derive(Clone)]
struct Serving {
    current: reload::Current,
    callbacks: Option<Arc<Callbacks>>,
    opts: ServerOptions,
    /// TLS of the traffic and callback listeners, with `server.tls_cert_file`.
    tls: Option<Arc<CallerTls>>,
    gateway_conns: Arc<Connections>,
    callback_conns: Option<Arc<Connections>>,
    drain: Drain,
}

impl App {
    /// Builds the gateway and, with `[callbacks]`, opens the message store
    /// (connecting to PostgreSQL with `backend = "postgres"`, its schema made
    /// current) and starts delivering. Binds nothing.
    pub async fn build(loaded: Loaded, config_path: Option<PathBuf>) -> Result<App, StartError> {
        let log_config = &loaded.config.log;
        let format = diagnostics::resolve_format(log_config.format);
        let (log, _writer) = AccessLog::spawn_with_queue(
            format,
            Box::new(std::io::stdout()),
            log_config.queue_lines,
        );
        // Opened once and handed from each config to the next on SIGHUP:
        // the idempotency store (a local one is a file only one process may
        // hold), the trace exporter's thread, the read cache, and one budget
        // for the bodies being read by every listener and thread.
        let lasting = Lasting::open(&loaded, log)?;
        if let Some(idempotency) = &lasting.idempotency
            && let Store::Local(local) = idempotency.store()
        {
            tokio::spawn(sweep_expired_keys(local.clone()));
        }
        let gateway = Gateway::new(&loaded, lasting.clone())?;
        let current: reload::Current = Arc::new(ArcSwap::from_pointee(gateway));
        // The store is a file only one process may hold: opened once, its
        // settings taken at start, not on SIGHUP. The secret that verifies a
        // push is looked up in the running config at each push, so reloads
        // and rotations apply at once.
        let callbacks = match &loaded.config.callbacks {
            None => None,
            Some(c) => {
                let store = Backend::open(c, loaded.callbacks_postgres_url.as_ref()).await?;
                let cb = Callbacks::with_secret_source(
                    c.clone(),
                    reload::profile_secret(current.clone(), &c.profile),
                    Duration::from_millis(loaded.config.server.body_read_timeout_ms),
                    lasting.bodies.clone(),
                    store,
                    lasting.traces.clone(),
                )?;
                tokio::spawn(cb.clone().run_deliveries(loaded.tls.clone()));
                Some(cb)
            }
        };
        Ok(App {
            loaded,
            config_path,
            lasting,
            current,
            callbacks,
        })
    }

    /// Binds the listeners and serves until a signal (or `/quitquitquit`)
    /// drains the traffic listeners; then the admin listener stops too.
    /// Calls are served by the worker threads, everything else by the
    /// runtime this runs on.
    pub async fn serve(self) -> Result<(), StartError> {
        let listeners = self.bind().await?;
        let drain = Drain::default();
        self.watch_signals(drain.clone())?;
        let reloader = self.reloader();
        self.watch_reloads(&reloader);

        let server_config = &self.loaded.config.server;
        let opts = ServerOptions::from(server_config);
        let cap = server_config.max_connections;
        let gateway_conns = Connections::new("gateway", cap);
        let admin_conns = Connections::new("admin", cap);
        let control_conns = Connections::new("control", cap);
        let callback_conns = listeners
            .callbacks
            .as_ref()
            .map(|_| Connections::new("callbacks", cap));
        let mut counted = vec![
            gateway_conns.clone(),
            admin_conns.clone(),
            control_conns.clone(),
        ];
        counted.extend(callback_conns.clone());

        // The operator listeners outlive the traffic ones: readiness says
        // "draining" while calls finish.
        let (traffic_done, operators_stop) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut stop = operators_stop.clone();
            async move {
                let _ = stop.wait_for(|done| *done).await;
            }
        };
        // The status page shows the actions at the address the control
        // listener got (port 0 picks one).
        let control_addr = listeners
            .control
            .local_addr()
            .unwrap_or(self.loaded.config.server.control_listen);
        let admin = self.admin(drain.clone(), counted, control_addr);
        let admin_task = tokio::spawn(server::serve_counted(
            listeners.admin,
            move |req| {
                let admin = admin.clone();
                async move { admin.handle(req).await }
            },
            opts.clone(),
            admin_conns,
            stopped(),
        ));
        let control = Arc::new(self.control(drain.clone(), reloader));
        let control_task = tokio::spawn(server::serve_counted(
            listeners.control,
            move |req| {
                let control = control.clone();
                async move { control.handle(req).await }
            },
            opts.clone(),
            control_conns,
            stopped(),
        ));
        let tls = self.loaded.caller_tls.clone();
        if let Some(tls) = &tls {
            tokio::spawn(
                tls.served
                    .clone()
                    .watch(Duration::from_millis(server_config.secret_poll_ms)),
            );
        }
        let serving = Serving {
            current: self.current.clone(),
            callbacks: self.callbacks.clone(),
            opts,
            tls,
            gateway_conns,
            callback_conns,
            drain,
        };
        let workers = serving.start(listeners.gateway, listeners.callbacks)?;
        tracing::info!(
            upstream = %crate::base::redact::url(&self.loaded.config.upstream.url),
            profiles = self.loaded.profiles.len(),
            default_profile = %self.loaded.config.default_profile,
            workers = workers.len(),
            "gateway ready"
        );
        for finished in workers {
            let _ = finished.await;
        }
        let _ = traffic_done.send(true);
        let _ = admin_task.await;
        let _ = control_task.await;
        if let Some(traces) = &self.lasting.traces {
            // Sends what is queued; bounded by telemetry.export_timeout_ms.
            let traces = traces.clone();
            let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
        }
        self.lasting.access_log.flush_within(EXIT_FLUSH);
        Ok(())
    }

    async fn bind(&self) -> Result<Listeners, StartError> {
        let s = &self.loaded.config.server;
        let workers = worker::count(s.worker_threads);
        let shared = |addr: SocketAddr, what: &'static str, name: &'static str| {
            server::bind_shared(addr, workers, name).map_err(|source| StartError::Listen {
                addr,
                what,
                source,
            })
        };
        let gateway = shared(s.listen, "", "gateway")?;
        let one = |addr: SocketAddr, what: &'static str, name: &'static str| async move {
            server::bind(addr, name)
                .await
                .map_err(|source| StartError::Listen { addr, what, source })
        };
        let admin = one(s.admin_listen, " (admin)", "admin").await?;
        let control = one(s.control_listen, " (control)", "control").await?;
        let callbacks = match (&self.callbacks, self.callback_listen()) {
            (Some(_), Some(addr)) => Some(shared(addr, " (callbacks)", "callbacks")?),
            _ => None,
        };
        Ok(Listeners {
            gateway,
            admin,
            control,
            callbacks,
        })
    }

    fn callback_listen(&self) -> Option<SocketAddr> {
        self.loaded.config.callbacks.as_ref().and_then(|c| c.listen)
    }

    /// The first SIGTERM/SIGINT drains; a second one exits at once.
    fn watch_signals(&self, drain: Drain) -> Result<(), StartError> {
        let mut signals = server::Signals::new().map_err(StartError::Signals)?;
        let log = self.lasting.access_log.clone();
        tokio::spawn(async move {
            loop {
                let name = signals.recv().await;
                if !drain.start(name) {
                    tracing::warn!(signal = name, "second signal: exiting without waiting");
                    log.flush_within(EXIT_FLUSH);
                    diagnostics::flush_within(EXIT_FLUSH);
                    std::process::exit(1);
                }
            }
        });
        Ok(())
    }

    /// Secret and token files are re-read on their own; the config is
    /// reloaded on SIGHUP and when its file changes (and on `POST /reload`,
    /// through the control listener).
    fn watch_reloads(&self, reloader: &Arc<Reloader>) {
        let server = &self.loaded.config.server;
        tokio::spawn(reload::watch_secret_files(
            self.current.clone(),
            self.lasting.metrics.clone(),
            Duration::from_millis(server.secret_poll_ms),
        ));
        tokio::spawn(reload::watch_config_file(
            reloader.clone(),
            Duration::from_millis(server.config_poll_ms),
        ));
        let hangup = tokio::signal::unix::SignalKind::hangup();
        let mut hangups = match tokio::signal::unix::signal(hangup) {
            Ok(hangups) => hangups,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGHUP; reload by POST /reload or the file");
                return;
            }
        };
        let reloader = reloader.clone();
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                let reloader = reloader.clone();
                let _ = tokio::task::spawn_blocking(move || reloader.reload("SIGHUP")).await;
            }
        });
    }

    fn reloader(&self) -> Arc<Reloader> {
        Arc::new(Reloader::new(
            self.config_path.clone(),
            process_env,
            self.current.clone(),
            self.callbacks.as_ref().map(|cb| cb.profile().to_owned()),
            &self.loaded.config,
        ))
    }

    fn control(&self, drain: Drain, reloader: Arc<Reloader>) -> Control {
        let current = self.current.clone();
        Control::new(
            Arc::new(move || current.load_full()),
            drain,
            self.callbacks.clone(),
            self.loaded.control_token.clone(),
        )
        .with_reloader(reloader)
    }

    fn admin(
        &self,
        drain: Drain,
        listeners: Vec<Arc<Connections>>,
        control: SocketAddr,
    ) -> Arc<Admin> {
        let current = self.current.clone();
        Arc::new(
            Admin::new(
                Arc::new(move || current.load_full()),
                drain,
                Process {
                    callbacks: self.callbacks.clone(),
                    listeners,
                    diagnostics_dropped: Some(diagnostics::dropped),
                },
            )
            .with_control(control, self.loaded.control_token.is_some()),
        )
    }
}

impl Serving {
    /// Starts a serving thread per gateway listener, each with its own
    /// single-threaded runtime, its gateway listener and its share of the
    /// callback listeners. Each receiver completes when its thread has
    /// drained.
    fn start(
        self,
        gateway: Vec<std::net::TcpListener>,
        callbacks: Option<Vec<std::net::TcpListener>>,
    ) -> Result<Vec<oneshot::Receiver<()>>, StartError> {
        let mut callbacks = callbacks.map(Vec::into_iter);
        gateway
            .into_iter()
            .enumerate()
            .map(|(index, listener)| {
                let pushes = callbacks.as_mut().and_then(Iterator::next);
                self.clone()
                    .start_one(index, listener, pushes)
                    .map_err(StartError::Worker)
            })
            .collect()
    }

    fn start_one(
        self,
        index: usize,
        gateway: std::net::TcpListener,
        callbacks: Option<std::net::TcpListener>,
    ) -> std::io::Result<oneshot::Receiver<()>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Taken into this thread's runtime here, so a failure stops the start.
        let (gateway, callbacks) = {
            let _entered = runtime.enter();
            let callbacks = callbacks.map(TcpListener::from_std).transpose()?;
            (TcpListener::from_std(gateway)?, callbacks)
        };
        let (finished, done) = oneshot::channel();
        std::thread::Builder::new()
            // Linux keeps 15 bytes of a thread name: "worker-0" stays whole.
            .name(format!("worker-{index}"))
            .spawn(move || {
                worker::enter(index);
                // Access-log lines are batched per worker, handed to the
                // writer by size or every ACCESS_LOG_HAND_OVER.
                self.current
                    .load()
                    .lasting()
                    .access_log
                    .batch_on_this_thread();
                runtime.block_on(async {
                    let ticker = tokio::spawn(LogQueue::hand_over_every(ACCESS_LOG_HAND_OVER));
                    self.run(gateway, callbacks).await;
                    ticker.abort();
                });
                // Connections still open after the grace period end here,
                // each writing its line; then the batch goes to the writer.
                drop(runtime);
                LogQueue::hand_over_this_thread();
                let _ = finished.send(());
            })?;
        Ok(done)
    }

    /// One thread's listeners, until the drain starts and its connections
    /// have finished (or the grace period is over).
    async fn run(self, gateway: TcpListener, callbacks: Option<TcpListener>) {
        let pushes = match (
            callbacks,
            self.callback_conns.clone(),
            self.callbacks.clone(),
        ) {
            (Some(listener), Some(conns), Some(cb)) => {
                let drain = self.drain.clone();
                Some(tokio::spawn(server::serve_counted(
                    listener,
                    move |req| {
                        let cb = cb.clone();
                        async move { cb.receive(req).await }
                    },
                    // The provider pushes one message per request: HTTP/1.1
                    // is all it needs, and no peer gets a hundred streams
                    // on the internet-facing listener.
                    ServerOptions {
                        http1_only: true,
                        tls: self.tls.as_ref().map(|t| t.callbacks.clone()),
                        ..self.opts.clone()
                    },
                    conns,
                    async move { drain.started().await },
                )))
            }
            _ => None,
        };
        // Keyed calls whose callers left still run after their connections
        // closed: they get what is left of the grace period to keep their
        // answers, so a restart does not turn them into unknown outcomes.
        let drain = self.drain.clone();
        let grace = self.opts.shutdown_grace;
        let deadline = tokio::spawn(async move {
            drain.started().await;
            tokio::time::Instant::now() + grace
        });
        self.serve_traffic(gateway).await;
        if let Some(pushes) = pushes {
            let _ = pushes.await;
        }
        let idempotency = self.current.load().lasting().idempotency.clone();
        if let Some(idempotency) = idempotency {
            let until = deadline
                .await
                .unwrap_or_else(|_| tokio::time::Instant::now());
            if !idempotency.settled(until).await {
                tracing::warn!(
                    "keyed calls still running at exit: their keys read as an unknown outcome once their lease passes"
                );
            }
        }
    }

    /// The traffic listener, until the drain starts: each call is served
    /// by the gateway current when it arrived, to its end; pushes on the
    /// callback path go to the receiver, which has its own authentication
    /// (the provider's HMAC).
    async fn serve_traffic(&self, listener: TcpListener) {
        let (current, callbacks) = (self.current.clone(), self.callbacks.clone());
        server::serve_counted(
            listener,
            move |req| {
                let callback = callbacks
                    .as_ref()
                    .filter(|cb| req.uri().path() == cb.path())
                    .cloned();
                let gateway = current.load_full();
                async move {
                    match callback {
                        Some(cb) => cb.receive(req).await,
                        None => gateway.handle(req).await,
                    }
                }
            },
            ServerOptions {
                tls: self.tls.as_ref().map(|t| t.traffic.clone()),
                ..self.opts.clone()
            },
            self.gateway_conns.clone(),
            self.drain.started(),
        )
        .await;
    }
}
