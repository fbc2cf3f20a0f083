//! The command line: `run` (default), `check`, `demo`, `sandbox`, `sign`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use clap::{Parser, Subcommand};

use crate::base::secret::Secret;
use crate::config::RedisUrlKeys as _;
use crate::config::{
    self, ConfigError, IdempotencyBackend, LogConfig, RateLimitBackend, process_env,
};
use crate::gateway::{Gateway, Lasting};
use crate::net::server::{self, ServerOptions};
use crate::observe::access_log::AccessLog;
use crate::pandapon::sandbox::{DEMO_ACCESS_KEY, DEMO_SECRET, Sandbox};
use crate::pandapon::signer::{self, Recipe, TimestampUnit};
use crate::policy::loaded::{self, Loaded};
use crate::process::app::{App, EXIT_FLUSH, StartError};
use crate::{base::ids, observe::diagnostics};

/// Exit statuses, as sysexits(3) names them: an invalid configuration
/// (the file, the environment, a secret file) is `EX_CONFIG`; a command
/// line that cannot be used is `EX_USAGE`; a listener that cannot be bound,
/// or a running gateway that cannot be reached, is `EX_UNAVAILABLE`. Any
/// other failure is 1.
pub const EXIT_CONFIG: u8 = 78;
pub const EXIT_USAGE: u8 = 64;
pub const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Debug, Parser)]
#[command(
    name = "pandagate",
    version = crate::base::build::VERSION,
    about = "A signing gateway for the PandaPon OpenAPI",
    after_help = "Exit status: 0 done; 1 failed; 64 the command line cannot be used (EX_USAGE); \
69 a listener cannot be bound or the running gateway cannot be reached (EX_UNAVAILABLE); \
78 the config is invalid (EX_CONFIG)."
)]
pub struct Cli {
    /// TOML config file; environment variables override it.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve (the default).
    Run,
    /// Validate the config and print the effective settings, secrets redacted.
    Check,
    /// Run a sandbox provider and a gateway in one process and make a few calls.
    Demo,
    /// Run the sandbox provider alone, for local development.
    Sandbox {
        #[arg(long, default_value = "127.0.0.1:9080")]
        listen: SocketAddr,
        /// AccessKey the sandbox accepts; its secret comes from
        /// PANDAPON_ACCESS_SECRET (default: the demo credentials).
        #[arg(long, default_value = DEMO_ACCESS_KEY)]
        access_key: String,
        #[arg(long, value_enum, default_value = "concat")]
        recipe: RecipeArg,
        #[arg(long, value_enum, default_value = "ms")]
        timestamp_unit: UnitArg,
    },
    /// Operate the pushed-message receiver of a running gateway: `list`
    /// through its admin listener, `replay` through its control listener.
    Callbacks {
        #[command(subcommand)]
        action: CallbacksAction,
        /// The running gateway's admin address.
        #[arg(
            long,
            env = "PANDAGATE_ADMIN_LISTEN",
            default_value = "127.0.0.1:9901",
            global = true
        )]
        admin: SocketAddr,
        /// The running gateway's control address.
        #[arg(
            long,
            env = "PANDAGATE_CONTROL_LISTEN",
            default_value = "127.0.0.1:9902",
            global = true
        )]
        control: SocketAddr,
        /// The control listener's token, when it has one.
        #[arg(
            long,
            env = "PANDAGATE_CONTROL_TOKEN",
            hide_env_values = true,
            global = true
        )]
        control_token: Option<String>,
    },
    /// Print the headers for one request of a profile, to diagnose rejected signatures.
    Sign {
        /// Also print the string that is hashed (the secret shown as <secret>).
        #[arg(long)]
        explain: bool,
        #[arg(long)]
        profile: Option<String>,
        /// Timestamp to sign (default: now, in the configured unit).
        #[arg(long)]
        timestamp: Option<String>,
        /// Nonce to sign (default: a fresh random one).
        #[arg(long)]
        nonce: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CallbacksAction {
    /// Deliveries still pending (or, with --dead, given up), a page at a
    /// time, oldest first.
    List {
        #[arg(long)]
        dead: bool,
        /// Deliveries per page (default 100, at most 1000).
        #[arg(long)]
        limit: Option<usize>,
        /// Where the page starts: the `next` of the page before.
        #[arg(long)]
        after: Option<String>,
    },
    /// Put dead letters back in line: one (by delivery id or key), or all.
    Replay {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all_dead: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RecipeArg {
    Concat,
    SortedConcat,
    QuerySecret,
    QueryKey,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum UnitArg {
    Ms,
    S,
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // `--help` and `--version` go to stdout and succeed.
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let path = cli.config.as_deref();
    let code = match cli.command.unwrap_or(Command::Run) {
        // Calls are served by threads of their own (`server.worker_threads`);
        // the main thread's runtime keeps the admin listener, signals,
        // reloads and deliveries.
        Command::Run => with_config(path, |loaded| {
            on_runtime(1, run(loaded, path.map(Path::to_path_buf)))
        }),
        Command::Check => with_config(path, |loaded| check(&loaded)),
        Command::Sign {
            explain,
            profile,
            timestamp,
            nonce,
        } => with_config(path, |loaded| {
            sign(&loaded, explain, profile, timestamp, nonce)
        }),
        Command::Demo => {
            let format = diagnostics::resolve_format(None);
            diagnostics::init(format, LogConfig::default().queue_lines);
            on_runtime(0, async move {
                match crate::process::demo::run(format).await {
                    Ok(true) => ExitCode::SUCCESS,
                    Ok(false) => ExitCode::FAILURE,
                    Err(e) => {
                        exit_message(format_args!("pandagate demo: {e}"));
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Callbacks {
            action,
            admin,
            control,
            control_token,
        } => on_runtime(0, callbacks_command(action, admin, control, control_token)),
        Command::Sandbox {
            listen,
            access_key,
            recipe,
            timestamp_unit,
        } => on_runtime(0, sandbox(listen, access_key, recipe, timestamp_unit)),
    };
    // Diagnostics still queued ("exiting" among them) are lost otherwise.
    diagnostics::flush_within(EXIT_FLUSH);
    code
}

/// Prints a message on the way out, after the diagnostics queued before it
/// (waiting at most `EXIT_FLUSH` for stderr's reader).
fn exit_message(msg: std::fmt::Arguments<'_>) {
    diagnostics::flush_within(EXIT_FLUSH);
    eprintln!("{msg}");
}

/// Runs `task` on a runtime with `threads` worker threads: 0 = one per CPU
/// (tokio's default), 1 = the current-thread runtime.
fn on_runtime(threads: usize, task: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let mut builder = match threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if threads > 1 {
        builder.worker_threads(threads);
    }
    match builder.enable_all().build() {
        Ok(runtime) => runtime.block_on(task),
        Err(e) => {
            eprintln!("pandagate: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn with_config(path: Option<&std::path::Path>, f: impl FnOnce(Loaded) -> ExitCode) -> ExitCode {
    match loaded::load(path, &process_env) {
        Ok(loaded) => f(loaded),
        Err(e) => config_failure(&e),
    }
}

fn config_failure(e: &ConfigError) -> ExitCode {
    exit_message(format_args!("pandagate: {e}"));
    ExitCode::from(EXIT_CONFIG)
}

async fn run(loaded: Loaded, config_path: Option<PathBuf>) -> ExitCode {
    let log = &loaded.config.log;
    diagnostics::init(diagnostics::resolve_format(log.format), log.queue_lines);
    let served = match App::build(loaded, config_path).await {
        Ok(app) => app.serve().await,
        Err(e) => Err(e),
    };
    match served {
        Ok(()) => {
            tracing::info!("exiting");
            ExitCode::SUCCESS
        }
        Err(StartError::Config(e)) => config_failure(&e),
        Err(e @ StartError::Listen { .. }) => {
            exit_message(format_args!("pandagate: {e}"));
            ExitCode::from(EXIT_UNAVAILABLE)
        }
        Err(e) => {
            exit_message(format_args!("pandagate: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Validates as `run` does, then prints the effective config.
fn check(loaded: &Loaded) -> ExitCode {
    if let Err(e) = build_as_run_does(loaded) {
        return config_failure(&e);
    }
    println!(
        "# pandagate: config is valid; effective settings follow (secrets are never shown; \
         URLs are shown with passwords and tokens redacted)"
    );
    for p in &loaded.profiles {
        println!(
            "# profile {:?}: secret loaded ({} bytes, redacted)",
            &*p.name,
            p.secret.current().len()
        );
    }
    // The proxy in use, wherever it was set (the environment's does not
    // show in the TOML below), its credentials redacted.
    println!("# upstream: {}", loaded.egress);
    if let Some(r) = &loaded.config.rate_limit
        && r.backend == RateLimitBackend::Redis
        && let Ok(source) = r.redis_url_source()
    {
        println!(
            "# rate_limit: {}",
            redis_line(source, loaded.redis_url.as_deref())
        );
    }
    match &loaded.traces_endpoint {
        Some(endpoint) => println!(
            "# telemetry: spans exported to {}",
            crate::base::redact::url(&endpoint.0)
        ),
        None => println!("# telemetry: no OTLP endpoint; no spans are made"),
    }
    if let (Some(c), Some(url)) = (&loaded.config.callbacks, &loaded.callbacks_postgres_url) {
        println!("# callbacks: {}", postgres_status(c, url));
    }
    if let Some(i) = &loaded.config.idempotency
        && i.backend == IdempotencyBackend::Redis
        && let Ok(source) = i.redis_url_source()
    {
        let line = redis_line(source, loaded.idempotency_redis_url.as_deref());
        println!("# idempotency: {line}");
    }
    if loaded.config.cache.backend == crate::config::CacheBackend::Redis
        && let Ok(source) = loaded.config.cache.redis_url_source()
    {
        let line = redis_line(source, loaded.cache_redis_url.as_deref());
        println!("# cache: {line}");
    }
    print!("{}", loaded.config.to_toml());
    ExitCode::SUCCESS
}

/// Where a section's Redis is, passwords redacted: its one URL and where
/// it comes from, a Cluster's seed nodes, or the sentinels and the master
/// they are asked for.
fn redis_line(
    source: crate::config::RedisUrlSource<'_>,
    resolved: Option<&crate::config::RedisUrl>,
) -> String {
    use crate::base::redact;
    use crate::config::RedisMode;
    let Some(url) = resolved else {
        return format!("Redis URL {source}");
    };
    let list = || {
        url.all()
            .map(|u| redact::url(u).into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let from = match source {
        crate::config::RedisUrlSource::Env(_) | crate::config::RedisUrlSource::File(_) => {
            format!(" ({source})")
        }
        _ => String::new(),
    };
    match url.mode() {
        RedisMode::Standalone => format!("Redis URL {source}"),
        RedisMode::Cluster => format!("Redis Cluster, seed nodes {}{from}", list()),
        RedisMode::Sentinel => format!(
            "Redis master {:?} asked of the sentinels {}{from}",
            url.sentinel_master().unwrap_or_default(),
            list()
        ),
    }
}

/// Whether the push store's database answers, and whether its schema is
/// the one this binary writes (it is made current at start).
fn postgres_status(
    c: &crate::config::CallbacksConfig,
    url: &crate::net::tls::WithTrust<crate::config::PostgresUrl>,
) -> String {
    use crate::callbacks::postgres::{SCHEMA_VERSION, probe};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let Ok(runtime) = runtime else {
        return "PostgreSQL not checked (no runtime)".into();
    };
    let within = std::time::Duration::from_secs(5);
    match runtime.block_on(async { tokio::time::timeout(within, probe(c, url)).await }) {
        Err(_) => "PostgreSQL unreachable: no answer within 5 s".into(),
        Ok(Err(e)) => format!("PostgreSQL unreachable: {e}"),
        Ok(Ok(v)) if v == SCHEMA_VERSION => {
            format!("PostgreSQL reachable, schema version {v} (current)")
        }
        Ok(Ok(v)) if v < SCHEMA_VERSION => format!(
            "PostgreSQL reachable, schema version {v}; it is migrated to {SCHEMA_VERSION} at start"
        ),
        Ok(Ok(v)) => format!(
            "PostgreSQL reachable, schema version {v}, newer than this binary's {SCHEMA_VERSION}: \
             it will refuse to start"
        ),
    }
}

/// Builds what `run` builds from the config before it binds a listener:
/// the gateway (upstream client, routes, breaker, retry budget, and the
/// limiter with its lazy Redis connection manager, which needs a runtime)
/// and the listener options. So a config `check` accepts fails in none of
/// `run`'s constructors. Binding listeners and opening the callback store
/// stay with `run`; nothing here connects anywhere.
fn build_as_run_does(loaded: &Loaded) -> Result<(), ConfigError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ConfigError::new("runtime", e))?;
    let _entered = runtime.enter();
    let (log, _writer) =
        AccessLog::spawn(crate::config::LogFormat::Json, Box::new(std::io::sink()));
    let gateway = Gateway::new(loaded, Lasting::without_stores(loaded, log)?)?;
    let _ = ServerOptions::from(gateway.server_config());
    Ok(())
}

fn sign(
    loaded: &Loaded,
    explain: bool,
    profile: Option<String>,
    timestamp: Option<String>,
    nonce: Option<String>,
) -> ExitCode {
    let name = profile.unwrap_or_else(|| loaded.config.default_profile.clone());
    let Some(p) = loaded.profiles.iter().find(|p| *p.name == *name) else {
        eprintln!("pandagate: no profile named {name:?}");
        return ExitCode::from(EXIT_USAGE);
    };
    let signing = &loaded.config.signing;
    let timestamp =
        timestamp.unwrap_or_else(|| signing.timestamp_unit.stamp(SystemTime::now()).to_string());
    let nonce = nonce.unwrap_or_else(|| {
        String::from_utf8(ids::nonce(&mut rand::rng()).to_vec()).expect("alphanumeric")
    });
    let access_key = p.access_key.to_str().expect("validated: visible ASCII");
    let signature = signer::sign(
        signing.recipe,
        access_key,
        &timestamp,
        &nonce,
        p.secret.current().expose(),
    );
    let signature = String::from_utf8_lossy(&signature);
    println!("profile:        {}", p.name);
    println!("recipe:         {}", signing.recipe.name());
    if explain {
        println!(
            "string to sign: {}",
            signer::explain(signing.recipe, access_key, &timestamp, &nonce)
        );
        println!("                (MD5, upper-case hex; <secret> is the profile's Access secret)");
    }
    println!("access-key:     {access_key}");
    println!("timestamp:      {timestamp}");
    println!("nonce-str:      {nonce}");
    if let Some(u) = p.user_id.as_ref().and_then(|u| u.to_str().ok()) {
        println!("user-id:        {u}");
    }
    println!("signature:      {signature}");
    ExitCode::SUCCESS
}

async fn callbacks_command(
    action: CallbacksAction,
    admin: SocketAddr,
    control: SocketAddr,
    token: Option<String>,
) -> ExitCode {
    use http_body_util::BodyExt;
    // Listing only reads (the admin listener); a replay changes state (the
    // control listener).
    let (listener, name) = match action {
        CallbacksAction::List { .. } => (admin, "admin"),
        CallbacksAction::Replay { .. } => (control, "control"),
    };
    let (method, target) = match &action {
        CallbacksAction::List { dead, limit, after } => {
            let mut query = form_urlencoded::Serializer::new(String::new());
            if *dead {
                query.append_pair("dead", "1");
            }
            if let Some(limit) = limit {
                query.append_pair("limit", &limit.to_string());
            }
            if let Some(after) = after {
                query.append_pair("after", after);
            }
            let query = query.finish();
            let sep = if query.is_empty() { "" } else { "?" };
            (http::Method::GET, format!("/callbacks{sep}{query}"))
        }
        CallbacksAction::Replay { id: Some(id), .. } => (
            http::Method::POST,
            format!(
                "/callbacks/replay?{}",
                form_urlencoded::Serializer::new(String::new())
                    .append_pair("id", id)
                    .finish()
            ),
        ),
        CallbacksAction::Replay { all_dead: true, .. } => (
            http::Method::POST,
            "/callbacks/replay?all-dead=1".to_owned(),
        ),
        CallbacksAction::Replay { .. } => {
            eprintln!("pandagate callbacks replay: give a delivery id or --all-dead");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{listener}{target}"));
    if let Some(token) = token.filter(|_| name == "control") {
        let Ok(mut bearer) = http::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
        else {
            eprintln!("pandagate callbacks: PANDAGATE_CONTROL_TOKEN is not a valid header value");
            return ExitCode::from(EXIT_USAGE);
        };
        bearer.set_sensitive(true);
        req = req.header(http::header::AUTHORIZATION, bearer);
    }
    let req = req
        .body(http_body_util::Full::default())
        .expect("a valid request");
    match client.request(req).await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            print!("{}", String::from_utf8_lossy(&body));
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("pandagate callbacks: cannot reach the {name} listener at {listener}: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

async fn sandbox(
    listen: SocketAddr,
    access_key: String,
    recipe: RecipeArg,
    unit: UnitArg,
) -> ExitCode {
    diagnostics::init(
        diagnostics::resolve_format(None),
        LogConfig::default().queue_lines,
    );
    let secret = process_env("PANDAPON_ACCESS_SECRET").unwrap_or_else(|| DEMO_SECRET.to_owned());
    let recipe = match recipe {
        RecipeArg::Concat => Recipe::Concat,
        RecipeArg::SortedConcat => Recipe::SortedConcat,
        RecipeArg::QuerySecret => Recipe::QuerySecret,
        RecipeArg::QueryKey => Recipe::QueryKey,
    };
    let unit = match unit {
        UnitArg::Ms => TimestampUnit::Ms,
        UnitArg::S => TimestampUnit::S,
    };
    let sandbox = Arc::new(Sandbox::new(&access_key, Secret::new(secret), recipe, unit));
    let listener = match server::bind(listen, "sandbox").await {
        Ok(l) => l,
        Err(e) => {
            exit_message(format_args!(
                "pandagate sandbox: cannot listen on {listen}: {e}"
            ));
            return ExitCode::from(EXIT_UNAVAILABLE);
        }
    };
    server::serve(
        listener,
        move |req| {
            let sandbox = sandbox.clone();
            async move { sandbox.handle(req).await }
        },
        ServerOptions::from(&config::ServerConfig::default()),
        server::shutdown_signal(),
    )
    .await;
    ExitCode::SUCCESS
}
