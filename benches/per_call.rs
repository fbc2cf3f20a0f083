//! The gateway's own work per call, apart from the network: signing,
//! reading `requestId`/`code` from a response prefix, route classification,
//! the local limiter check, and formatting and queueing the access-log line.
//!
//!     cargo bench --bench per_call
//!
//! Issue 7's target: signing + classification + log formatting < 2 µs per
//! call (the `per_call/sign+route+format` group).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderValue, Method};
use pandagate::access_log::{AccessLog, AccessRecord, format_line};
use pandagate::config::LogFormat;
use pandagate::config::RateLimitConfig;
use pandagate::envelope;
use pandagate::ids;
use pandagate::quota::{Limiter, QuotaClient};
use pandagate::routes::Routes;
use pandagate::signer::{self, Recipe, TimestampUnit};

const ENVELOPE: &[u8] = br#"{"requestId":"4cfda0b725184ab8a1e3ee3b9051ec35","code":200,"developId":"1014533973088404335","msg":"ok","data":{"itemId":652874751412,"title":"a product with a long enough title","price":"19.90","skus":[{"skuId":1,"price":"19.90"},{"skuId":2,"price":"21.00"}]}}"#;

/// What signing costs on the request path: a timestamp, a fresh 32-character
/// nonce from the CSPRNG, and the MD5 signature.
fn sign_once() -> [u8; 32] {
    let ts = TimestampUnit::Ms.stamp(SystemTime::now()).to_string();
    let nonce = ids::nonce(&mut rand::rng());
    signer::sign(
        Recipe::Concat,
        "7qm3rbvzqjvu",
        &ts,
        std::str::from_utf8(&nonce).expect("alphanumeric"),
        "a-secret-of-typical-length-32-ch",
    )
}

fn record() -> AccessRecord {
    let mut r = AccessRecord::start(
        Method::GET,
        "/open/product/get",
        &HeaderValue::from_static("41401d78477fc9964dd76502bd1b6572"),
    );
    r.profile = Some(Arc::from("default"));
    r.status = 200;
    r.upstream_status = Some(200);
    r.attempts = 1;
    r
}

fn benches(c: &mut Criterion) {
    let routes = Routes::new(&[]);
    let found = envelope::inspect(ENVELOPE);
    assert_eq!(
        found.request_id.as_deref(),
        Some("4cfda0b725184ab8a1e3ee3b9051ec35")
    );

    c.bench_function("sign", |b| b.iter(|| black_box(sign_once())));
    c.bench_function("envelope_inspect", |b| {
        b.iter(|| black_box(envelope::inspect(black_box(ENVELOPE))))
    });
    c.bench_function("route_classify", |b| {
        b.iter(|| black_box(routes.route(black_box("/alibaba/order/create"))))
    });
    let mut r = record();
    r.class = Some(routes.route("/open/product/get").class);
    c.bench_function("format_line_json", |b| {
        b.iter(|| black_box(format_line(LogFormat::Json, &r, &found, SystemTime::now())))
    });

    // Handing the line to the access-log writer, formatting included, as a
    // finished call does; the writer drains into a sink on its own thread.
    // Flushed every 1024 lines, outside the timing, so the queue never fills.
    let (log, _writer) = AccessLog::spawn(LogFormat::Json, Box::new(std::io::sink()));
    c.bench_function("access_log_emit", |b| {
        b.iter_custom(|iters| {
            let mut took = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(1024);
                let start = Instant::now();
                for _ in 0..n {
                    log.emit(black_box(&r), &found);
                }
                took += start.elapsed();
                log.flush();
                left -= n;
            }
            took
        })
    });

    // The three together, as one call does them.
    c.bench_function("per_call/sign+route+format", |b| {
        b.iter(|| {
            let signature = sign_once();
            let mut r = record();
            r.class = Some(routes.route(black_box("/open/product/get")).class);
            black_box(signature);
            black_box(format_line(LogFormat::Json, &r, &found, SystemTime::now()))
        })
    });

    // The local limiter at its highest quota: the cost of the check itself
    // (a GCRA step), polled on a current-thread runtime. Once the burst is
    // spent some checks are refusals, which take the same step without
    // waiting (max_wait_ms = 0), so the answer is not looked at.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let config: RateLimitConfig =
        toml::from_str("requests_per_second = 1000000.0\nburst = 1000000").expect("config");
    let clients = QuotaClient::alone();
    let limiter =
        Limiter::new(Some(&config), None, &[Arc::from("key")], &[], &clients).expect("limiter");
    c.bench_function("limiter_check_local", |b| {
        b.iter(|| black_box(runtime.block_on(limiter.acquire(0, None, 0)).is_ok()))
    });
}

criterion_group!(per_call, benches);
criterion_main!(per_call);
