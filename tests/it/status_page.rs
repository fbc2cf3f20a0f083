//! The admin listener's status page, opened in a real headless browser
//! (Debian's `chromium`; `scripts/test` installs it) after known traffic:
//! what it shows of the build, the profiles, the quota per client, the
//! cache, the pushes, the errors and the actions.

use crate::support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use wiremock::ResponseTemplate;

const ACCESS_KEY: &str = "AK-status-0123456789";
const SECRET: &str = "sk-status";

fn config(dir: &Path, upstream: &str, dead_subscriber: &str) -> std::path::PathBuf {
    let file = dir.join("pandagate.toml");
    let text = format!(
        "[upstream]\nurl = \"{upstream}\"\n\n\
         [rate_limit]\nrequests_per_second = 50\nburst = 50\n\n\
         [[routes]]\nprefix = \"/open/product/\"\ncache_ttl_ms = 60000\n\n\
         [[clients]]\nname = \"orders\"\ntoken_env = \"TOKEN_ORDERS\"\nprofiles = [\"default\"]\n\n\
         [[clients]]\nname = \"reports\"\ntoken_env = \"TOKEN_REPORTS\"\nprofiles = [\"default\"]\n\n\
         [callbacks]\nstore = \"{store}\"\nbackoff_base_ms = 60000\nbackoff_cap_ms = 60000\n\n\
         [[callbacks.subscribers]]\nurl = \"{dead_subscriber}\"\n",
        store = dir.join("store").display(),
    );
    std::fs::write(&file, text).unwrap();
    file
}

async fn call(gateway: &str, path: &str, token: &str) -> u16 {
    let req = Request::get(format!("http://{gateway}{path}"))
        .header("authorization", format!("Bearer {token}"))
        .body(Full::<Bytes>::default())
        .unwrap();
    support::send(req).await.status.as_u16()
}

/// Runs headless chromium with `args` on `url`, at most 60 s; its stdout.
fn chromium(args: &[&str], url: &str, profile: &Path) -> Vec<u8> {
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromium runs (Debian package chromium; scripts/test installs it)");
    let started = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    out
}

/// The text of the page's element `id` (a section), tags dropped.
fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no section {id}: {dom}"));
    let end = dom[start..]
        .find("</section>")
        .map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_what_known_traffic_did() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = support::upstream_answering(ResponseTemplate::new(200).set_body_raw(
        support::provider_body("r-status", 200, "success"),
        "application/json",
    ))
    .await;
    // Nothing listens there: the push stays pending.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}/events", dead.local_addr().unwrap());
    drop(dead);
    let config = config(dir.path(), &upstream.uri(), &dead_url);
    let gw = support::launch(
        &["--config", config.to_str().unwrap()],
        &[
            ("PANDAPON_ACCESS_KEY", ACCESS_KEY),
            ("PANDAPON_ACCESS_SECRET", SECRET),
            ("TOKEN_ORDERS", "tok-orders"),
            ("TOKEN_REPORTS", "tok-reports"),
        ],
    )
    .await;

    // orders: one cached read asked of the provider, then two hits.
    for _ in 0..3 {
        assert_eq!(
            call(&gw.gateway, "/open/product/get?itemId=1", "tok-orders").await,
            200
        );
    }
    // reports: two calls that take a quota slot each.
    for n in 0..2 {
        let path = format!("/alibaba/order/list?page={n}");
        assert_eq!(call(&gw.gateway, &path, "tok-reports").await, 200);
    }
    // Two calls with a token no client has.
    for _ in 0..2 {
        assert_eq!(
            call(&gw.gateway, "/open/product/get?itemId=2", "tok-nobody").await,
            401
        );
    }
    assert_eq!(support::push_signed(&gw.gateway, SECRET, "S1").await, 200);

    let url = format!("http://{}/", gw.admin);
    let profile = dir.path().join("chromium");
    let dom = String::from_utf8(chromium(&["--dump-dom"], &url, &profile)).unwrap();

    assert!(dom.contains("<title>pandagate status</title>"), "{dom}");
    let build = section(&dom, "build");
    assert!(build.contains(env!("CARGO_PKG_VERSION")), "{build}");
    assert!(build.contains("ready"), "{build}");

    let profiles = section(&dom, "profiles");
    assert!(profiles.contains("AK-s…"), "{profiles}");
    assert!(
        !dom.contains(ACCESS_KEY),
        "the AccessKey is never shown whole"
    );
    assert!(!dom.contains(SECRET) && !dom.contains("tok-orders"));

    let quota = section(&dom, "quota");
    assert!(quota.contains("50 calls/s"), "{quota}");
    let row = |client: &str| {
        let at = quota
            .find(&format!("<td>{client}</td>"))
            .unwrap_or_else(|| panic!("{client}: {quota}"));
        let end = quota[at..].find("</tr>").unwrap() + at;
        quota[at..end].to_owned()
    };
    assert!(
        row("orders").starts_with("<td>orders</td><td>1</td><td>0</td>"),
        "{}",
        row("orders")
    );
    assert!(
        row("reports").starts_with("<td>reports</td><td>2</td><td>0</td>"),
        "{}",
        row("reports")
    );

    let cache = section(&dom, "cache");
    assert!(cache.contains("67 %"), "two hits of three looks: {cache}");

    let pushes = section(&dom, "pushes");
    assert!(
        pushes.contains("<td>1</td>"),
        "one delivery pending: {pushes}"
    );

    let errors = section(&dom, "errors");
    assert!(
        errors.contains("<td>unauthenticated</td><td>2</td>"),
        "{errors}"
    );

    let actions = section(&dom, "actions");
    assert!(
        actions.contains(&format!("curl -X POST http://{}/reload", gw.control)),
        "{actions}"
    );
    assert!(
        actions.contains("pandagate callbacks replay --all-dead"),
        "{actions}"
    );
    assert!(
        !dom.contains("<button") && !dom.contains("<form"),
        "read-only: no button"
    );
    assert!(
        !dom.contains("src=\"http") && !dom.contains("href=\"http"),
        "no outside asset"
    );

    // A screenshot, as a person sees it; PANDAGATE_STATUS_SCREENSHOT keeps
    // it at that path (how docs/status-page.png is made).
    let shot = dir.path().join("status.png");
    chromium(
        &[
            "--window-size=1100,1500",
            "--hide-scrollbars",
            &format!("--screenshot={}", shot.display()),
        ],
        &url,
        &profile,
    );
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Ok(keep) = std::env::var("PANDAGATE_STATUS_SCREENSHOT") {
        std::fs::write(keep, &png).unwrap();
    }
}
