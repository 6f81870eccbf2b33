//! Table tests of the configuration, through [`Config::load`] with an
//! injected environment and a scratch working directory: `layers` (defaults,
//! the legacy `.env` block, precedence, routes), `errors` (every error path
//! naming its key and value) and `table` (the settings table itself: its
//! defaults, names, and the reference page generated from it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

mod errors;
mod layers;
mod table;

/// The `.env` block of the legacy document (shared/seed/PHASE6_COMPLETE.md),
/// verbatim.
const LEGACY_ENV: &str = r#"# ====================
# Phase 6: Performance & Reliability
# ====================

# Caching Configuration
USE_REDIS=False  # Set to True to use Redis
REDIS_HOST=localhost
REDIS_PORT=6379
REDIS_PASSWORD=
REDIS_DB=0
CACHE_DEFAULT_TTL=3600  # 1 hour
CACHE_MAX_MEMORY_ITEMS=1000

# Rate Limiting
ENABLE_RATE_LIMIT=True
DEFAULT_RATE_LIMIT=60 per minute
SEARCH_RATE_LIMIT=30 per minute
UPLOAD_RATE_LIMIT=10 per minute

# Retry & Circuit Breaker
MAX_RETRIES=3
RETRY_INITIAL_WAIT=1.0  # seconds
RETRY_MAX_WAIT=10.0  # seconds
CIRCUIT_BREAKER_THRESHOLD=5
CIRCUIT_BREAKER_TIMEOUT=60  # seconds

# Monitoring
ENABLE_METRICS=True
LOG_LEVEL=INFO
LOG_FILE=logs/rag_services.log

# Performance Tuning
NUM_THREADS=4
BATCH_SIZE=32
ENABLE_EMBEDDING_CACHE=True
"#;

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Self {
        Self(tempfile::tempdir().unwrap())
    }
    fn with_dotenv(self, text: &str) -> Self {
        std::fs::write(self.0.path().join(".env"), text).unwrap();
        self
    }
    fn file(&self, text: &str) -> PathBuf {
        let p = self.0.path().join("rag-sidecar.toml");
        std::fs::write(&p, text).unwrap();
        p
    }
    fn load(&self, o: &Overrides, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load(o, &env, self.0.path()).map(|(c, _)| c)
    }
}

fn errors_of(r: Result<Config, ConfigErrors>) -> Vec<ConfigError> {
    match r {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.0,
    }
}

fn one_error(r: Result<Config, ConfigErrors>) -> ConfigError {
    let errs = errors_of(r);
    assert_eq!(errs.len(), 1, "{errs:?}");
    errs.into_iter().next().unwrap()
}
