//! Test fixtures: the mock legacy app as a real process, the sidecar
//! in-process (on a real 127.0.0.1 socket) or as the real binary.

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test measures real processes and shares state with its scripted services: the wall clock and a plain lock are right here"
)]
#![allow(dead_code, reason = "each test file uses only some of these helpers")]

pub mod scripted;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use rag_sidecar::admin::Endpoint;
use rag_sidecar::app::App;
use rag_sidecar::config::{Config, Overrides};

/// The mock legacy app's binary, `target/<profile>/mock-legacy-app`, beside
/// the sidecar's.
///
/// It is the `mock-app` workspace member, another package, and cargo builds
/// (and names in `CARGO_BIN_EXE_*`) only the binaries of the package under
/// test. So the first spawn of each test process runs
/// `cargo build -p mock-legacy-app` with the sidecar's profile and target
/// directory: a no-op when the mock is up to date, a rebuild when its source
/// changed, never a stale or missing mock under `cargo test --test FILE`.
/// `cargo test` releases the build directory's lock before it runs the
/// tests, so this does not wait on it (tried with cargo 1.95: a mock edit is
/// rebuilt from inside `cargo test --test proxy`).
pub fn mock_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let sidecar = Path::new(env!("CARGO_BIN_EXE_rag-sidecar"));
        let bin = sidecar.with_file_name("mock-legacy-app");
        // target/<profile dir>/rag-sidecar; `debug` is the dev (and test)
        // profile's directory, any other is named as its profile.
        let profile_dir = sidecar.parent().expect("the sidecar's directory");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(name) => name,
        };
        let target_dir = profile_dir.parent().expect("the target directory");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "-p", "mock-legacy-app", "--bin", "mock-legacy-app"])
            .args(["--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        let shown = format!("{build:?}");
        let out = build
            .output()
            .unwrap_or_else(|e| panic!("could not run {shown}: {e}"));
        assert!(
            out.status.success(),
            "building the mock failed: {shown}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            bin.is_file(),
            "{shown} succeeded, but {} is missing",
            bin.display()
        );
        bin
    })
}

/// The mock legacy app, killed on drop.
pub struct Mock {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The flags it was started with, for a restart.
    args: Vec<String>,
}

impl Mock {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let args: Vec<String> = ["--search-latency-ms", "--rag-latency-ms"]
            .into_iter()
            .filter(|flag| !extra.contains(flag))
            .flat_map(|flag| [flag, "0"])
            .chain(extra.iter().copied())
            .map(String::from)
            .collect();
        let (child, addr) = Self::spawn("127.0.0.1:0", &args);
        Self {
            child: Some(child),
            addr,
            args,
        }
    }

    fn spawn(listen: &str, args: &[String]) -> (Child, SocketAddr) {
        let mut child = Command::new(mock_bin())
            .args(["--listen", listen])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mock-legacy-app");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("mock said {line:?}"));
        (child, addr)
    }

    /// Kills the app (SIGKILL: a crash).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same address.
    pub fn restart(&mut self) {
        self.stop();
        let (child, _) = Self::spawn(&self.addr.to_string(), &self.args);
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stats(&self) -> serde_json::Value {
        reqwest::get(format!("{}/__mock/stats", self.url()))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits (bounded) until the mock's stats satisfy `pred`.
    pub async fn wait_stats(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats().await;
            if pred(&s) {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; stats {s}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Loads a configuration from TOML text and env pairs, as the binary would.
pub fn config(toml: &str, env: &[(&str, &str)]) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rag-sidecar.toml");
    std::fs::write(&path, toml).unwrap();
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let o = Overrides {
        config: Some(path),
        ..Overrides::default()
    };
    Config::load(&o, &env, dir.path())
        .map(|(c, _)| c)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The sidecar served in-process on 127.0.0.1:0; stopped on drop.
pub struct Sidecar {
    pub addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub done: Option<tokio::task::JoinHandle<()>>,
}

impl Sidecar {
    pub async fn start(upstream: &str, toml: &str) -> Self {
        Self::start_with(upstream, toml, Vec::new()).await
    }

    pub async fn start_with(upstream: &str, toml: &str, extra: Vec<Endpoint>) -> Self {
        Self::start_full(upstream, toml, &[], extra).await
    }

    pub async fn start_env(upstream: &str, toml: &str, env: &[(&str, &str)]) -> Self {
        Self::start_full(upstream, toml, env, Vec::new()).await
    }

    pub async fn start_full(
        upstream: &str,
        toml: &str,
        env: &[(&str, &str)],
        extra: Vec<Endpoint>,
    ) -> Self {
        // The sidecar probes the app in the background; unless a test is
        // about that probe, it goes to a mock control path, which is never
        // counted in the mock's stats nor served a test's armed fault.
        let probe = if toml.contains("readiness_path") {
            ""
        } else {
            "readiness_path = \"/__mock/fast\"\n"
        };
        let text = format!("listen = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\n{probe}{toml}");
        let server = App::bind_with(config(&text, env), extra).await.unwrap();
        let addr = server.local_addr().unwrap();
        let admin_addr = server.admin_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let done = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Self {
            addr,
            admin_addr,
            stop: Some(tx),
            done: Some(done),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// GET a sidecar path and parse its JSON answer.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        get_json_at(self.url(path)).await
    }

    /// GET a sidecar path that must answer 200, and its text.
    pub async fn get_text(&self, path: &str) -> String {
        let r = client().get(self.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        r.text().await.unwrap()
    }

    /// The bytes of request bodies the sidecar holds on disk now (its
    /// `rag_sidecar_request_spool_bytes` gauge).
    pub async fn spooled(&self) -> u64 {
        spooled_in(&self.get_text("/metrics").await)
    }

    /// POST a body to a sidecar path.
    pub async fn post(&self, path: &str, body: &'static str) -> reqwest::Response {
        client()
            .post(self.url(path))
            .body(body)
            .send()
            .await
            .unwrap()
    }

    /// POST a JSON body to a sidecar path.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        client()
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// GET a sidecar path and return its status.
    pub async fn get_status(&self, path: &str) -> u16 {
        self.status_of(http::Method::GET, path).await
    }

    /// The status of a body-less request.
    pub async fn status_of(&self, method: http::Method, path: &str) -> u16 {
        client()
            .request(method, self.url(path))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Begins the graceful shutdown.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A loopback port that refuses connections: bound but not listening, and
/// held for as long as the value lives, so no other test can take it.
pub struct ClosedPort {
    _socket: socket2::Socket,
    pub addr: SocketAddr,
}

impl ClosedPort {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub fn closed_port() -> ClosedPort {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    ClosedPort {
        _socket: socket,
        addr,
    }
}

/// A sidecar whose admin endpoints open only with this bearer token (the
/// loopback peer of the tests is not trusted).
pub async fn token_only_sidecar(upstream: &str, token: &str) -> Sidecar {
    let toml = format!("[admin]\ntoken = \"{token}\"\n");
    Sidecar::start(upstream, &toml).await
}

/// A mutating admin endpoint refuses a POST without the token (403) and
/// answers one with it (200).
pub async fn assert_needs_token(sc: &Sidecar, path: &str, token: &str) {
    let url = sc.url(path);
    let r = client().post(&url).send().await.unwrap();
    assert_eq!(r.status(), 403, "{path} without the token");
    let r = client().post(&url).bearer_auth(token).send().await.unwrap();
    assert_eq!(r.status(), 200, "{path} with the token");
}

/// GET a URL and parse its JSON answer.
pub async fn get_json_at(url: String) -> serde_json::Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// GET a URL that must answer 200, and its text.
pub async fn get_text_at(url: String) -> String {
    let resp = client().get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap()
}

/// The `X-Cache` header of an answer (empty without one).
pub fn x_cache(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// Waits until the sidecar at `base` (`http://host:port`) reports
/// `redis_connected`.
pub async fn until_redis_connected(base: &str) {
    eventually("redis_connected", async || {
        get_json_at(format!("{base}/api/cache/stats")).await["redis_connected"] == true
    })
    .await;
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// The real `rag-sidecar` binary, killed on drop.
pub struct SidecarProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl SidecarProcess {
    pub fn bin() -> PathBuf {
        PathBuf::from(env!("CARGO_BIN_EXE_rag-sidecar"))
    }

    /// Starts the binary in a fresh working directory holding `toml` as
    /// `rag-sidecar.toml`, and waits until `addr` accepts connections.
    pub fn start(toml: &str, env: &[(&str, &str)], addr: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rag-sidecar.toml"), toml).unwrap();
        let child = Command::new(Self::bin())
            .args(["--config", "rag-sidecar.toml"])
            .current_dir(dir.path())
            .env_clear()
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "sidecar did not start on {addr}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }

    /// The peak resident set size so far (VmHWM) in KiB, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what each of its sidecars logged (the last
        // lines; a test that reads the log itself has taken the pipe).
        if std::thread::panicking() {
            if let Some(mut err) = self.child.stderr.take() {
                let mut log = String::new();
                let _ = std::io::Read::read_to_string(&mut err, &mut log);
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(40)..].join("\n");
                eprintln!(
                    "--- rag-sidecar (pid {}) stderr, last {} lines ---\n{tail}",
                    self.child.id(),
                    lines.len().min(40)
                );
            }
        }
    }
}

/// One sidecar process (of a fleet, or alone): on a free port, in front of `upstream`,
/// on the Redis at `redis`, rate limits off; `extra` is more TOML.
pub fn fleet_member(upstream: &str, redis: &str, extra: &str) -> (SidecarProcess, SocketAddr) {
    let addr = free_addr();
    let toml = format!(
        r#"listen = "{addr}"
upstream = "{upstream}"
readiness_path = "/__mock/fast"
[redis]
url = "{redis}"
[rate_limit]
enabled = false
{extra}
"#
    );
    let process = SidecarProcess::start(&toml, &[("LOG_LEVEL", "ERROR")], addr);
    (process, addr)
}

pub fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// A `kB` field of /proc/PID/status.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The spool gauge's value in a Prometheus exposition.
pub fn spooled_in(exposition: &str) -> u64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix("rag_sidecar_request_spool_bytes "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no spool gauge in {exposition}"))
}

/// Steady load: `clients` tasks, each with its own HTTP client (5 s
/// timeout), sending one request after another until `stop`; `one(http, i)`
/// sends a worker's i-th request (i counts from the worker's number, so the
/// workers start on different questions) and returns its record.
pub fn load<R, F, Fut>(
    clients: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    one: F,
) -> Vec<tokio::task::JoinHandle<Vec<R>>>
where
    F: Fn(reqwest::Client, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = R> + Send,
    R: Send + 'static,
{
    (0..clients)
        .map(|w| {
            let (stop, one) = (std::sync::Arc::clone(stop), one.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .unwrap();
                let mut out = Vec::new();
                let mut i = w;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    out.push(one(http.clone(), i).await);
                }
                out
            })
        })
        .collect()
}

/// A free port on loopback (bound then released, for a child process).
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A real `redis-server` on a free 127.0.0.1 port, killed on drop; `stop`
/// and `start` again on the same port to test failure and recovery. It
/// saves nothing by itself, so a restart starts empty (a crash without
/// persistence), unless `SAVE` was called before the stop: then it starts
/// with what was saved (a crash with persistence).
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Self {
        let port = free_addr().port();
        let mut r = Self {
            port,
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// (Re)starts the server on its port and waits until it answers PING.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (CI installs it: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's process (to freeze it with SIGSTOP).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("redis-server running")
    }

    /// Kills the server (SIGKILL: a crash, not a clean shutdown).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs redis-cli against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.cli(&["--scan", "--pattern", pattern])
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real Redis Cluster of `n` primaries (redis-server in cluster mode on
/// free 127.0.0.1 ports, formed with `redis-cli --cluster create`, no
/// replicas), killed on drop. A node can be killed and started again: it
/// keeps its identity and slots (its `nodes.conf`), not its data.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    bus: Vec<u16>,
    nodes: Vec<Option<Child>>,
    dirs: Vec<tempfile::TempDir>,
}

impl RedisCluster {
    pub fn start(n: usize) -> Self {
        let mut ports = Vec::new();
        let mut bus = Vec::new();
        // Held until every port is chosen, so no two are the same.
        let mut held = Vec::new();
        for _ in 0..2 * n {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            held.push(l);
        }
        for (i, l) in held.iter().enumerate() {
            let port = l.local_addr().unwrap().port();
            if i % 2 == 0 {
                ports.push(port);
            } else {
                bus.push(port);
            }
        }
        drop(held);
        let mut c = Self {
            nodes: (0..n).map(|_| None).collect(),
            dirs: (0..n).map(|_| tempfile::tempdir().unwrap()).collect(),
            ports,
            bus,
        };
        for i in 0..n {
            c.start_node(i);
        }
        let addrs: Vec<String> = c.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian: redis-tools, with redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait_ok();
        c
    }

    fn start_node(&mut self, i: usize) {
        let child = Command::new("redis-server")
            .args(["--port", &self.ports[i].to_string()])
            .args(["--cluster-port", &self.bus[i].to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", "2000"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dirs[i].path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (CI installs it: apt-get install redis-server)");
        self.nodes[i] = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.cli(i, &["PING"]).trim() != "PONG" {
            assert!(
                std::time::Instant::now() < deadline,
                "cluster node {i} did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until every node says `cluster_state:ok`.
    pub fn wait_ok(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        for i in 0..self.ports.len() {
            while !self
                .cli(i, &["CLUSTER", "INFO"])
                .contains("cluster_state:ok")
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cluster is not ok: {}",
                    self.cli(i, &["CLUSTER", "INFO"])
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The URL fred takes: every node named.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.ports[0]);
        for (i, p) in self.ports.iter().enumerate().skip(1) {
            url.push(if i == 1 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{p}"));
        }
        url
    }

    /// Kills node `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` again and waits until the cluster is ok.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.start_node(i);
        self.wait_ok();
    }

    /// redis-cli against node `i`.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &self.ports[i].to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// The keys matching `pattern` on each node.
    pub fn keys_by_node(&self, pattern: &str) -> Vec<Vec<String>> {
        (0..self.ports.len())
            .map(|i| {
                self.cli(i, &["--scan", "--pattern", pattern])
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .collect()
    }

    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.keys_by_node(pattern).concat()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

/// Polls `probe` (bounded) until it returns true.
pub async fn eventually(what: &str, mut probe: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !probe().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM to `pid`.
pub fn sigterm(pid: u32) {
    signal(pid, "-TERM");
}

/// Sends `sig` (`-HUP`, `-STOP`, …) to `pid` with kill(1).
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success(), "kill {sig} {pid}");
}

/// The exit status of `p`, which must come within `within`.
pub fn wait_exit(p: &mut SidecarProcess, within: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sidecar did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads from `s` until an answer's head has arrived, the peer closes, or
/// `within` passes; what arrived, as text.
pub async fn read_head(s: &mut tokio::net::TcpStream, within: Duration) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(within, read).await;
    String::from_utf8_lossy(&buf).into_owned()
}
