//! Reload without a restart (PRODUCT.md "Running it"), on the real binary:
//! SIGHUP, a change of the config file and a Kubernetes ConfigMap's symlink
//! swap; what a reload changes and what it keeps (cache entries, limiter
//! counts, circuit states); requests in flight finishing on the old
//! configuration; an invalid file refused whole; settings that need a
//! restart kept and logged; no request lost under load during reloads.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test drives a real process: the wall clock and plain threads are right here"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Mock, SidecarProcess, client, eventually, free_addr, signal, x_cache};
use serde_json::{Value, json};

/// The file's common head: where to listen, the app, no retries.
fn head(addr: SocketAddr, mock: &Mock) -> String {
    format!(
        "listen = \"{addr}\"\nupstream = \"{}\"\nreadiness_path = \"/__mock/fast\"\n",
        mock.url()
    )
}

/// `POST /api/cache/clear` at `base` with a bearer `token`: its status.
async fn clear_with(base: String, token: &str) -> u16 {
    client()
        .post(format!("{base}/api/cache/clear"))
        .bearer_auth(token)
        .json(&json!({"pattern": "nothing:*"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

struct Running {
    p: SidecarProcess,
    addr: SocketAddr,
}

impl Running {
    fn start(toml: &str, addr: SocketAddr) -> Self {
        Self::start_env(toml, &[("LOG_LEVEL", "INFO")], addr)
    }

    fn start_env(toml: &str, env: &[(&str, &str)], addr: SocketAddr) -> Self {
        Self {
            p: SidecarProcess::start(toml, env, addr),
            addr,
        }
    }

    fn file(&self) -> PathBuf {
        self.p.dir.path().join("rag-sidecar.toml")
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn reloads(&self, result: &str) -> u64 {
        let text = common::get_text_at(self.url("/metrics")).await;
        let series = format!("rag_sidecar_config_reloads_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
    }

    /// Waits for the `n`th reload with `result`.
    async fn until_reloads(&self, result: &str, n: u64) {
        eventually(&format!("reload {n} {result}"), async || {
            self.reloads(result).await >= n
        })
        .await;
    }

    async fn search(&self, q: &str, key: &str) -> reqwest::Response {
        client()
            .post(self.url("/api/search"))
            .header("X-API-Key", key)
            .json(&json!({"query": q, "top_k": 1}))
            .send()
            .await
            .unwrap()
    }

    async fn circuits(&self) -> Value {
        common::get_json_at(self.url("/api/circuit-breakers")).await
    }

    /// The log so far (the process is stopped first).
    fn log(mut self) -> String {
        common::sigterm(self.p.pid());
        common::wait_exit(&mut self.p, Duration::from_secs(30));
        let mut log = String::new();
        std::io::Read::read_to_string(&mut self.p.child.stderr.take().unwrap(), &mut log).unwrap();
        log
    }
}

/// SIGHUP reads the sources again (here `.env`, which is not watched) and a
/// new file is taken by itself: the new admin token, TTL and limits are in
/// force at once, while the cache entries, the limiter counts and the
/// circuit state of what did not change are kept.
#[tokio::test]
async fn a_reload_applies_what_changed_and_keeps_the_rest() {
    let mock = Mock::start_with(&["--search-latency-ms", "0", "--rag-latency-ms", "0"]);
    let addr = free_addr();
    let v1 = format!(
        "{}[admin]\ntoken = \"one\"\n[rate_limit]\nkey = \"header:X-API-Key\"\n\
         [retry]\nmax_retries = 0\n[circuit_breaker]\nthreshold = 2\ntimeout = \"60s\"\n\
         [[routes]]\nname = \"search\"\nrate_limit = \"2 per minute\"\n",
        head(addr, &mock)
    );
    let sc = Running::start(&v1, addr);
    // A cache entry (client e's: the key header is in the cache key), a
    // client at its limit, an open circuit.
    assert_eq!(x_cache(&sc.search("kept", "e").await), "MISS");
    assert_eq!(x_cache(&sc.search("kept", "a").await), "MISS");
    assert_eq!(x_cache(&sc.search("kept", "a").await), "HIT");
    assert_eq!(sc.search("kept", "a").await.status(), 429);
    for _ in 0..2 {
        let r = client()
            .post(sc.url("/api/rag/query"))
            .header("X-API-Key", "c")
            .header("X-Mock-Status", "503")
            .json(&json!({"query": "failing"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
    }
    assert_eq!(sc.circuits().await["gemini"]["state"], "open");
    let docs = |key: &'static str| {
        let url = sc.url("/api/documents");
        async move {
            client()
                .get(url)
                .header("X-API-Key", key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    for _ in 0..3 {
        assert_eq!(docs("d").await, 200, "no limit of its own yet");
    }

    // SIGHUP with a new token in .env (read again, not watched).
    std::fs::write(sc.p.dir.path().join(".env"), "ADMIN_TOKEN=two\n").unwrap();
    signal(sc.p.pid(), "-HUP");
    sc.until_reloads("applied", 1).await;
    let clear = |token: &'static str| clear_with(sc.url(""), token);
    assert_eq!(clear("one").await, 403, "the old token no longer works");
    assert_eq!(clear("two").await, 200);

    // The file changed: a TTL and a new limit on the documents route, the
    // search limit and the circuits as they were.
    let v2 = format!(
        "{v1}[[routes]]\nname = \"documents\"\nmethods = [\"GET\"]\npath = \"/api/documents\"\nrate_limit = \"1 per minute\"\n\
         [[routes]]\nname = \"rag\"\ncache = {{ ttl = \"7m\" }}\n"
    );
    std::fs::write(sc.file(), &v2).unwrap();
    sc.until_reloads("applied", 2).await;
    assert_eq!(docs("d").await, 200);
    assert_eq!(docs("d").await, 429, "the new limit in force");
    let stats = common::get_json_at(sc.url("/api/cache/stats")).await;
    assert_eq!(stats["namespaces"]["rag"]["ttl_seconds"], 420, "{stats}");
    assert_eq!(sc.search("kept", "a").await.status(), 429, "the count kept");
    assert_eq!(
        x_cache(&sc.search("kept", "e").await),
        "HIT",
        "the entry kept"
    );
    assert_eq!(
        sc.circuits().await["gemini"]["state"],
        "open",
        "the circuit kept"
    );
    assert_eq!(sc.reloads("refused").await, 0);
    let log = sc.log();
    assert!(log.contains("trigger=\"SIGHUP\""), "{log}");
    assert!(log.contains("trigger=\"the config file changed\""), "{log}");
}

/// A Kubernetes ConfigMap volume: the file is a symlink into `..data`, a
/// symlink to a timestamped directory, and an update swaps `..data`
/// atomically (a new directory, a new link renamed over the old one).
#[tokio::test]
async fn a_configmap_symlink_swap_is_followed() {
    let mock = Mock::start();
    let addr = free_addr();
    let volume = tempfile::tempdir().unwrap();
    let write_version = |dir: &Path, name: &str, text: &str| {
        let d = dir.join(name);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("config.toml"), text).unwrap();
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(name, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
    };
    let v1 = format!("{}[admin]\ntoken = \"one\"\n", head(addr, &mock));
    write_version(volume.path(), "..2026_12_07_00_00_00.1", &v1);
    std::os::unix::fs::symlink("..data/config.toml", volume.path().join("config.toml")).unwrap();
    let bin = SidecarProcess::bin();
    let mut child = std::process::Command::new(bin)
        .arg("--config")
        .arg(volume.path().join("config.toml"))
        .env_clear()
        .env("LOG_LEVEL", "WARN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut child);
    let url = |p: &str| format!("http://{addr}{p}");
    eventually("started", async || {
        client().get(url("/healthz")).send().await.is_ok()
    })
    .await;
    let clear = |token: &'static str| clear_with(url(""), token);
    assert_eq!(clear("one").await, 200);
    let v2 = format!("{}[admin]\ntoken = \"two\"\n", head(addr, &mock));
    write_version(volume.path(), "..2026_12_07_00_01_00.2", &v2);
    eventually("the swapped file in force", async || {
        clear("two").await == 200
    })
    .await;
    assert_eq!(clear("one").await, 403);
}

/// An invalid file is refused whole: every error logged with its key, the
/// running configuration kept, the refusal counted; settings that need a
/// restart are kept at their running values and logged as such.
#[tokio::test]
async fn an_invalid_file_is_refused_whole_and_restart_only_settings_are_kept() {
    let mock = Mock::start();
    let addr = free_addr();
    let v1 = format!("{}[admin]\ntoken = \"one\"\n", head(addr, &mock));
    let sc = Running::start(&v1, addr);
    // A good change (the token) next to two bad values: none of it taken.
    let bad = format!(
        "{}[admin]\ntoken = \"two\"\n[circuit_breaker]\nthreshold = \"many\"\n[cache]\nnot_a_key = 1\n",
        head(addr, &mock)
    );
    std::fs::write(sc.file(), bad).unwrap();
    sc.until_reloads("refused", 1).await;
    let clear = |token: &'static str| clear_with(sc.url(""), token);
    assert_eq!(clear("one").await, 200, "the running configuration stays");
    assert_eq!(clear("two").await, 403);
    // Now a valid file that also moves the listener and Redis: those keep
    // their running values (the sidecar still answers where it was).
    let other = free_addr();
    let moved = format!(
        "{}[admin]\ntoken = \"two\"\n[redis]\nurl = \"redis://:secret@127.0.0.1:1/0\"\n",
        head(other, &mock)
    );
    std::fs::write(sc.file(), moved).unwrap();
    sc.until_reloads("applied", 1).await;
    assert_eq!(clear("two").await, 200, "the valid rest taken");
    let stats = common::get_json_at(sc.url("/api/cache/stats")).await;
    assert!(stats.get("redis_connected").is_none_or(|v| v == false));
    assert!(
        client()
            .get(format!("http://{other}/healthz"))
            .send()
            .await
            .is_err(),
        "nothing listens on the new address"
    );
    let log = sc.log();
    assert!(log.contains("circuit_breaker.threshold"), "{log}");
    assert!(log.contains("cache.not_a_key"), "{log}");
    assert!(log.contains("config reload refused"), "{log}");
    assert!(log.contains("listen needs a restart"), "{log}");
    assert!(log.contains("redis.url needs a restart"), "{log}");
    assert!(!log.contains("secret"), "a password logged: {log}");
}

/// A request in flight finishes under the configuration it started with,
/// the next one takes the new: a slow search started under a 5 s route
/// timeout answers 200 after a reload to 1 s, a new one then gets 504.
/// Meanwhile clients on keep-alive connections see no error through ten
/// reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_finish_on_the_old_configuration_and_reloads_drop_nothing() {
    let mock = Mock::start_with(&["--search-latency-ms", "0", "--rag-latency-ms", "0"]);
    let addr = free_addr();
    let with_timeout = |t: &str| {
        format!(
            "{}[rate_limit]\nenabled = false\n[retry]\nmax_retries = 0\n\
             [[routes]]\nname = \"search\"\ntimeout = \"{t}\"\ncache = false\n",
            head(addr, &mock)
        )
    };
    let sc = Running::start(&with_timeout("5s"), addr);
    let slow = |delay: u64| {
        let u = sc.url("/api/search");
        async move {
            client()
                .post(u)
                .header("X-Mock-Delay-Ms", delay.to_string())
                .json(&json!({"query": "slow", "top_k": 1}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let in_flight = tokio::spawn(slow(2500));
    // The request is at the app before the reload.
    mock.wait_stats("the slow search at the app", |s| {
        s["requests"].as_u64() >= Some(1)
    })
    .await;
    std::fs::write(sc.file(), with_timeout("1s")).unwrap();
    sc.until_reloads("applied", 1).await;
    assert_eq!(slow(2500).await, 504, "a new request: the new timeout");
    assert_eq!(in_flight.await.unwrap(), 200, "in flight: the old timeout");

    // Load on keep-alive connections through ten reloads.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (stop, url) = (std::sync::Arc::clone(&stop), sc.url("/api/search"));
        clients.push(tokio::spawn(async move {
            let http = client();
            let (mut ok, mut bad) = (0u32, Vec::new());
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http
                    .post(&url)
                    .json(&json!({"query": format!("load {c} {i}"), "top_k": 1}))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => bad.push(r.status().to_string()),
                    Err(e) => bad.push(e.to_string()),
                }
                i += 1;
            }
            (ok, bad)
        }));
    }
    let started = Instant::now();
    for n in 0..10u64 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = if n % 2 == 0 { "3s" } else { "4s" };
        std::fs::write(sc.file(), with_timeout(t)).unwrap();
        signal(sc.p.pid(), "-HUP");
        sc.until_reloads("applied", n + 2).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut bad) = (0, Vec::new());
    for c in clients {
        let (o, b) = c.await.unwrap();
        ok += o;
        bad.extend(b);
    }
    eprintln!(
        "{ok} answers over {:?} and 10 reloads, {} errors",
        started.elapsed(),
        bad.len()
    );
    assert!(ok > 100, "only {ok} answers");
    assert!(
        bad.is_empty(),
        "{} errors: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    assert_eq!(sc.reloads("refused").await, 0);
}

/// The upstream quota and the log level are live too: a RAG question
/// refused under "1 per minute" goes through once the file says 5, and
/// the access log (INFO) appears once the level goes from warn to info.
#[tokio::test]
async fn the_upstream_quota_and_the_log_level_are_reloaded() {
    let mock = Mock::start_with(&["--search-latency-ms", "0", "--rag-latency-ms", "0"]);
    let addr = free_addr();
    let with = |limit: &str, level: &str| {
        format!(
            "{}[log]\nlevel = \"{level}\"\n[rate_limit]\nenabled = false\n\
             [[routes]]\nname = \"rag\"\nupstream_limit = \"{limit}\"\nupstream_queue = \"100ms\"\n",
            head(addr, &mock)
        )
    };
    // No LOG_LEVEL in the environment: the file's level is the one.
    let sc = Running::start_env(&with("1 per minute", "warn"), &[], addr);
    let rag = |q: &'static str| {
        let u = sc.url("/api/rag/query");
        async move {
            client()
                .post(u)
                .json(&json!({"query": q}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(rag("first").await, 200);
    assert_eq!(
        rag("second").await,
        503,
        "the quota of 1 per minute is spent"
    );
    std::fs::write(sc.file(), with("5 per minute", "info")).unwrap();
    sc.until_reloads("applied", 1).await;
    assert_eq!(rag("third").await, 200, "the new quota in force");
    let log = sc.log();
    let access = |q: &str| {
        log.lines()
            .filter(|l| l.contains("rag_sidecar::access") && l.contains(q))
            .count()
    };
    assert_eq!(
        access("status=503"),
        0,
        "warn: no access lines before: {log}"
    );
    assert_eq!(
        access("status=200"),
        1,
        "info: the third request's line after: {log}"
    );
}

/// Retry settings are live: a failing search is tried once under
/// `max_retries = 0`, three times once the file says 2.
#[tokio::test]
async fn retry_settings_are_reloaded() {
    let mock = Mock::start_with(&["--search-latency-ms", "0", "--rag-latency-ms", "0"]);
    let addr = free_addr();
    let with = |retries: u32| {
        format!(
            "{}[rate_limit]\nenabled = false\n[circuit_breaker]\nenabled = false\n\
             [retry]\nmax_retries = {retries}\ninitial_wait = \"10ms\"\nmax_wait = \"20ms\"\n",
            head(addr, &mock)
        )
    };
    let sc = Running::start(&with(0), addr);
    let failing = |q: &str| {
        let u = sc.url("/api/search");
        let q = q.to_string();
        async move {
            client()
                .post(u)
                .header("X-Mock-Status", "503")
                .json(&json!({"query": q, "top_k": 1}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let before = mock.stats().await["requests"].as_u64().unwrap();
    assert_eq!(failing("once").await, 503);
    assert_eq!(mock.stats().await["requests"].as_u64().unwrap() - before, 1);
    std::fs::write(sc.file(), with(2)).unwrap();
    sc.until_reloads("applied", 1).await;
    let before = mock.stats().await["requests"].as_u64().unwrap();
    assert_eq!(failing("thrice").await, 503);
    assert_eq!(mock.stats().await["requests"].as_u64().unwrap() - before, 3);
}
