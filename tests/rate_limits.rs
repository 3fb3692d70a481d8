//! `[rate_limits]` token buckets and the failed-key brake, through real requests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: a failed unwrap is a failed test

mod support;

use http::Method;
use support::backend::Backend;
use support::*;

async fn models(edge: &TestEdge, host: &str, key: Option<&str>) -> Answer {
    let auth = key.map(bearer);
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    send(edge.addr, Method::GET, host, "/v1/models", &headers, "").await
}

#[tokio::test]
async fn buckets_per_key_and_per_public_deployment() {
    let backend = Backend::start().await;
    let edge = TestEdge::start(
        &[backend.url()],
        "[rate_limits]\nrequests_per_second = 0.5\nburst = 3\n",
    )
    .await;
    for remaining in ["2", "1", "0"] {
        let a = models(&edge, "keyed.arkor.app", Some(KEYED_KEY)).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.headers["x-ratelimit-limit-requests"], "3");
        assert_eq!(a.headers["x-ratelimit-remaining-requests"], remaining);
        assert!(a.headers.contains_key("x-ratelimit-reset-requests"));
    }
    let a = models(&edge, "keyed.arkor.app", Some(KEYED_KEY)).await;
    assert_eq!(
        (a.status.as_u16(), a.code().as_str()),
        (429, "rate_limit_exceeded")
    );
    assert_eq!(a.headers["x-ratelimit-remaining-requests"], "0");
    let retry_ms: u64 = a.headers["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2000).contains(&retry_ms), "{retry_ms}");
    // One token per 2 s: at most 2 s to wait, rounded up to whole seconds.
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(retry, retry_ms.div_ceil(1000));
    assert!(
        a.headers["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("x-ratelimit-remaining-requests")
    );
    // Proxied requests draw from the same bucket.
    let a = post_chat(
        edge.addr,
        "keyed.arkor.app",
        &[("authorization", &bearer(KEYED_KEY))],
    )
    .await;
    assert_eq!(a.status, 429);
    assert!(
        backend.seen().is_empty(),
        "a limited request reached the backend"
    );
    // Another key has its own bucket.
    assert_eq!(
        models(&edge, "other.arkor.app", Some(OTHER_KEY))
            .await
            .status,
        200
    );
    // A public deployment is limited as a whole.
    for _ in 0..3 {
        assert_eq!(models(&edge, "open.arkor.app", None).await.status, 200);
    }
    assert_eq!(models(&edge, "open.arkor.app", None).await.status, 429);
    // Refused before the limit: unknown deployments and bad keys take no token.
    assert_eq!(models(&edge, "nope.arkor.app", None).await.status, 404);
    edge.stop().await;
}

#[tokio::test]
async fn too_many_bad_keys_from_one_address_are_braked() {
    let backend = Backend::start().await;
    let edge = TestEdge::start(&[backend.url()], "[limits]\nmax_auth_failures = 3\n").await;
    let wrong = "ark_live_guessguessguessguessguess00";
    for _ in 0..3 {
        let a = models(&edge, "keyed.arkor.app", Some(wrong)).await;
        assert_eq!(
            (a.status.as_u16(), a.code().as_str()),
            (401, "invalid_api_key")
        );
    }
    let a = models(&edge, "keyed.arkor.app", Some(wrong)).await;
    assert_eq!(
        (a.status.as_u16(), a.code().as_str()),
        (429, "rate_limit_exceeded")
    );
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // The brake holds for the whole address, a valid key included, while it lasts …
    assert_eq!(
        models(&edge, "keyed.arkor.app", Some(KEYED_KEY))
            .await
            .status,
        429
    );
    // … but deployments without keys are not affected.
    assert_eq!(models(&edge, "open.arkor.app", None).await.status, 200);
    edge.stop().await;
}
