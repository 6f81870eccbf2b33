//! Criterion benches for the cache's hot path: the key of a 1 KiB JSON
//! search body (target < 5 µs), a memory hit at 1 000, 10 000 and 100 000
//! entries (target: flat), the fleet's generation check a hit adds (twice:
//! target ≤ 50 ns in all), and, against a real redis-server started here
//! (skipped without one), the Redis round trips a leading miss adds in a
//! fleet (the lease taken, then released) beside one plain `GET`.

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use http::{HeaderMap, HeaderName, Method, StatusCode, Uri};
use rag_sidecar::config::Config;
use rag_sidecar::layers::cache::entry::Entry;
use rag_sidecar::layers::cache::key::cache_key;
use rag_sidecar::layers::cache::store::CacheStore;
use rag_sidecar::redis::RedisStore;
use rag_sidecar::redis::fleet::Acquired;
use std::time::Duration;

fn one_kib_body() -> Vec<u8> {
    let filler: String = "ngữ cảnh tài liệu ".repeat(40);
    let body = serde_json::json!({
        "query": "  Học máy là gì và   nó khác gì với học sâu? ",
        "top_k": 5,
        "language": "auto",
        "filters": {"source": "docs", "year": 2025, "tags": ["ml", "dl", "rag"]},
        "context": filler,
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

fn key_bench(c: &mut Criterion) {
    let body = one_kib_body();
    assert!((900..1300).contains(&body.len()), "{}", body.len());
    let ids: Vec<HeaderName> = ["authorization", "x-api-key", "x-user-id"]
        .iter()
        .map(|h| HeaderName::from_static(h))
        .collect();
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-user-id",
        "user-42"
            .parse()
            .unwrap_or(http::HeaderValue::from_static("u")),
    );
    let uri: Uri = Uri::from_static("/api/search");
    c.bench_function("cache_key/1KiB_json", |b| {
        b.iter(|| {
            cache_key(
                "search",
                &Method::POST,
                &uri,
                &headers,
                &ids,
                black_box(&body),
            )
        })
    });
}

fn hit_bench(c: &mut Criterion) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let mut group = c.benchmark_group("memory_hit");
    for n in [1_000usize, 10_000, 100_000] {
        let toml = format!(
            "[cache]\nmax_memory_bytes = 1073741824\n[[routes]]\nname = \"search\"\ncache = {{ max_items = {n} }}\n"
        );
        let cfg = config_from(&toml);
        let store = rt
            .block_on(async { CacheStore::new(&cfg, None) })
            .unwrap_or_else(|e| panic!("{e}"));
        let Some(ns) = store.namespace("search").map(Arc::clone) else {
            return;
        };
        let body = Bytes::from(vec![b'x'; 256]);
        let keys: Vec<String> = (0..n).map(|i| format!("search:{i:032x}")).collect();
        rt.block_on(async {
            for k in &keys {
                let e = Arc::new(
                    Entry::new(StatusCode::OK, HeaderMap::new(), body.clone(), 0, 3_600_000)
                        .with_generation(ns.generation()),
                );
                store.put(&ns, k.clone(), e).await;
            }
        });
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                i = (i + 7919) % keys.len();
                // The memory path completes without awaiting anything.
                store.get(&ns, black_box(&keys[i])).now_or_never()
            })
        });
        if n == 10_000 {
            // What the fleet adds to a hit: the entry's generation against
            // the namespace's (`get` checks it, then the layer's standing).
            let e = Entry::new(StatusCode::OK, HeaderMap::new(), body.clone(), 0, 1);
            group.bench_function("generation_check", |b| {
                b.iter(|| black_box(&ns).is_current(black_box(&e)))
            });
        }
    }
    group.finish();
}

/// A redis-server on a free port, killed on drop.
struct RedisServer(std::process::Child, u16);

impl RedisServer {
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .ok()?;
        Some(Self(child, port))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lease_bench(c: &mut Criterion) {
    let Some(server) = RedisServer::start() else {
        eprintln!("lease bench skipped: no redis-server");
        return;
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    let url = format!("redis://127.0.0.1:{}/0", server.1);
    let redis = rt.block_on(async {
        let r = RedisStore::start(&url, Duration::from_secs(1), "bench:", Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..500 {
            if r.is_connected() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        r
    });
    if !redis.is_connected() {
        eprintln!("lease bench skipped: redis-server did not answer");
        return;
    }
    let mut group = c.benchmark_group("miss_round_trips");
    let ttl = Duration::from_secs(5);
    let mut i = 0u64;
    group.bench_function("lease_acquire_and_release", |b| {
        b.iter(|| {
            i += 1;
            let key = format!("search:{i:032x}");
            rt.block_on(async {
                let got = redis.acquire_lease(&key, "token", ttl, 7).await;
                assert!(matches!(got, Ok(Acquired::Taken)), "{got:?}");
                let released = redis.release_lease(&key, "token", Some(7)).await;
                assert!(released.is_ok(), "{released:?}");
            })
        })
    });
    group.bench_function("get_for_reference", |b| {
        b.iter(|| rt.block_on(redis.get(black_box("search:absent"))))
    });
    group.finish();
    drop(server);
}

fn config_from(toml: &str) -> Config {
    let dir = std::env::temp_dir().join(format!("rag-sidecar-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("bench.toml");
    let _ = std::fs::write(&path, toml);
    let o = rag_sidecar::config::Overrides {
        config: Some(path),
        ..Default::default()
    };
    let env = std::collections::HashMap::new();
    match Config::load(&o, &env, &dir) {
        Ok((c, _)) => c,
        Err(e) => panic!("{e}"),
    }
}

criterion_group!(benches, key_bench, hit_bench, lease_bench);
criterion_main!(benches);
