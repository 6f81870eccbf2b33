//! The sidecar's own endpoints: answered before the proxy and never proxied,
//! readiness following the upstream, the guard of mutating endpoints, and
//! `admin_listen`.

mod common;

use common::{Mock, Sidecar, client, closed_port};
use http::{Method, StatusCode};
use rag_sidecar::admin::Endpoint;
use serde_json::{Value, json};

#[tokio::test]
async fn healthz_and_readyz_are_answered_not_proxied() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "readiness_path = \"/api/health\"\n").await;
    let resp = client().get(sc.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "alive");
    let resp = client().get(sc.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["upstream"]["reachable"], true);
    // The probe is GET /api/health; neither admin path reached the app.
    let stats = mock.stats().await;
    assert!(stats["by_path"].get("/healthz").is_none(), "{stats}");
    assert!(stats["by_path"].get("/readyz").is_none(), "{stats}");
    assert_eq!(stats["by_path"]["/api/health"], 1);
    // Cached: a second probe within the second does not reach the app.
    client().get(sc.url("/readyz")).send().await.unwrap();
    assert_eq!(mock.stats().await["by_path"]["/api/health"], 1);
    // Wrong method: 405 JSON, still not proxied.
    let resp = client().post(sc.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "GET");
}

#[tokio::test]
async fn readyz_is_503_while_the_upstream_is_down() {
    let dead = closed_port();
    let sc = Sidecar::start(&dead.url(), "").await;
    assert_eq!(sc.get_status("/healthz").await, 200);
    let resp = client().get(sc.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["reason"], "upstream unreachable");
    assert_eq!(body["upstream"]["reachable"], false);
}

#[tokio::test]
async fn readyz_is_503_when_the_app_says_5xx() {
    let mock = Mock::start();
    client()
        .post(format!("{}/__mock/faults", mock.url()))
        .json(&json!({"status": 503}))
        .send()
        .await
        .unwrap();
    let sc = Sidecar::start(&mock.url(), "readiness_path = \"/api/health\"\n").await;
    let resp = client().get(sc.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["upstream"]["status"],
        503
    );
}

fn guarded_test_endpoint() -> Vec<Endpoint> {
    vec![Endpoint {
        method: Method::POST,
        path: "/api/test/reset",
        guarded: true,
        handler: |_ctx| {
            Box::pin(async {
                rag_sidecar::body::json(
                    StatusCode::OK,
                    &json!({"success": true, "message": "reset"}),
                )
            })
        },
    }]
}

#[tokio::test]
async fn guard_needs_loopback_or_the_bearer_token() {
    let mock = Mock::start();
    // Loopback trusted (the default): our 127.0.0.1 client passes.
    let sc = Sidecar::start_with(&mock.url(), "", guarded_test_endpoint()).await;
    let resp = client()
        .post(sc.url("/api/test/reset"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Loopback not trusted: the token is the only way in.
    let strict = Sidecar::start_with(
        &mock.url(),
        "[admin]\ntoken = \"s3cret\"\n",
        guarded_test_endpoint(),
    )
    .await;
    let url = strict.url("/api/test/reset");
    let resp = client().post(&url).send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "Forbidden");
    let resp = client()
        .post(&url)
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["message"],
        "invalid admin token"
    );
    let resp = client()
        .post(&url)
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["success"], true);
    // Unguarded endpoints stay open.
    assert_eq!(strict.get_status("/healthz").await, 200);
    assert_eq!(mock.stats().await["requests"], 0, "nothing was proxied");
}

#[tokio::test]
async fn admin_listen_moves_the_endpoints() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "admin_listen = \"127.0.0.1:0\"\n").await;
    let admin = sc.admin_addr.expect("admin port bound");
    let resp = client()
        .get(format!("http://{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Only admin endpoints there: anything else is a JSON 404, not proxied.
    let resp = client()
        .get(format!("http://{admin}/api/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    // On the proxy port these paths are refused, never proxied to the app
    // (percent-encoded spellings included).
    for path in ["/healthz", "/api/cache/stats", "/api/cache/%63lear"] {
        let resp = client().post(sc.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
        assert_eq!(resp.json::<Value>().await.unwrap()["error"], "Not found");
    }
    assert_eq!(mock.stats().await["requests"], 0);
    // Other paths are the app's as usual.
    assert_eq!(sc.get_status("/api/stats").await, 200);
}

#[tokio::test]
async fn percent_encoded_admin_paths_are_still_admin_paths() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "[admin]\ntoken = \"t\"\n").await;
    let resp = client()
        .post(sc.url("/api/cache/%63lear"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "guarded, not proxied around the guard");
    assert_eq!(mock.stats().await["requests"], 0);
}
