//! Chaos for the fleet: three real sidecar processes on one real
//! redis-server in front of one mock app, under steady search load spread
//! over the three, with an upload (a corpus change) through one of them
//! every few hundred milliseconds, while Redis is killed and brought back.
//!
//! Every answer is recorded with the corpus version it carries (the mock
//! puts it in every search answer) and the run counts the answers served
//! from before a corpus change beyond the contract's bound: an answer to a
//! request sent more than 1 s after the change became visible (its upload
//! answered), carrying an older version. The bound does not hold for a
//! sidecar cut off from Redis (it serves its own memory layer until it
//! reconnects), so the outage, until every sidecar is connected again, is
//! left out; the count must be 0. Every request must have a status and be
//! a 200: Redis down never fails a request.
//!
//! The second run puts two sidecars on a three-primary Redis Cluster and
//! kills one primary under load, then starts it again: no request may fail
//! because of it.
//!
//! `make test` runs both test-sized; `make chaos` runs them with
//! `CHAOS=full` (longer phases, more clients) and writes the tables to
//! target/chaos-fleet.md.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test measures real processes and shares state with its scripted services: the wall clock and a plain lock are right here"
)]

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Mock, Redis, RedisCluster, client, fleet_member, load};
use serde_json::{Value, json};

/// The contract's bound on an invalidation reaching every sidecar.
const BOUND: Duration = Duration::from_secs(1);

struct Scale {
    clients: usize,
    phase: Duration,
    upload_every: Duration,
}

/// One search answer.
struct Record {
    member: usize,
    sent: Duration,
    status: Result<u16, String>,
    x_cache: String,
    corpus: Option<u64>,
}

async fn connected(addr: SocketAddr) -> bool {
    let Ok(r) = client()
        .get(format!("http://{addr}/api/cache/stats"))
        .send()
        .await
    else {
        return false;
    };
    r.json::<Value>().await.unwrap_or(Value::Null)["redis_connected"] == true
}

#[tokio::test]
async fn three_sidecars_never_serve_answers_from_before_a_corpus_change() {
    let full = std::env::var("CHAOS").is_ok_and(|v| v == "full");
    let scale = if full {
        Scale {
            clients: 24,
            phase: Duration::from_secs(10),
            upload_every: Duration::from_millis(500),
        }
    } else {
        Scale {
            clients: 6,
            phase: Duration::from_millis(2500),
            upload_every: Duration::from_millis(300),
        }
    };
    let mock = Mock::start_with(&["--search-latency-ms", "5"]);
    let mut redis = Redis::start();
    let members: Vec<_> = (0..3)
        .map(|_| fleet_member(&mock.url(), &redis.url(), ""))
        .collect();
    let addrs: Vec<SocketAddr> = members.iter().map(|(_, a)| *a).collect();
    for a in &addrs {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !connected(*a).await {
            assert!(Instant::now() < deadline, "{a} never connected to Redis");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(scale.clients, &stop, {
        let addrs = addrs.clone();
        move |http: reqwest::Client, i: usize| {
            let addrs = addrs.clone();
            async move {
                let member = i % 3;
                let sent = started.elapsed();
                let r = http
                    .post(format!("http://{}/api/search", addrs[member]))
                    .header("host", "rag-services")
                    .json(&json!({"query": format!("question {}", i % 10)}))
                    .send()
                    .await;
                match r {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let x_cache = r
                            .headers()
                            .get("x-cache")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        match r.json::<Value>().await {
                            Ok(v) => Record {
                                member,
                                sent,
                                status: Ok(status),
                                x_cache,
                                corpus: v["corpus_version"].as_u64(),
                            },
                            Err(e) => Record {
                                member,
                                sent,
                                status: Err(format!("body: {e}")),
                                x_cache,
                                corpus: None,
                            },
                        }
                    }
                    Err(e) => Record {
                        member,
                        sent,
                        status: Err(e.to_string()),
                        x_cache: String::new(),
                        corpus: None,
                    },
                }
            }
        }
    });

    // Uploads through each sidecar in turn, each change's time recorded
    // when its upload answered (version n: the n-th upload).
    let uploader = {
        let (stop, addrs) = (Arc::clone(&stop), addrs.clone());
        tokio::spawn(async move {
            let mut changes: Vec<(u64, Duration)> = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let member = (n as usize) % 3;
                let r = client()
                    .post(format!("http://{}/api/upload", addrs[member]))
                    .body(format!("document {n}"))
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status() == 200) {
                    n += 1;
                    changes.push((n, started.elapsed()));
                }
                tokio::time::sleep(scale.upload_every).await;
            }
            changes
        })
    };

    tokio::time::sleep(scale.phase).await;
    let down = started.elapsed();
    redis.stop();
    tokio::time::sleep(scale.phase).await;
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    for a in &addrs {
        while !connected(*a).await {
            assert!(Instant::now() < deadline, "{a} never reconnected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let back = started.elapsed();
    tokio::time::sleep(scale.phase).await;
    stop.store(true, Ordering::Relaxed);
    let changes = uploader.await.unwrap();
    let mut records = Vec::new();
    for w in workers {
        records.extend(w.await.unwrap());
    }

    // The version every answer must at least carry: the last change that
    // became visible more than BOUND before the request was sent.
    let owed = |sent: Duration| {
        changes
            .iter()
            .filter(|(_, at)| *at + BOUND < sent)
            .map(|(v, _)| *v)
            .max()
            .unwrap_or(0)
    };
    let excluded = |sent: Duration| sent >= down && sent < back + BOUND;
    let mut lines = Vec::new();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let mut late = [0usize; 3];
    let mut late_in_outage = 0usize;
    for r in &records {
        let key = match &r.status {
            Ok(s) => format!("{s} {}", r.x_cache),
            Err(e) => {
                lines.push(format!("no answer at {:?}: {e}", r.sent));
                "none".into()
            }
        };
        *statuses.entry(key).or_insert(0) += 1;
        if let Some(v) = r.corpus {
            if v < owed(r.sent) {
                if excluded(r.sent) {
                    late_in_outage += 1;
                } else {
                    late[r.member] += 1;
                    lines.push(format!(
                        "sidecar {} at {:?}: {} with version {v}, owed {}",
                        r.member,
                        r.sent,
                        r.x_cache,
                        owed(r.sent)
                    ));
                }
            }
        }
    }
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| answers | uploads | Redis down | answers from before a corpus change, beyond the {} s bound | (within the outage, not counted) | statuses |\n|---:|---:|---|---:|---:|---|",
        BOUND.as_secs()
    );
    let _ = writeln!(
        table,
        "| {} | {} | {:.1} s → every sidecar back at {:.1} s | {} | {} | {} |",
        records.len(),
        changes.len(),
        down.as_secs_f64(),
        back.as_secs_f64(),
        late.iter().sum::<usize>(),
        late_in_outage,
        statuses
            .iter()
            .map(|(s, n)| format!("{s}×{n}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let _ = writeln!(
        table,
        "\n{} clients over 3 sidecars, phases of {:?}, an upload every {:?}",
        scale.clients, scale.phase, scale.upload_every
    );
    println!("{table}");
    if full {
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chaos-fleet.md");
        std::fs::write(&out, &table).unwrap();
    }
    assert_eq!(late, [0, 0, 0], "{lines:#?}\n{table}");
    assert!(
        records.iter().all(|r| r.status == Ok(200)),
        "{lines:#?}\n{table}"
    );
    assert!(changes.len() >= 10, "too few uploads: {}", changes.len());
    assert!(records.len() > 300, "too little load: {}", records.len());
    drop(members);
}

#[tokio::test]
async fn a_cluster_primary_killed_under_load_fails_no_request() {
    let full = std::env::var("CHAOS").is_ok_and(|v| v == "full");
    let (clients, phase) = if full {
        (16, Duration::from_secs(10))
    } else {
        (4, Duration::from_millis(2000))
    };
    let mock = Mock::start_with(&["--search-latency-ms", "5"]);
    let mut cluster = RedisCluster::start(3);
    let members: Vec<_> = (0..2)
        .map(|_| fleet_member(&mock.url(), &cluster.url(), ""))
        .collect();
    let addrs: Vec<SocketAddr> = members.iter().map(|(_, a)| *a).collect();
    for a in &addrs {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !connected(*a).await {
            assert!(
                Instant::now() < deadline,
                "{a} never connected to the cluster"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(clients, &stop, {
        let addrs = addrs.clone();
        move |http: reqwest::Client, i: usize| {
            let addrs = addrs.clone();
            async move {
                let r = http
                    .post(format!("http://{}/api/search", addrs[i % 2]))
                    .header("host", "rag-services")
                    // Mostly new questions: misses, which go to Redis (a
                    // read, a lease, a write) rather than memory.
                    .json(&json!({"query": format!("question {i}")}))
                    .send()
                    .await;
                match r {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        r.bytes().await.map(|_| s).map_err(|e| e.to_string())
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    });
    tokio::time::sleep(phase).await;
    cluster.kill(1);
    tokio::time::sleep(phase).await;
    cluster.restart(1);
    tokio::time::sleep(phase).await;
    stop.store(true, Ordering::Relaxed);
    let mut records = Vec::new();
    for w in workers {
        records.extend(w.await.unwrap());
    }
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        let k = match r {
            Ok(s) => s.to_string(),
            Err(e) => format!("no status ({e})"),
        };
        *statuses.entry(k).or_insert(0) += 1;
    }
    let errors: u64 = client()
        .get(format!("http://{}/metrics", addrs[0]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("rag_sidecar_redis_errors_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    let table = format!(
        "\n| requests | statuses | Redis errors counted by sidecar 0 |\n|---:|---|---:|\n| {} | {} | {errors} |\n\n{clients} clients over 2 sidecars on a 3-primary cluster; primary 1 killed for {phase:?}, then restarted",
        records.len(),
        statuses
            .iter()
            .map(|(s, n)| format!("{s}×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("{table}");
    if full {
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/chaos-fleet.md");
        let mut text = std::fs::read_to_string(&out).unwrap_or_default();
        text.push_str(&table);
        std::fs::write(&out, text).unwrap();
    }
    assert!(records.iter().all(|r| *r == Ok(200)), "{table}");
    assert!(records.len() > 200, "too little load: {}", records.len());
    drop(members);
}
