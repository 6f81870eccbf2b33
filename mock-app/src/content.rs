//! Deterministic content: the fixed hash (FNV-1a, then SplitMix64 steps) that
//! every answer derives from its request text, the search hits and the
//! embeddings. Same text, same answer, on every run and platform.

use serde_json::{Value, json};

/// Number of floats in every embedding.
const EMBEDDING_DIMS: u64 = 8;

/// 64-bit FNV-1a: stable across runs, platforms and compiler versions.
pub(crate) fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64 step, used to derive a sequence of values from one hash.
fn mix(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn round(x: f64, decimals: i32) -> f64 {
    let p = 10f64.powi(decimals);
    (x * p).round() / p
}

/// `top_k` deterministic search hits for `query`, best first.
pub(crate) fn search_results(query: &str, top_k: u64) -> Vec<Value> {
    let seed = fnv1a(query.as_bytes());
    (0..top_k)
        .map(|i| {
            let r = mix(seed, i);
            let doc = r % 50 + 1;
            let chunk = (r >> 8) % 40 + 1;
            let jitter = ((r >> 16) % 1000) as f64 / 1_000_000.0;
            let score = round((0.95 - i as f64 * 0.04 - jitter).max(0.01), 4);
            json!({
                "document": format!("doc-{doc}.pdf"),
                "chunk": format!("Chunk {chunk} of doc-{doc}.pdf: passage relevant to \"{query}\"."),
                "score": score,
            })
        })
        .collect()
}

pub(crate) fn embedding(text: &str) -> Vec<f64> {
    let seed = fnv1a(text.as_bytes());
    (0..EMBEDDING_DIMS)
        .map(|i| round((mix(seed, i) % 2_000_001) as f64 / 1_000_000.0 - 1.0, 6))
        .collect()
}
