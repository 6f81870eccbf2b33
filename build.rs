//! Stamps the binary's `--version` with the git commit it was built from,
//! when built from a checkout (`0.1.0 (git 1a2b3c4)`, `-dirty` with
//! uncommitted changes); elsewhere (a source tarball) the version alone.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    let version = env!("CARGO_PKG_VERSION");
    let full = match git(&["rev-parse", "--short=7", "HEAD"]) {
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
    // Stamp again when HEAD moves or the index changes.
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
