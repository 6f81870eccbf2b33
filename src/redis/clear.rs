//! Clearing the cache's keys in Redis: SCAN MATCH (on every primary of a
//! Cluster) and UNLINK one hash slot at a time, never KEYS; the limiter's
//! and the fleet's keys are never deleted.

use fred::prelude::*;
use fred::types::scan::Scanner;
use futures_util::StreamExt;

use super::{RATE_LIMIT_SPACE, RedisError, RedisStore, fleet};
use crate::metrics::redis::RedisOp;

impl RedisStore {
    /// Deletes the keys matching a glob (under the prefix) with SCAN MATCH
    /// (on every primary of a cluster) and UNLINK, never KEYS; the
    /// limiter's and the fleet's keys are never deleted. A failure does not
    /// stop the clear: it goes on with the rest and counts what it could
    /// not do.
    pub async fn clear(&self, pattern: &str) -> Cleared {
        let mut out = Cleared::default();
        if self.check(RedisOp::Clear).is_err() {
            out.errors += 1;
            return out;
        }
        let full = self.full_key(pattern);
        let clustered = self.client.is_clustered();
        let mut pages = if clustered {
            self.client.scan_cluster(full, Some(100), None).boxed()
        } else {
            self.client.scan(full, Some(100), None).boxed()
        };
        // The rate limiter's and the fleet's keys share the prefix: a cache
        // clear must not reset anyone's limits, nor the generations and
        // leases.
        let limiter = format!("{}{RATE_LIMIT_SPACE}", self.prefix);
        let fleet = format!("{}{}", self.prefix, fleet::FLEET_SPACE);
        let page_limit = self.timeout * 4;
        // A scan that keeps failing (a node down) is given up after this
        // many failed pages in a row.
        let mut failing = 0;
        loop {
            let page = match tokio::time::timeout(page_limit, pages.next()).await {
                Ok(Some(Ok(p))) => p,
                Ok(Some(Err(e))) => {
                    self.failed(RedisOp::Clear, &RedisError::Command(e));
                    out.errors += 1;
                    failing += 1;
                    if failing >= 3 {
                        break;
                    }
                    continue;
                }
                Ok(None) => break,
                Err(_) => {
                    self.failed(RedisOp::Clear, &RedisError::Timeout(page_limit));
                    out.errors += 1;
                    break;
                }
            };
            failing = 0;
            let mut page = page;
            if let Some(mut keys) = page.take_results() {
                keys.retain(|k| {
                    k.as_str()
                        .is_none_or(|k| !k.starts_with(&limiter) && !k.starts_with(&fleet))
                });
                // UNLINK names several keys: on a cluster they must be of
                // one hash slot, so a page (one node's, but of many slots)
                // is deleted one slot at a time.
                let groups: Vec<Vec<Key>> = if clustered {
                    let mut by_slot: std::collections::BTreeMap<u16, Vec<Key>> =
                        std::collections::BTreeMap::new();
                    for k in keys {
                        by_slot.entry(k.cluster_hash()).or_default().push(k);
                    }
                    by_slot.into_values().collect()
                } else if keys.is_empty() {
                    Vec::new()
                } else {
                    vec![keys]
                };
                for group in groups {
                    let n = group.len();
                    let c = self.client.with_options(&self.opts());
                    match self
                        .bounded(RedisOp::Clear, c.unlink::<i64, _>(group))
                        .await
                    {
                        Ok(removed) => out.removed += usize::try_from(removed).unwrap_or(0),
                        Err(_) => {
                            out.errors += 1;
                            out.failed += n;
                        }
                    }
                }
            }
            page.next();
        }
        out
    }
}

/// What a clear did in Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cleared {
    /// Keys deleted.
    pub removed: usize,
    /// Keys found but not deleted (their command failed).
    pub failed: usize,
    /// Commands that failed (a failed scan leaves an unknown number of keys).
    pub errors: usize,
}
