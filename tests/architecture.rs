//! Dependencies point down the stack (src/lib.rs, "Layering"): every
//! `crate::…` and `super::…` path in the library's non-test code is read
//! against the table below, and a path into a unit the importing unit may
//! not use fails the test, naming the file, the line and the rule.
//!
//! A unit is a top-level module (`config`, `metrics`, …, each with its
//! submodules), except under `layers/`, where each layer is a unit of its
//! own (`layers::cache`) and `layers` itself is `layers/mod.rs`
//! (`build_stack`): a layer may never use another layer. Add a module:
//! add its row here, and its place in the picture in src/lib.rs.
//!
//! `ARCH_SRC=<dir>` reads another tree (an old checkout, to count what
//! pointed up there); the test then only reports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The foundation every unit above `metrics` may use.
const BASE: &[&str] = &[
    "error",
    "extensions",
    "service",
    "logging",
    "config",
    "route",
    "body",
];

/// Each unit and the units it may use, top of the stack first. `layers::*`
/// stands for every layer; `base` for [`BASE`].
const ALLOWED: &[(&str, &[&str])] = &[
    (
        "app",
        &[
            "server",
            "admin",
            "layers",
            "layers::*",
            "proxy",
            "redis",
            "metrics",
            "system",
            "health",
            "logging",
            "base",
        ],
    ),
    ("server", &["admin", "layers", "proxy", "base"]),
    (
        "admin",
        &[
            "layers",
            "layers::*",
            "proxy",
            "redis",
            "metrics",
            "system",
            "health",
            "base",
        ],
    ),
    (
        "layers",
        &["layers::*", "proxy", "redis", "metrics", "base"],
    ),
    // A layer: never another layer.
    ("layers::*", &["proxy", "redis", "metrics", "base"]),
    ("proxy", &["metrics", "base"]),
    ("redis", &["metrics", "error", "config", "body"]),
    ("metrics", &["system", "health", "base"]),
    ("system", &["config"]),
    ("health", &[]),
    ("extensions", &["error", "route", "body"]),
    ("service", &["body"]),
    ("error", &["config", "body"]),
    ("logging", &["config"]),
    ("route", &["config"]),
    ("body", &[]),
    ("config", &[]),
];

/// Items of `src/lib.rs` itself, usable from anywhere.
const ROOT_ITEMS: &[&str] = &["BoxError"];

fn rule(unit: &str) -> Option<&'static [&'static str]> {
    let key = if unit.starts_with("layers::") {
        "layers::*"
    } else {
        unit
    };
    ALLOWED.iter().find(|(u, _)| *u == key).map(|(_, a)| *a)
}

fn allowed(from: &str, to: &str) -> bool {
    if from == to || ROOT_ITEMS.contains(&to) {
        return true;
    }
    let Some(list) = rule(from) else {
        return false;
    };
    list.contains(&to)
        || (to.starts_with("layers::") && list.contains(&"layers::*"))
        || (list.contains(&"base") && BASE.contains(&to))
}

/// The module path of a source file: `layers/cache/mod.rs` → `layers::cache`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.last().is_some_and(|l| l == "mod" || l == "lib") {
        parts.pop();
    }
    parts
}

/// The unit a path (segments after `crate`) lies in.
fn unit_of(path: &[String], layer_names: &BTreeSet<String>) -> String {
    match path {
        [first, second, ..] if first == "layers" && layer_names.contains(second) => {
            format!("layers::{second}")
        }
        [first, ..] => first.clone(),
        [] => String::new(),
    }
}

/// The code of a file without its test module (by convention last, after
/// `#[cfg(test)]`) and without comments.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        // `#[cfg(test)]`, maybe more attributes, then the test module.
        if t.starts_with("#[cfg(test)]")
            && lines[i + 1..]
                .iter()
                .map(|n| n.trim_start())
                .find(|n| {
                    !n.starts_with("#[")
                        && !n.starts_with(')')
                        && !n.starts_with("clippy")
                        && !n.starts_with("reason")
                })
                .is_some_and(|n| n.starts_with("mod tests"))
        {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        let code = match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        };
        out.push((i + 1, code.to_string()));
    }
    out
}

/// Every `crate::a::b` or `super::…::x` path in a line, as segments.
fn paths_in(line: &str) -> Vec<(bool, Vec<String>)> {
    let mut out = Vec::new();
    for (start, root) in [("crate::", true), ("super::", false)] {
        let mut rest = line;
        while let Some(at) = rest.find(start) {
            // Not part of a longer word (`rag_sidecrate::`), and for super:
            // only the first `super` of a `super::super::` chain.
            let before = rest[..at].chars().last();
            let joined = before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                || (!root && rest[..at].ends_with("super::"));
            let tail = &rest[at..];
            if !joined {
                let segs: Vec<String> = tail
                    .split("::")
                    .map_while(|s| {
                        let w: String = s
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        (!w.is_empty()).then_some(w)
                    })
                    .collect();
                out.push((root, segs));
            }
            rest = &rest[at + start.len()..];
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// (file, line, from-unit, to-unit) of every path that breaks the table.
fn violations(src: &Path) -> Vec<(String, usize, String, String)> {
    let layer_names: BTreeSet<String> = std::fs::read_dir(src.join("layers"))
        .map(|d| {
            d.flatten()
                .map(|e| {
                    e.path()
                        .file_stem()
                        .map(|s| s.to_string_lossy().to_string())
                        .unwrap_or_default()
                })
                .filter(|n| n != "mod")
                .collect()
        })
        .unwrap_or_default();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for file in files {
        let module = module_path(src, &file);
        // The binaries use the crate by name, not `crate::`; a module's
        // tests in a file of their own (`tests.rs`) are test code.
        if module.is_empty()
            || module[0] == "main"
            || module[0] == "bin"
            || module.last().is_some_and(|m| m == "tests")
        {
            continue;
        }
        let from = unit_of(&module, &layer_names);
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for (n, line) in code_lines(&text) {
            for (root, segs) in paths_in(&line) {
                let target: Vec<String> = if root {
                    segs.into_iter().skip(1).collect()
                } else {
                    // `super` of `a/b/mod.rs` (module a::b) is `a`; of
                    // `a/b/c.rs` (module a::b::c) it is `a::b`.
                    let ups = segs.iter().take_while(|s| *s == "super").count();
                    let mut base = module.clone();
                    for _ in 0..ups {
                        base.pop();
                    }
                    base.extend(segs.into_iter().skip(ups));
                    base
                };
                if target.is_empty() {
                    continue;
                }
                let to = unit_of(&target, &layer_names);
                if !allowed(&from, &to) {
                    let shown = file
                        .strip_prefix(src)
                        .unwrap_or(&file)
                        .display()
                        .to_string();
                    found.push((shown, n, from.clone(), to));
                }
            }
        }
    }
    found
}

#[test]
fn dependencies_point_down_the_stack() {
    let own = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let (src, report_only) = match std::env::var_os("ARCH_SRC") {
        Some(dir) => (PathBuf::from(dir), true),
        None => (own, false),
    };
    let found = violations(&src);
    let listed: Vec<String> = found
        .iter()
        .map(|(f, n, from, to)| format!("src/{f}:{n}: {from} uses {to}"))
        .collect();
    println!(
        "{} paths point up the stack or across to another layer{}",
        found.len(),
        if found.is_empty() { "" } else { ":" }
    );
    for l in &listed {
        println!("  {l}");
    }
    if !report_only {
        assert!(
            found.is_empty(),
            "dependencies must point down the stack (see src/lib.rs):\n{}",
            listed.join("\n")
        );
    }
}

#[test]
fn every_unit_of_the_tree_has_a_row() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut missing = BTreeSet::new();
    for f in files {
        let module = module_path(&src, &f);
        let Some(first) = module.first() else {
            continue;
        };
        if first == "main" || first == "bin" {
            continue;
        }
        let unit = if first == "layers" && module.len() > 1 {
            "layers::*".to_string()
        } else {
            first.clone()
        };
        if rule(&unit).is_none() {
            missing.insert(unit);
        }
    }
    assert!(
        missing.is_empty(),
        "modules without a row in tests/architecture.rs: {missing:?}"
    );
}

#[test]
fn the_checker_sees_an_upward_path() {
    // A layer naming the server, a metrics file naming a layer, and a layer
    // naming a sibling through `super`.
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let src = dir.path();
    std::fs::create_dir_all(src.join("layers/cache")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::create_dir_all(src.join("metrics")).unwrap_or_else(|e| panic!("{e}"));
    let write = |p: &str, t: &str| std::fs::write(src.join(p), t).unwrap_or_else(|e| panic!("{e}"));
    write("layers/mod.rs", "pub mod cache;\npub mod retry;\n");
    write(
        "layers/cache/mod.rs",
        "use crate::server::X;\nuse super::retry::Y;\nuse crate::error::Z;\n// crate::app::in_a_comment\n",
    );
    write(
        "layers/retry.rs",
        "use crate::body::B;\n#[cfg(test)]\nmod tests {\n    use crate::app::App;\n}\n",
    );
    write("metrics/mod.rs", "use crate::layers::cache::C;\n");
    let found = violations(src);
    let pairs: Vec<(String, String)> = found.into_iter().map(|(_, _, f, t)| (f, t)).collect();
    assert_eq!(
        pairs,
        [
            ("layers::cache".to_string(), "server".to_string()),
            ("layers::cache".to_string(), "layers::retry".to_string()),
            ("metrics".to_string(), "layers::cache".to_string()),
        ]
    );
}
