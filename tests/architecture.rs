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
    "memory",
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
            "trace",
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
        &["layers::*", "proxy", "redis", "trace", "metrics", "base"],
    ),
    // A layer: never another layer.
    ("layers::*", &["proxy", "redis", "trace", "metrics", "base"]),
    ("trace", &["metrics", "config"]),
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
    ("memory", &[]),
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

/// The code of a file with its comments and its test modules (`#[cfg(test)]`,
/// maybe more attributes, then `mod NAME { … }` or `mod NAME;`) blanked
/// out, line breaks kept so positions still give line numbers.
fn code_of(text: &str) -> String {
    let mut c: Vec<char> = Vec::with_capacity(text.len());
    for line in text.lines() {
        let code = match line.find("//") {
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        };
        c.extend(code.chars());
        c.push('\n');
    }
    let starts = |i: usize, pat: &str| {
        pat.chars()
            .enumerate()
            .all(|(k, p)| c.get(i + k) == Some(&p))
    };
    // The end (exclusive) of the bracketed group opening at `i`.
    let group_end = |mut i: usize, open: char, close: char| {
        let mut depth = 0;
        while i < c.len() {
            if c[i] == open {
                depth += 1;
            } else if c[i] == close {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            i += 1;
        }
        c.len()
    };
    let mut blank = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if !starts(i, "#[cfg(test)]") {
            i += 1;
            continue;
        }
        let at = i;
        i += "#[cfg(test)]".len();
        // Past further attributes and white space.
        loop {
            while i < c.len() && c[i].is_whitespace() {
                i += 1;
            }
            if starts(i, "#[") {
                i = group_end(i + 1, '[', ']');
            } else {
                break;
            }
        }
        let end = if starts(i, "mod ") {
            let mut j = i;
            while j < c.len() && c[j] != '{' && c[j] != ';' {
                j += 1;
            }
            if c.get(j) == Some(&'{') {
                group_end(j, '{', '}')
            } else {
                j + 1
            }
        } else {
            i
        };
        blank.push((at, end.min(c.len())));
        i = end.max(at + 1);
    }
    for (from, to) in blank {
        for ch in &mut c[from..to] {
            if *ch != '\n' {
                *ch = ' ';
            }
        }
    }
    c.into_iter().collect()
}

/// Every path a `use` tree or an expression names from `at` on (just after
/// `crate::` or `super::`), groups expanded: `{a::X, b::{Y, Z}}` gives
/// `a::X`, `b::Y`, `b::Z`.
fn tree(chars: &[char], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let skip = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    skip(&mut i);
    if chars.get(i) == Some(&'{') {
        i += 1;
        let mut all = Vec::new();
        loop {
            skip(&mut i);
            match chars.get(i) {
                None => return (all, i),
                Some('}') => return (all, i + 1),
                Some(',') => i += 1,
                Some(_) => {
                    let (sub, next) = tree(chars, i);
                    if next == i {
                        return (all, i);
                    }
                    all.extend(sub);
                    i = next;
                }
            }
        }
    }
    let start = i;
    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '*') {
        i += 1;
    }
    if i == start {
        return (Vec::new(), i);
    }
    let seg: String = chars[start..i].iter().collect();
    let mut j = i;
    skip(&mut j);
    if chars.get(j) == Some(&':') && chars.get(j + 1) == Some(&':') {
        let (rest, next) = tree(chars, j + 2);
        if rest.is_empty() {
            return (vec![vec![seg]], next);
        }
        let paths = rest
            .into_iter()
            .map(|mut r| {
                r.insert(0, seg.clone());
                r
            })
            .collect();
        return (paths, next);
    }
    (vec![vec![seg]], i)
}

/// Every `crate::…` or `super::…` path in a file's code, with its line: the
/// root (`true` for `crate`) and the segments after it (`super` ones kept).
fn paths_in(code: &str) -> Vec<(usize, bool, Vec<String>)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\n' {
            line += 1;
        }
        let word_start = i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
        let rest: String = chars[i..chars.len().min(i + 7)].iter().collect();
        let root = if rest.starts_with("crate::") {
            Some(true)
        } else if rest.starts_with("super::") {
            Some(false)
        } else {
            None
        };
        // Only the first `super` of a `super::super::` chain starts a path.
        let chained = i >= 7 && chars[i - 7..i].iter().collect::<String>() == "super::";
        match root {
            Some(root) if word_start && !chained => {
                let (paths, _) = tree(&chars, i + 7);
                for mut p in paths {
                    if !root {
                        p.insert(0, "super".to_string());
                    }
                    out.push((line, root, p));
                }
                i += 7;
            }
            _ => i += 1,
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
        for (n, root, segs) in paths_in(&code_of(&text)) {
            {
                let target: Vec<String> = if root {
                    segs
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
    // A test module in the middle of a file hides only itself; a grouped
    // import, split over lines, is read path by path.
    write(
        "layers/retry.rs",
        "use crate::body::B;\n#[cfg(test)]\n#[allow(x, reason = \"y\")]\nmod tests {\n    use crate::app::App;\n}\nuse crate::{\n    error::E,\n    admin::{self, A},\n};\n",
    );
    write(
        "metrics/mod.rs",
        "use crate::layers::cache::C;\nfn f() { crate::app::run(); }\n",
    );
    let found = violations(src);
    let seen: Vec<(String, usize, String, String)> = found;
    let pairs: Vec<(&str, usize, &str, &str)> = seen
        .iter()
        .map(|(f, n, a, b)| (f.as_str(), *n, a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        pairs,
        [
            ("layers/cache/mod.rs", 1, "layers::cache", "server"),
            ("layers/cache/mod.rs", 2, "layers::cache", "layers::retry"),
            ("layers/retry.rs", 7, "layers::retry", "admin"),
            ("layers/retry.rs", 7, "layers::retry", "admin"),
            ("metrics/mod.rs", 1, "metrics", "layers::cache"),
            ("metrics/mod.rs", 2, "metrics", "app"),
        ]
    );
}
