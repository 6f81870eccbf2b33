//! Upstream error classification: the quota-pattern search never panics
//! and agrees with a plain substring search of each chunk.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rag_sidecar::layers::classify::quota_match;

fuzz_target!(|input: (Vec<String>, Vec<Vec<u8>>)| {
    let (patterns, chunks) = input;
    let chunks: Vec<Bytes> = chunks.into_iter().map(Bytes::from).collect();
    let naive = patterns.iter().any(|p| {
        !p.is_empty()
            && chunks
                .iter()
                .any(|c| c.windows(p.len()).any(|w| w == p.as_bytes()))
    });
    assert_eq!(quota_match(&patterns, &chunks), naive);
});
