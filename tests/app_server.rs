//! The sidecar in front of a real gunicorn (from PyPI, installed into a
//! virtualenv under the target directory on first use), where gunicorn's
//! own behaviour is the point: its sync workers serve one request from the
//! first byte of its body to the last byte of its answer, so a slow client
//! holds one for as long as it likes unless the proxy in front buffers; and
//! gunicorn 21 reads `X_User_Id` as `X-User-Id`.
//!
//! Each buffering test has its control beside it: the same clients with the
//! buffering off do hold the app's only worker, so the test shows the
//! buffering is what frees it (and not the kernel's socket buffers).

#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    reason = "a test drives real processes: the wall clock is right here"
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::{Sidecar, client, free_addr};

/// The gunicorn the tests run: 21, the version whose header handling the
/// security review found (22 drops underscored names itself).
const GUNICORN: &str = "gunicorn==21.2.0";

/// `target/tmp/gunicorn-21.2.0/bin/gunicorn`, installed on first use.
fn gunicorn_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gunicorn-21.2.0");
        let bin = venv.join("bin").join("gunicorn");
        if bin.is_file() {
            return bin;
        }
        let run = |cmd: &mut Command| {
            let shown = format!("{cmd:?}");
            let out = cmd
                .output()
                .unwrap_or_else(|e| panic!("could not run {shown}: {e}"));
            assert!(
                out.status.success(),
                "{shown} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        run(Command::new(venv.join("bin").join("pip")).args(["install", "-q", GUNICORN]));
        assert!(
            bin.is_file(),
            "{} is missing after pip install",
            bin.display()
        );
        bin
    })
}

/// gunicorn serving tests/fixtures/wsgi_app.py with one sync worker (one
/// request at a time); stopped with SIGTERM on drop.
struct Gunicorn {
    child: Child,
    addr: SocketAddr,
    /// Where the app marks each upload it starts to read.
    marks: tempfile::TempDir,
}

impl Gunicorn {
    async fn start() -> Self {
        let addr = free_addr();
        let marks = tempfile::tempdir().unwrap();
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let child = Command::new(gunicorn_bin())
            .args(["--bind", &addr.to_string()])
            .args(["--workers", "1", "--worker-class", "sync"])
            .args(["--timeout", "120", "--graceful-timeout", "1"])
            .arg("--chdir")
            .arg(&fixtures)
            .arg("wsgi_app:app")
            .env("WSGI_MARKS", marks.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn gunicorn");
        let g = Self { child, addr, marks };
        common::eventually("gunicorn to listen", async || {
            TcpStream::connect(addr).await.is_ok()
        })
        .await;
        g
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Uploads the app has started to read.
    fn uploads_started(&self) -> usize {
        std::fs::read_dir(self.marks.path()).map_or(0, Iterator::count)
    }
}

impl Drop for Gunicorn {
    fn drop(&mut self) {
        // SIGTERM, so the master takes its worker down with it.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Whether a health check through the sidecar is answered within `within`:
/// with one sync worker, only if no other request holds it.
async fn app_answers(sc: &Sidecar, within: Duration) -> bool {
    let r = client()
        .get(sc.url("/api/health"))
        .timeout(within)
        .send()
        .await;
    r.is_ok_and(|r| r.status() == 200)
}

/// A control's finding: the app's only worker does not answer (3 s).
async fn assert_worker_held(sc: &Sidecar) {
    assert!(
        !app_answers(sc, Duration::from_secs(3)).await,
        "the control must show a held worker, or the test beside it proves nothing"
    );
}

/// An upload that declares 1000 bytes and sends 3 of them, left open.
async fn dripping_upload(sc: &Sidecar) -> TcpStream {
    let mut s = TcpStream::connect(sc.addr).await.unwrap();
    s.write_all(
        b"POST /api/upload HTTP/1.1\r\nHost: a\r\nContent-Type: application/octet-stream\r\n\
          Content-Length: 1000\r\n\r\nabc",
    )
    .await
    .unwrap();
    s
}

const NO_LIMITS: &str = "[rate_limit]\nenabled = false\n[retry]\nmax_retries = 0\n";

#[tokio::test]
async fn slow_uploads_never_hold_the_apps_worker() {
    let app = Gunicorn::start().await;
    let sc = Sidecar::start(&app.url(), NO_LIMITS).await;
    // Three uploads that have sent 3 bytes of 1000 and go quiet.
    let mut drips = Vec::new();
    for _ in 0..3 {
        drips.push(dripping_upload(&sc).await);
    }
    // All three are in the sidecar's hands (where, unbuffered, the first
    // would hold the worker) before the app is asked anything: 3 bytes
    // each on disk (charged as written, not as declared).
    common::eventually("the uploads to be spooled", async || {
        sc.spooled().await == 9
    })
    .await;
    assert_eq!(app.uploads_started(), 0, "no upload reached the app yet");
    assert!(
        app_answers(&sc, Duration::from_secs(10)).await,
        "the app's only worker is held by a slow upload"
    );
    // One finishes: the app gets it whole.
    let mut s = drips.pop().unwrap();
    s.write_all(&[b'x'; 997]).await.unwrap();
    let answer = read_answer(&mut s).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("{\"received\": 1000}"), "{answer}");
}

#[tokio::test]
async fn control_without_request_buffering_a_slow_upload_holds_the_worker() {
    let app = Gunicorn::start().await;
    let toml = format!("{NO_LIMITS}[[routes]]\nname = \"upload\"\nrequest_buffering = false\n");
    let sc = Sidecar::start(&app.url(), &toml).await;
    let _drip = dripping_upload(&sc).await;
    // The app's worker is reading it before the probe goes.
    common::eventually("the upload at the app", async || app.uploads_started() == 1).await;
    assert_worker_held(&sc).await;
}

/// Reads an answer until the peer closes or the body announced is in.
async fn read_answer(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|v| v.trim().parse::<usize>().ok());
            if len.is_some_and(|n| body.len() >= n) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// An answer larger than the kernel's socket buffers on both sides, within
/// the sidecar's `response_buffer`.
const BIG: usize = 24 * 1024 * 1024;

/// Asks for a BIG answer on a socket with a tiny receive window and reads
/// nothing more than its status line.
async fn slow_reader(sc: &Sidecar) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&sc.addr.into()).unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut s = TcpStream::from_std(socket.into()).unwrap();
    let req = format!("GET /big?n={BIG} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut first = [0u8; 12];
    s.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    s
}

#[tokio::test]
async fn a_slow_reader_never_holds_the_apps_worker() {
    let app = Gunicorn::start().await;
    let toml = format!("response_buffer = {}\n{NO_LIMITS}", 32 * 1024 * 1024);
    let sc = Sidecar::start(&app.url(), &toml).await;
    let mut reader = slow_reader(&sc).await;
    assert!(
        app_answers(&sc, Duration::from_secs(10)).await,
        "the app's only worker is held writing to a slow reader"
    );
    // And the slow reader still gets every byte.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut rest))
        .await
        .expect("the rest of the answer")
        .unwrap();
    let head_end = rest
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let body = &rest[head_end + 4..];
    assert_eq!(body.len(), BIG);
    assert!(body.iter().all(|&b| b == b'x'));
}

#[tokio::test]
async fn control_without_response_buffering_a_slow_reader_holds_the_worker() {
    let app = Gunicorn::start().await;
    let toml = format!("response_buffer = 0\n{NO_LIMITS}");
    let sc = Sidecar::start(&app.url(), &toml).await;
    let _reader = slow_reader(&sc).await;
    assert_worker_held(&sc).await;
}

#[tokio::test]
async fn gunicorn_21_never_sees_an_underscored_header_through_the_sidecar() {
    let app = Gunicorn::start().await;
    let sc = Sidecar::start(&app.url(), NO_LIMITS).await;
    let whoami = async |addr: SocketAddr, header: &str| -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /whoami HTTP/1.1\r\nHost: a\r\n{header}: alice\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let answer = read_answer(&mut s).await;
        answer
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or(answer)
    };
    // What the finding was: gunicorn 21 itself takes X_User_Id as X-User-Id.
    assert_eq!(whoami(app.addr, "X_User_Id").await, r#"{"user": "alice"}"#);
    // Through the sidecar the dashed name still arrives, the underscored
    // one does not.
    assert_eq!(whoami(sc.addr, "X-User-Id").await, r#"{"user": "alice"}"#);
    assert_eq!(whoami(sc.addr, "X_User_Id").await, r#"{"user": null}"#);
}
