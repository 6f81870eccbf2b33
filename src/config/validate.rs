//! The checks only the whole configuration can tell, run once every layer
//! is applied: each setting's own check on its effective value (named in
//! the settings table: [`positive`], [`nonzero`], …), then the rules that
//! relate two settings. An error names the variable or flag that gave the
//! value, when one did, with the value as written there.

use std::time::Duration;

use super::Config;
use super::error::Errors;
use super::parse::fmt_duration;
use super::settings::SETTINGS;

/// At least 1 (a count or a size).
pub(super) fn positive<T: Default + PartialEq>(v: &T) -> Result<(), String> {
    match *v == T::default() {
        true => Err("must be at least 1".into()),
        false => Ok(()),
    }
}

/// More than zero (a timeout or TTL).
pub(super) fn nonzero(d: &Duration) -> Result<(), String> {
    match d.is_zero() {
        true => Err("must be more than zero".into()),
        false => Ok(()),
    }
}

/// Worker threads: 1 to 1024.
pub(super) fn thread_count(n: &usize) -> Result<(), String> {
    match *n {
        0 => Err("must be at least 1".into()),
        1025.. => Err("at most 1024".into()),
        _ => Ok(()),
    }
}

/// A percentage.
pub(super) fn ratio(p: &f64) -> Result<(), String> {
    match (0.0..=100.0).contains(p) {
        true => Ok(()),
        false => Err("must be between 0 and 100".into()),
    }
}

/// A share between 0 and 1.
pub(super) fn fraction(p: &f64) -> Result<(), String> {
    match (0.0..=1.0).contains(p) {
        true => Ok(()),
        false => Err("must be between 0 and 1".into()),
    }
}

/// A name that is not empty.
#[allow(clippy::ptr_arg, reason = "a check takes the field's own type")]
pub(super) fn not_blank(s: &String) -> Result<(), String> {
    match s.trim().is_empty() {
        true => Err("must not be empty".into()),
        false => Ok(()),
    }
}

/// A setting's effective value as an error shows it (`0`, `0s`, `150`).
fn plain(v: toml::Value) -> String {
    match v {
        toml::Value::String(s) => s,
        toml::Value::Float(f) => f.to_string(),
        other => other.to_string(),
    }
}

pub(super) fn check(cfg: &Config, errs: &mut Errors) {
    for s in SETTINGS {
        if let Err(reason) = s.value.check(cfg) {
            let shown = s.value.show(cfg).map(plain).unwrap_or_default();
            errs.push_checked(s.key, &shown, reason);
        }
    }
    if cfg.retry.initial_wait > cfg.retry.max_wait {
        let initial = errs.name_of("retry.initial_wait");
        let reason = format!(
            "smaller than {initial} ({})",
            fmt_duration(cfg.retry.initial_wait)
        );
        errs.push_checked("retry.max_wait", &fmt_duration(cfg.retry.max_wait), reason);
    }
    if cfg.admin_listen == Some(cfg.listen) && cfg.listen.port() != 0 {
        let listen = errs.name_of("listen");
        errs.push_checked(
            "admin_listen",
            &cfg.listen.to_string(),
            format!("must differ from {listen}"),
        );
    }
}
