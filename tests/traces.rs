//! Traces over real sockets (PRODUCT.md "Traces"): the W3C context the app
//! receives, kept, started or replaced; the spans a real OTLP/HTTP receiver
//! gets (decoded with `opentelemetry-proto`) for a request retried once; a
//! collector that accepts and never answers, which slows no request and
//! whose dropped spans are counted.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use common::{Mock, Sidecar, SidecarProcess, client, free_addr, get_text_at, sigterm, wait_exit};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn client_traceparent() -> String {
    format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
}

/// A span as the receiver decoded it, with its resource's attributes.
#[derive(Debug)]
struct Got {
    resource: std::collections::HashMap<String, String>,
    span: Span,
}

impl Got {
    fn attr(&self, key: &str) -> Option<&Value> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.as_ref())
    }

    fn text(&self, key: &str) -> Option<&str> {
        match self.attr(key)? {
            Value::StringValue(s) => Some(s),
            _ => None,
        }
    }

    fn int(&self, key: &str) -> Option<i64> {
        match self.attr(key)? {
            Value::IntValue(n) => Some(*n),
            _ => None,
        }
    }
}

/// A real OTLP/HTTP receiver on 127.0.0.1: every span of every export it
/// decodes goes to the channel.
async fn receiver() -> (String, mpsc::UnboundedReceiver<Got>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let export = ExportTraceServiceRequest::decode(body).unwrap();
                        for rs in export.resource_spans {
                            let resource: std::collections::HashMap<String, String> = rs
                                .resource
                                .iter()
                                .flat_map(|r| &r.attributes)
                                .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                                    Value::StringValue(v) => Some((kv.key.clone(), v.clone())),
                                    _ => None,
                                })
                                .collect();
                            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                                let _ = tx.send(Got {
                                    resource: resource.clone(),
                                    span,
                                });
                            }
                        }
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        resp.headers_mut()
                            .insert("content-type", "application/x-protobuf".parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    (url, rx)
}

/// The next `n` spans of trace `trace` (hex), within 10 s.
async fn spans_of(rx: &mut mpsc::UnboundedReceiver<Got>, trace: &str, n: usize) -> Vec<Got> {
    let mut found = Vec::new();
    while found.len() < n {
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} spans of {trace} arrived", found.len()))
            .expect("the receiver stopped");
        if hex(&got.span.trace_id) == trace {
            found.push(got);
        }
    }
    found
}

/// The server span of each of `traces` (hex), within 10 s; spans of other
/// traces and the attempt spans are passed over.
async fn server_spans(
    rx: &mut mpsc::UnboundedReceiver<Got>,
    traces: &[String],
) -> std::collections::HashMap<String, Got> {
    let mut found = std::collections::HashMap::new();
    while found.len() < traces.len() {
        let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("server spans of {traces:?}: only {:?}", found.keys()))
            .expect("the receiver stopped");
        let trace = hex(&got.span.trace_id);
        if got.span.kind == SpanKind::Server as i32 && traces.contains(&trace) {
            found.insert(trace, got);
        }
    }
    found
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The traceparent and tracestate the app received, from the mock's echo.
async fn seen_by_app(url: &str, headers: &[(&str, &str)]) -> (String, Option<String>) {
    let mut req = client().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let echo: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
    let one = |name: &str| {
        let all = echo["headers"][name].as_array()?;
        assert_eq!(all.len(), 1, "{name}: {all:?}");
        all[0].as_str().map(str::to_string)
    };
    (
        one("traceparent").expect("the app got no traceparent"),
        one("tracestate"),
    )
}

/// `(trace id, parent id, flags)` of a traceparent the app received; it
/// must be well formed.
fn fields(tp: &str) -> (String, String, String) {
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00", "{tp}");
    assert!(
        parts[1].len() == 32 && parts[2].len() == 16 && parts[3].len() == 2,
        "{tp}"
    );
    assert!(
        tp.bytes()
            .all(|b| b == b'-' || b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{tp}"
    );
    assert_ne!(parts[1], "0".repeat(32));
    assert_ne!(parts[2], "0".repeat(16));
    (parts[1].into(), parts[2].into(), parts[3].into())
}

/// Kept, started, replaced, and `tracestate`: what the app receives, with
/// no collector configured (the context is passed on all the same).
#[tokio::test]
async fn the_app_receives_the_trace_context() {
    let mock = Mock::start();
    let sc = Sidecar::start(&mock.url(), "[rate_limit]\nenabled = false\n").await;
    let echo = sc.url("/__mock/echo");

    // Kept: the client's trace and flags, the sidecar's span as the parent,
    // the client's tracestate as it came.
    let (tp, state) = seen_by_app(
        &echo,
        &[
            ("traceparent", &client_traceparent()),
            ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        ],
    )
    .await;
    let (trace, parent, flags) = fields(&tp);
    assert_eq!(trace, CLIENT_TRACE);
    assert_ne!(
        parent, CLIENT_SPAN,
        "the app's parent is the sidecar's span"
    );
    assert_eq!(flags, "01");
    assert_eq!(
        state.as_deref(),
        Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    );
    // An unsampled client trace stays unsampled.
    let (tp, _) = seen_by_app(
        &echo,
        &[(
            "traceparent",
            &format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"),
        )],
    )
    .await;
    assert_eq!(fields(&tp).2, "00");

    // Started: a new trace each time (sampled: the default ratio is 1).
    let (a, none) = seen_by_app(&echo, &[]).await;
    let (b, _) = seen_by_app(&echo, &[]).await;
    assert_eq!(none, None);
    let (ta, _, fa) = fields(&a);
    assert_ne!(ta, fields(&b).0, "two requests, two traces");
    assert_eq!(fa, "01");

    // Invalid: replaced by a new trace, never forwarded broken; the
    // tracestate that came with it goes too.
    for broken in [
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "garbage",
    ] {
        let (tp, state) =
            seen_by_app(&echo, &[("traceparent", broken), ("tracestate", "rojo=1")]).await;
        let (trace, _, _) = fields(&tp);
        assert_ne!(trace, CLIENT_TRACE, "{broken} was kept");
        assert_eq!(state, None, "the tracestate of {broken} went on");
    }

    // A broken tracestate beside a valid traceparent: the trace is kept,
    // the tracestate is not passed on.
    let (tp, state) = seen_by_app(
        &echo,
        &[
            ("traceparent", &client_traceparent()),
            ("tracestate", "this is not a list member"),
        ],
    )
    .await;
    assert_eq!(fields(&tp).0, CLIENT_TRACE);
    assert_eq!(state, None);
}

/// `rag_sidecar_trace_spans_total{outcome}` in a `/metrics` text.
fn spans_counted(text: &str, outcome: &str) -> u64 {
    let series = format!("rag_sidecar_trace_spans_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
        .trim()
        .parse()
        .unwrap()
}

/// GET /api/stats through the sidecar at `addr` under the client's trace.
async fn stats_in_client_trace(addr: std::net::SocketAddr) {
    let resp = client()
        .get(format!("http://{addr}/api/stats"))
        .header("traceparent", client_traceparent())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// A sidecar process exporting to `collector`, with a short batch delay and
/// rate limits off.
fn exporting_sidecar(
    mock: &Mock,
    collector: &str,
    extra_env: &[(&str, &str)],
) -> (SidecarProcess, std::net::SocketAddr) {
    exporting_sidecar_with(
        mock,
        collector,
        extra_env,
        "[rate_limit]\nenabled = false\n",
    )
}

/// The same with `toml` appended to the configuration.
fn exporting_sidecar_with(
    mock: &Mock,
    collector: &str,
    extra_env: &[(&str, &str)],
    toml: &str,
) -> (SidecarProcess, std::net::SocketAddr) {
    let addr = free_addr();
    let toml = format!(
        "listen = \"{addr}\"\nupstream = \"{}\"\nreadiness_path = \"/__mock/fast\"\n\
         {toml}[retry]\ninitial_wait = \"10ms\"\nmax_wait = \"20ms\"\n",
        mock.url()
    );
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    env.extend_from_slice(extra_env);
    (SidecarProcess::start(&toml, &env, addr), addr)
}

/// One server span and one span per attempt, under the client's trace, for
/// a request retried once; the app's parent is its attempt's span.
#[tokio::test]
async fn a_retried_request_is_one_server_span_and_a_span_per_attempt() {
    let mock = Mock::start();
    let (collector, mut spans) = receiver().await;
    let (_sc, addr) = exporting_sidecar(
        &mock,
        &collector,
        &[
            ("OTEL_SERVICE_NAME", "rag-sidecar-canary"),
            ("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=rag-7"),
        ],
    );
    let http = client();
    // The app's next answer is a 503: the first attempt fails, the retry
    // succeeds.
    let armed = http
        .post(format!("{}/__mock/faults", mock.url()))
        .json(&json!({"status": 503, "count": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(armed.status(), 200);
    stats_in_client_trace(addr).await;

    let got = spans_of(&mut spans, CLIENT_TRACE, 3).await;
    let servers: Vec<&Got> = got
        .iter()
        .filter(|g| g.span.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(servers.len(), 1, "{got:#?}");
    let server = servers[0];
    assert_eq!(server.resource["service.name"], "rag-sidecar-canary");
    assert_eq!(server.resource["k8s.pod.name"], "rag-7");
    assert_eq!(hex(&server.span.parent_span_id), CLIENT_SPAN);
    assert_eq!(server.span.name, "GET default");
    assert_eq!(server.text("http.request.method"), Some("GET"));
    assert_eq!(server.text("http.route"), Some("default"));
    assert_eq!(server.int("http.response.status_code"), Some(200));
    let mut attempts: Vec<&Got> = got
        .iter()
        .filter(|g| g.span.kind == SpanKind::Client as i32)
        .collect();
    attempts.sort_by_key(|g| g.int("rag_sidecar.attempt"));
    assert_eq!(attempts.len(), 2, "{got:#?}");
    for a in &attempts {
        assert_eq!(a.span.parent_span_id, server.span.span_id);
    }
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(first.int("rag_sidecar.attempt"), Some(1));
    assert_eq!(first.int("http.response.status_code"), Some(503));
    assert_eq!(first.text("error.type"), Some("upstream_5xx"));
    assert_eq!(first.text("rag_sidecar.outcome"), Some("failure"));
    assert_eq!(second.int("rag_sidecar.attempt"), Some(2));
    assert_eq!(second.int("http.request.resend_count"), Some(1));
    assert_eq!(second.int("http.response.status_code"), Some(200));
    assert_eq!(second.text("error.type"), None);
    assert_eq!(second.text("rag_sidecar.outcome"), Some("ok"));

    // The app's parent is the attempt's span, exported under the trace.
    let (tp, _) = seen_by_app(
        &format!("http://{addr}/__mock/echo"),
        &[("traceparent", &client_traceparent())],
    )
    .await;
    let (trace, parent, _) = fields(&tp);
    assert_eq!(trace, CLIENT_TRACE);
    let got = spans_of(&mut spans, CLIENT_TRACE, 2).await;
    let attempt = got
        .iter()
        .find(|g| g.span.kind == SpanKind::Client as i32)
        .expect("an attempt span");
    assert_eq!(hex(&attempt.span.span_id), parent);

    // A miss and a hit are server spans too (a local answer, the 429, is
    // in the attributes test below); no query text in any attribute.
    let question = json!({"query": "a private question about invoices", "top_k": 3});
    for want in ["MISS", "HIT"] {
        let resp = http
            .post(format!("http://{addr}/api/search"))
            .header(
                "traceparent",
                format!("00-{}-{CLIENT_SPAN}-01", "ab".repeat(16)),
            )
            .json(&question)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-cache"], want);
    }
    let got = spans_of(&mut spans, &"ab".repeat(16), 3).await;
    let caches: Vec<&str> = got
        .iter()
        .filter(|g| g.span.kind == SpanKind::Server as i32)
        .filter_map(|g| g.text("rag_sidecar.cache"))
        .collect();
    assert!(
        caches.contains(&"MISS") && caches.contains(&"HIT"),
        "{caches:?}"
    );
    for g in &got {
        for kv in &g.span.attributes {
            let v = format!("{:?}", kv.value);
            assert!(!v.contains("invoices"), "{}: {v}", kv.key);
        }
        assert!(!g.span.name.contains("invoices"));
    }
}

/// A collector that accepts and never answers: every request is answered
/// at once all the same, and the spans that find the queue full are
/// dropped and counted.
#[tokio::test]
async fn a_collector_that_never_answers_slows_no_request() {
    let mock = Mock::start();
    // Accepts, reads, never answers; holds every connection.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = format!("http://{}", listener.local_addr().unwrap());
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((io, _)) = listener.accept().await {
            let _ = seen_tx.send(());
            held.push(io);
        }
    });
    let (mut sc, addr) = exporting_sidecar(
        &mock,
        &collector,
        &[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "16"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "8"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "120000"),
        ],
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    // Once the first export hangs, every request is still answered.
    let first = http
        .get(format!("http://{addr}/api/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    tokio::time::timeout(Duration::from_secs(10), seen_rx.recv())
        .await
        .expect("the sidecar never tried to export")
        .unwrap();
    for i in 0..150 {
        let resp = http
            .get(format!("http://{addr}/api/stats"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert_eq!(resp.status(), 200);
    }
    // 151 requests make 302 spans; at most 16 are held.
    let text = get_text_at(format!("http://{addr}/metrics")).await;
    let count = |outcome: &str| spans_counted(&text, outcome);
    assert!(count("dropped") >= 302 - 16, "dropped {}", count("dropped"));
    assert_eq!(count("exported"), 0);
    // Nor does it hold the exit: the final flush gives up after 2 s.
    sigterm(sc.pid());
    assert!(wait_exit(&mut sc, Duration::from_secs(10)).success());
}

/// Spans still queued at SIGTERM reach the collector before the exit.
#[tokio::test]
async fn queued_spans_are_sent_at_shutdown() {
    let mock = Mock::start();
    let (collector, mut spans) = receiver().await;
    // A batch delay longer than the test: only the shutdown sends.
    let (mut sc, addr) =
        exporting_sidecar(&mock, &collector, &[("OTEL_BSP_SCHEDULE_DELAY", "600000")]);
    stats_in_client_trace(addr).await;
    sigterm(sc.pid());
    let got = spans_of(&mut spans, CLIENT_TRACE, 2).await;
    assert_eq!(got.len(), 2);
    // The default service name.
    assert!(
        got.iter()
            .all(|g| g.resource["service.name"] == "rag-sidecar")
    );
    assert!(wait_exit(&mut sc, Duration::from_secs(10)).success());
}

/// A collector that refuses every export: requests are unaffected, the
/// first failure is logged at WARN and every failed span is counted.
#[tokio::test]
async fn a_refusing_collector_is_logged_once_and_counted() {
    let mock = Mock::start();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    let mut resp = Response::new(Full::new(Bytes::from_static(b"no")));
                    *resp.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            });
        }
    });
    let (mut sc, addr) = exporting_sidecar(&mock, &collector, &[]);
    stats_in_client_trace(addr).await;
    // The WARN line, read from the process's stderr as it comes.
    let stderr = sc.child.stderr.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("trace export failed"))
    });
    let line = tokio::time::timeout(Duration::from_secs(10), line)
        .await
        .expect("no export failure was logged")
        .unwrap()
        .expect("stderr ended");
    assert!(line.contains("WARN"), "{line}");
    let text = get_text_at(format!("http://{addr}/metrics")).await;
    let count = |outcome: &str| spans_counted(&text, outcome);
    assert!(count("failed") >= 1, "{text}");
    assert_eq!(count("exported"), 0);
}

/// `OTEL_TRACES_SAMPLER` is the SDK's to apply: `always_off` keeps nothing,
/// even under a client's sampled trace, and the app is told so.
#[tokio::test]
async fn an_env_sampler_is_honoured() {
    let mock = Mock::start();
    let (collector, _spans) = receiver().await;
    let (_sc, addr) =
        exporting_sidecar(&mock, &collector, &[("OTEL_TRACES_SAMPLER", "always_off")]);
    let (tp, _) = seen_by_app(
        &format!("http://{addr}/__mock/echo"),
        &[("traceparent", &client_traceparent())],
    )
    .await;
    let (trace, parent, flags) = fields(&tp);
    assert_eq!(trace, CLIENT_TRACE);
    assert_ne!(parent, CLIENT_SPAN);
    assert_eq!(flags, "00", "the sampler's decision reaches the app");
}

/// A sampler argument that is no ratio stops the start, naming the
/// variable, with the configuration error's exit code.
#[test]
fn a_bad_sampler_argument_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(SidecarProcess::bin())
        .args(["--listen", &free_addr().to_string(), "run"])
        .current_dir(dir.path())
        .env_clear()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
        .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        .env("OTEL_TRACES_SAMPLER_ARG", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("OTEL_TRACES_SAMPLER_ARG"), "{err}");
}

/// The server span says what the sidecar did: the rate limit's outcome
/// (allowed, then limited), a wait under the upstream quota, an answer
/// shared with another request (coalesced); the sidecar's own 429, 503 and
/// 504 are server spans with their status and error type.
#[tokio::test]
async fn server_spans_name_the_rate_limit_the_quota_wait_coalescing_and_local_answers() {
    let mock = Mock::start_with(&["--search-latency-ms", "300"]);
    let (collector, mut spans) = receiver().await;
    let (_sc, addr) = exporting_sidecar_with(
        &mock,
        &collector,
        &[],
        "[[routes]]\nname = \"search\"\nrate_limit = \"3 per minute\"\n\
         [[routes]]\nname = \"rag\"\nupstream_limit = \"1 per second\"\nupstream_queue = \"5s\"\n\
         [[routes]]\nname = \"default\"\ntimeout = \"300ms\"\n\
         upstream_limit = \"1 per minute\"\nupstream_queue = \"10ms\"\n",
    );
    let http = client();
    let post = |path: &'static str, trace: String, query: &'static str| {
        let http = http.clone();
        async move {
            http.post(format!("http://{addr}{path}"))
                .header("traceparent", format!("00-{trace}-{CLIENT_SPAN}-01"))
                .json(&json!({"query": query}))
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    // Two identical searches at once: one goes upstream, one shares it.
    let (a, b) = tokio::join!(
        post("/api/search", "a1".repeat(16), "one question"),
        post("/api/search", "a2".repeat(16), "one question")
    );
    assert_eq!((a, b), (reqwest::StatusCode::OK, reqwest::StatusCode::OK));
    // A third is allowed, the fourth is over 3 per minute.
    assert_eq!(post("/api/search", "a3".repeat(16), "another").await, 200);
    assert_eq!(post("/api/search", "a4".repeat(16), "a third").await, 429);
    // The sidecar's own 504 (the app takes longer than the route's 300 ms)
    // and 503 (no room under the default route's quota of 1 per minute).
    let stats = |trace: String, delay: &'static str| {
        let http = http.clone();
        async move {
            http.get(format!("http://{addr}/api/stats"))
                .header("traceparent", format!("00-{trace}-{CLIENT_SPAN}-01"))
                .header("X-Mock-Delay-Ms", delay)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(stats("c1".repeat(16), "2000").await, 504);
    assert_eq!(stats("c2".repeat(16), "0").await, 503);
    // Two RAG questions in a row: the second waits for the first to leave
    // the window (1 per second, with the guard 1.25 s).
    assert_eq!(
        post("/api/rag/query", "b1".repeat(16), "rag one").await,
        200
    );
    assert_eq!(
        post("/api/rag/query", "b2".repeat(16), "rag two").await,
        200
    );

    let mut found = server_spans(
        &mut spans,
        &["a1", "a2", "a4", "b2", "c1", "c2"].map(|t| t.repeat(16)),
    )
    .await;
    let mut take = |t: &str| found.remove(&t.repeat(16)).unwrap();
    let (first, second) = (take("a1"), take("a2"));
    let coalesced: Vec<bool> = [&first, &second]
        .iter()
        .map(|g| {
            matches!(
                g.attr("rag_sidecar.coalesced"),
                Some(Value::BoolValue(true))
            )
        })
        .collect();
    assert_eq!(
        coalesced.iter().filter(|c| **c).count(),
        1,
        "one of the two shares the other's answer: {coalesced:?}"
    );
    assert_eq!(first.text("rag_sidecar.rate_limit"), Some("allowed"));
    let limited = take("a4");
    assert_eq!(limited.int("http.response.status_code"), Some(429));
    assert_eq!(limited.text("rag_sidecar.rate_limit"), Some("limited"));
    assert_eq!(limited.text("rag_sidecar.refused"), Some("rate_limited"));
    for (trace, status, error) in [("c1", 504, "timeout"), ("c2", 503, "upstream_quota")] {
        let local = take(trace);
        assert_eq!(local.int("http.response.status_code"), Some(status));
        assert_eq!(local.text("error.type"), Some(error));
    }
    let waited = take("b2");
    let wait = match waited.attr("rag_sidecar.upstream_quota.wait_seconds") {
        Some(Value::DoubleValue(w)) => *w,
        other => panic!("no quota wait: {other:?}"),
    };
    assert!(wait > 1.0, "the second RAG question waited {wait} s");
}
