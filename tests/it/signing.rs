//! Credentials and signature on every upstream request.

use crate::support;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use pandagate::signer::{Recipe, TimestampUnit};
use support::gateway::{OPS_ACCESS_KEY, OPS_SECRET, USER_ID};
use support::provider::{expected_signature, md5_upper};
use support::*;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, ResponseTemplate};

async fn provider() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(any())
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_raw(provider_body("rid-1", 200, "ok"), "application/json"),
        )
        .mount(&server)
        .await;
    server
}

fn header<'a>(r: &'a wiremock::Request, name: &str) -> &'a str {
    r.headers
        .get(name)
        .unwrap_or_else(|| panic!("upstream request lacks {name}"))
        .to_str()
        .unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn sends_the_five_system_headers_with_a_valid_signature() {
    let upstream = provider().await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let before = now_ms();
    let answer = get(&gw.url("/open/product/get?itemId=1")).await;
    let after = now_ms();
    assert_eq!(answer.status, 200);

    let received = upstream.received_requests().await.unwrap();
    assert_eq!(received.len(), 1);
    let r = &received[0];
    assert_eq!(header(r, "access-key"), ACCESS_KEY);
    assert_eq!(header(r, "user-id"), USER_ID);
    let ts = header(r, "timestamp");
    assert_eq!(ts.len(), 13, "milliseconds by default: {ts}");
    let ts_num: u64 = ts.parse().unwrap();
    assert!(
        (before..=after).contains(&ts_num),
        "{before} <= {ts_num} <= {after}"
    );
    let nonce = header(r, "nonce-str");
    assert_eq!(nonce.len(), 32);
    assert!(nonce.bytes().all(|b| b.is_ascii_alphanumeric()), "{nonce}");
    assert_eq!(
        header(r, "signature"),
        expected_signature(ACCESS_KEY, ts, nonce, SECRET)
    );
    assert!(
        r.headers
            .values()
            .all(|v| v.as_bytes() != SECRET.as_bytes()),
        "the secret itself is never sent"
    );
    gw.stop().await;
}

#[tokio::test]
async fn every_call_gets_a_fresh_nonce_and_signature() {
    let upstream = provider().await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/open/product/get")).await.status, 200);
    }
    let received = upstream.received_requests().await.unwrap();
    let mut nonces: Vec<&str> = received.iter().map(|r| header(r, "nonce-str")).collect();
    let mut sigs: Vec<&str> = received.iter().map(|r| header(r, "signature")).collect();
    nonces.sort_unstable();
    nonces.dedup();
    sigs.sort_unstable();
    sigs.dedup();
    assert_eq!(nonces.len(), 5);
    assert_eq!(sigs.len(), 5);
    gw.stop().await;
}

#[tokio::test]
async fn seconds_timestamps_when_configured() {
    let upstream = provider().await;
    let mut c = config(&upstream.uri());
    c.signing.timestamp_unit = TimestampUnit::S;
    let gw = spawn_gateway(c).await;
    get(&gw.url("/open/product/get")).await;
    let r = &upstream.received_requests().await.unwrap()[0];
    let ts = header(r, "timestamp");
    assert_eq!(ts.len(), 10, "{ts}");
    assert!(ts.parse::<u64>().unwrap().abs_diff(now_ms() / 1000) <= 5);
    assert_eq!(
        header(r, "signature"),
        expected_signature(ACCESS_KEY, ts, header(r, "nonce-str"), SECRET)
    );
    gw.stop().await;
}

#[tokio::test]
async fn each_recipe_signs_the_string_it_names() {
    for recipe in Recipe::ALL {
        let upstream = provider().await;
        let mut c = config(&upstream.uri());
        c.signing.recipe = recipe;
        let gw = spawn_gateway(c).await;
        get(&gw.url("/open/product/get")).await;
        let r = &upstream.received_requests().await.unwrap()[0];
        let (ak, ts, n) = (ACCESS_KEY, header(r, "timestamp"), header(r, "nonce-str"));
        // Written out here from the provider's documented rule, not from the signer.
        let hashed = match recipe {
            Recipe::Concat => format!("{ak}{ts}{n}{SECRET}"),
            Recipe::SortedConcat => format!("{ak}{n}{ts}{SECRET}"),
            Recipe::QuerySecret => format!("access-key={ak}&nonce-str={n}&timestamp={ts}{SECRET}"),
            Recipe::QueryKey => {
                format!("access-key={ak}&nonce-str={n}&timestamp={ts}&key={SECRET}")
            }
        };
        assert_eq!(header(r, "signature"), md5_upper(&hashed), "{recipe:?}");
        gw.stop().await;
    }
}

#[tokio::test]
async fn caller_supplied_credential_headers_are_replaced() {
    let upstream = provider().await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let req = Request::post(gw.url("/alibaba/product/keywords/query"))
        .header("access-key", "caller-chosen-key")
        .header("timestamp", "1")
        .header("nonce-str", "caller-chosen-nonce")
        .header("signature", "FORGEDFORGEDFORGEDFORGEDFORGED00")
        .header("user-id", "666")
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    assert_eq!(send(req).await.status, 200);
    let r = &upstream.received_requests().await.unwrap()[0];
    for name in [
        "access-key",
        "timestamp",
        "nonce-str",
        "signature",
        "user-id",
    ] {
        assert_eq!(
            r.headers.get_all(name).iter().count(),
            1,
            "{name} sent once"
        );
    }
    assert_eq!(header(r, "access-key"), ACCESS_KEY);
    assert_eq!(
        header(r, "user-id"),
        USER_ID,
        "no allow-list: caller's user-id replaced"
    );
    assert_ne!(header(r, "timestamp"), "1");
    assert_ne!(header(r, "nonce-str"), "caller-chosen-nonce");
    assert_eq!(
        header(r, "signature"),
        expected_signature(
            ACCESS_KEY,
            header(r, "timestamp"),
            header(r, "nonce-str"),
            SECRET
        )
    );
    gw.stop().await;
}

#[tokio::test]
async fn caller_picks_a_selectable_profile_and_an_allowed_user_id() {
    let upstream = provider().await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let req = Request::get(gw.url("/open/product/get"))
        .header("x-pandagate-profile", "ops")
        .header("user-id", "22")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(req).await.status, 200);
    let r = &upstream.received_requests().await.unwrap()[0];
    assert_eq!(header(r, "access-key"), OPS_ACCESS_KEY);
    assert_eq!(header(r, "user-id"), "22");
    assert!(
        r.headers.get("x-pandagate-profile").is_none(),
        "control header not forwarded"
    );
    assert_eq!(
        header(r, "signature"),
        expected_signature(
            OPS_ACCESS_KEY,
            header(r, "timestamp"),
            header(r, "nonce-str"),
            OPS_SECRET
        )
    );
    let log = gw.access_log_of(1).await;
    assert_eq!(log[0]["profile"], "ops");
    gw.stop().await;
}

#[tokio::test]
async fn refuses_unlisted_user_id_and_unselectable_profiles_with_403() {
    let upstream = provider().await;
    let gw = spawn_gateway(config(&upstream.uri())).await;
    let cases = [
        ("ops", Some("33")),
        ("hidden", None),
        ("no-such-profile", None),
    ];
    for (profile, user_id) in cases {
        let mut req =
            Request::get(gw.url("/open/product/get")).header("x-pandagate-profile", profile);
        if let Some(u) = user_id {
            req = req.header("user-id", u);
        }
        let answer = send(req.body(Full::default()).unwrap()).await;
        answer.assert_gateway_envelope(403);
    }
    assert!(
        upstream.received_requests().await.unwrap().is_empty(),
        "nothing forwarded"
    );
    gw.stop().await;
}
