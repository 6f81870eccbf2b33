//! Stamps the binary's `--version` with the git commit it was built from,
//! when built from a checkout (`0.1.0 (git 1a2b3c4)`, `-dirty` with
//! uncommitted changes), or named by `RAG_SIDECAR_COMMIT` (the Docker build,
//! whose context has no `.git`); elsewhere the version alone.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let version = env!("CARGO_PKG_VERSION");
    println!("cargo:rerun-if-env-changed=RAG_SIDECAR_COMMIT");
    let given = std::env::var("RAG_SIDECAR_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let full = match given.or_else(|| git(&["rev-parse", "--short=7", "HEAD"])) {
        Some(commit) if !commit.is_empty() => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            format!(
                "{version} (git {commit}{})",
                if dirty { "-dirty" } else { "" }
            )
        }
        _ => version.to_string(),
    };
    println!("cargo:rustc-env=RAG_SIDECAR_VERSION={full}");
    // Stamp again when HEAD moves, the index changes, or a source file does
    // (so `-dirty` follows unstaged edits).
    println!("cargo:rerun-if-changed=src");
    for path in ["HEAD", "index"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = git(&["rev-parse", "--git-path", &head]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}
