//! The command line: `check-config` output and exit codes, configuration
//! precedence through the real binary, and start-up refusal on a bad value.

mod common;

use std::process::{Command, Output};

use common::SidecarProcess;

fn run(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(SidecarProcess::bin())
        .args(args)
        .current_dir(dir)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn check_config_prints_the_defaults_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["check-config"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("listen = \"0.0.0.0:5003\""), "{stdout}");
    assert!(
        stdout.contains("upstream = \"http://127.0.0.1:5000\""),
        "{stdout}"
    );
    // The printed configuration is itself a valid file.
    std::fs::write(dir.path().join("printed.toml"), &stdout).unwrap();
    let again = run(
        dir.path(),
        &["check-config", "--config", "printed.toml"],
        &[],
    );
    assert!(again.status.success(), "{}", text(&again.stderr));
}

#[test]
fn check_config_masks_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        dir.path(),
        &["check-config"],
        &[
            ("ADMIN_TOKEN", "tok-SECRET"),
            ("USE_REDIS", "True"),
            ("REDIS_PASSWORD", "pw-SECRET"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(!stdout.contains("SECRET"), "{stdout}");
    assert!(stdout.contains("token = \"***\""), "{stdout}");
    assert!(
        stdout.contains("url = \"redis://:***@localhost:6379/0\""),
        "{stdout}"
    );
}

#[test]
fn precedence_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("c.toml"),
        "listen = \"127.0.0.1:1001\"\nupstream = \"http://127.0.0.1:2001\"\nmax_inflight = 7\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "LISTEN_ADDR=127.0.0.1:1002\nUPSTREAM_URL=http://127.0.0.1:2002\n",
    )
    .unwrap();
    let out = run(
        dir.path(),
        &["check-config", "--listen", "127.0.0.1:1004"],
        &[
            ("RAG_SIDECAR_CONFIG", "c.toml"),
            ("UPSTREAM_URL", "http://127.0.0.1:2003"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("max_inflight = 7"), "file applied: {s}");
    assert!(
        s.contains("upstream = \"http://127.0.0.1:2003\""),
        "env over .env: {s}"
    );
    assert!(
        s.contains("listen = \"127.0.0.1:1004\""),
        "flag over all: {s}"
    );
}

#[test]
fn bad_values_stop_start_up_naming_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    // Every error at once, one line each, exit 64, for check-config and run.
    for args in [&["check-config"][..], &[][..]] {
        let out = run(
            dir.path(),
            args,
            &[
                ("DEFAULT_RATE_LIMIT", "60 per fortnight"),
                ("LISTEN_ADDR", "0.0.0.0:70000"),
            ],
        );
        assert_eq!(out.status.code(), Some(64));
        let err = text(&out.stderr);
        let lines: Vec<_> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert!(
            err.contains("DEFAULT_RATE_LIMIT = \"60 per fortnight\""),
            "{err}"
        );
        assert!(err.contains("LISTEN_ADDR = \"0.0.0.0:70000\""), "{err}");
    }
    std::fs::write(
        dir.path().join("bad.toml"),
        "listen = \"0.0.0.0:5003\"\nlisne = 1\n",
    )
    .unwrap();
    let out = run(dir.path(), &["check-config", "--config", "bad.toml"], &[]);
    assert_eq!(out.status.code(), Some(64));
    let err = text(&out.stderr);
    assert!(
        err.contains("unknown field `lisne`") && err.contains("line 2"),
        "{err}"
    );
}

#[test]
fn legacy_dotenv_in_the_working_directory_is_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(".env"),
        "NUM_THREADS=3  # threads\nDEFAULT_RATE_LIMIT=100 per hour\nBATCH_SIZE=32\nGEMINI_API_KEY=not-ours\n",
    )
    .unwrap();
    let out = run(dir.path(), &["check-config"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(s.contains("threads = 3"), "{s}");
    assert!(s.contains("default = \"100 per hour\""), "{s}");
    assert!(!s.contains("not-ours"));
}

#[test]
fn version_names_the_commit_it_was_built_from() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["--version"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = text(&out.stdout);
    assert!(
        v.starts_with(&format!("rag-sidecar {}", env!("CARGO_PKG_VERSION"))),
        "{v}"
    );
    // Built from a checkout (as here and in CI): the commit follows.
    let head = Command::new("git")
        .args(["rev-parse", "--short=7", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output();
    if let Some(head) = head.ok().filter(|o| o.status.success()) {
        let commit = text(&head.stdout).trim().to_string();
        assert!(
            v.contains(&format!("(git {commit}")),
            "{v} vs HEAD {commit}"
        );
    }
}
