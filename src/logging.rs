//! Logging with tracing: level (`LOG_LEVEL`, Python names accepted), format
//! (`LOG_FORMAT` text|json) and an optional file (`LOG_FILE`) written beside
//! stderr. Both writers are non-blocking: a slow disk or terminal never
//! stalls a request; lines are dropped rather than queued without bound.
//!
//! What a client sent goes into a line through [`escaped`], as nginx writes
//! its access log: no control or format character of theirs can forge a
//! second record or reorder a line on a terminal.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::Path;

use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogConfig, LogFormat};

/// Client-supplied text for a log line: every byte outside printable ASCII
/// (C0 controls, DEL, and all of UTF-8's multi-byte forms, which carry the
/// C1 controls, NEL, U+2028/2029 and the bidirectional marks), `"` and `\`
/// written as `\xHH`, as nginx does. Borrowed when nothing needs escaping.
pub fn escaped(s: &str) -> Cow<'_, str> {
    let unsafe_byte = |b: u8| !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\';
    if !s.bytes().any(unsafe_byte) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for b in s.bytes() {
        if unsafe_byte(b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(char::from(b));
        }
    }
    Cow::Owned(out)
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("LOG_FILE {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad log level: {0}")]
    Level(String),
    #[error("a global logger is already installed")]
    AlreadySet,
}

/// Keep alive for the process's life: dropping it flushes the writers.
#[derive(Debug)]
pub struct LogGuards(
    #[allow(
        dead_code,
        reason = "held only to be dropped at exit, which flushes the writers"
    )]
    Vec<WorkerGuard>,
);

fn writer<W: std::io::Write + Send + 'static>(w: W) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default().lossy(true).finish(w)
}

fn layer(format: LogFormat, w: NonBlocking, ansi: bool) -> Box<dyn Layer<Registry> + Send + Sync> {
    let base = tracing_subscriber::fmt::layer()
        .with_writer(w)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => base.boxed(),
        LogFormat::Json => base.json().flatten_event(true).boxed(),
    }
}

/// The running level filter, which a reload replaces (`log.level`); the
/// subscriber it belongs to is the process's.
static LEVEL: std::sync::OnceLock<tracing_subscriber::reload::Handle<EnvFilter, Registry>> =
    std::sync::OnceLock::new();

fn filter(level: &str) -> Result<EnvFilter, LogError> {
    EnvFilter::builder()
        .parse(level)
        .map_err(|e| LogError::Level(e.to_string()))
}

/// Sets the level of the subscriber [`init`] installed (a reload); without
/// one (tests in-process), nothing.
pub fn set_level(level: &str) -> Result<(), LogError> {
    let f = filter(level)?;
    match LEVEL.get() {
        Some(h) => h.reload(f).map_err(|e| LogError::Level(e.to_string())),
        None => Ok(()),
    }
}

/// Installs the global subscriber.
pub fn init(cfg: &LogConfig) -> Result<LogGuards, LogError> {
    let (filter, level) = tracing_subscriber::reload::Layer::new(filter(&cfg.level)?);
    let mut guards = Vec::new();
    let (stderr, g) = writer(std::io::stderr());
    guards.push(g);
    let mut layers = vec![layer(cfg.format, stderr, false)];
    if let Some(path) = &cfg.file {
        let file = open_log_file(path)?;
        let (w, g) = writer(file);
        guards.push(g);
        layers.push(layer(cfg.format, w, false));
    }
    Registry::default()
        .with(layers.with_filter(filter))
        .try_init()
        .map_err(|_| LogError::AlreadySet)?;
    let _ = LEVEL.set(level);
    Ok(LogGuards(guards))
}

fn open_log_file(path: &Path) -> Result<std::fs::File, LogError> {
    let err = |source| LogError::File {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_is_escaped_as_nginx_does() {
        for (raw, logged) in [
            ("/api/search", "/api/search"),
            ("/a b", "/a b"),
            ("/a\nb", "/a\\x0Ab"),
            ("/q\"x", "/q\\x22x"),
            ("/back\\slash", "/back\\x5Cslash"),
            ("/nel\u{85}x", "/nel\\xC2\\x85x"),
            ("/ls\u{2028}x", "/ls\\xE2\\x80\\xA8x"),
            ("/bidi\u{202e}x", "/bidi\\xE2\\x80\\xAEx"),
            ("/del\u{7f}", "/del\\x7F"),
            ("/học", "/h\\xE1\\xBB\\x8Dc"),
        ] {
            assert_eq!(escaped(raw), logged, "{raw:?}");
        }
        assert!(matches!(escaped("/plain"), Cow::Borrowed(_)));
    }
}
