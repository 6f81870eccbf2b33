//! The store's namespaces, generations and clears.

use super::*;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};

fn entry(body_len: usize) -> Arc<Entry> {
    Arc::new(Entry::new(
        StatusCode::OK,
        HeaderMap::new(),
        Bytes::from(vec![b'x'; body_len]),
        0,
        60_000,
    ))
}

#[tokio::test]
async fn item_cap_and_byte_budget_both_hold() {
    let mut cfg = Config::default();
    cfg.cache.max_memory_bytes = 4 * 1024 * 1024;
    let store = CacheStore::new(&cfg, None).unwrap();
    let ns = Arc::clone(store.namespace("search").unwrap());
    // The namespace's share of the budget, by max_items (500 of 1700).
    let budget = ns.cache.capacity();
    assert!(budget > 1_000_000 && budget < 1_300_000, "{budget}");
    // Small entries: the item cap binds.
    for i in 0..2_000 {
        store.put(&ns, format!("search:{i}"), entry(100)).await;
    }
    assert!(ns.cache.len() <= 500, "{}", ns.cache.len());
    assert!(ns.cache.weight() <= budget);
    // Large entries: the byte budget binds well before 500 items.
    store.clear_memory(None);
    for i in 0..200 {
        store
            .put(&ns, format!("search:big{i}"), entry(64 * 1024))
            .await;
    }
    assert!(ns.cache.weight() <= budget);
    assert!(
        ns.cache.len() <= (budget / (64 * 1024)) as usize,
        "{}",
        ns.cache.len()
    );
    // An entry never exceeds what one shard can hold (else quick_cache
    // would drop it silently).
    assert!(ns.max_body <= ns.cache.shard_capacity());
}

#[tokio::test]
async fn clear_patterns() {
    let store = CacheStore::new(&Config::default(), None).unwrap();
    let search = Arc::clone(store.namespace("search").unwrap());
    let rag = Arc::clone(store.namespace("rag").unwrap());
    store.put(&search, "search:aa".into(), entry(1)).await;
    store.put(&search, "search:ab".into(), entry(1)).await;
    store.put(&rag, "rag:aa".into(), entry(1)).await;
    assert_eq!(store.clear_memory(Some("search:a[b]")), 1);
    assert_eq!(store.clear_memory(Some("search:*")), 1);
    assert_eq!(store.memory_items(), 1);
    assert_eq!(store.clear_memory(Some("nothing:*")), 0);
    assert_eq!(store.clear_memory(None), 1);
}
