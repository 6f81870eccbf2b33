//! A cached response: what is replayed byte for byte (status, headers, body),
//! when it was stored and under which generation of its namespace (an
//! entry of another generation than the current one is never a hit). In memory it is an `Arc<Entry>` (a hit clones
//! pointers, not bytes); in Redis it is the compact `postcard` encoding of
//! [`Wire`], with a version byte so a format change reads as a miss.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct Entry {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Wall-clock milliseconds (see `Clock`), comparable across replicas.
    pub stored_at_ms: u64,
    pub ttl_ms: u64,
    /// The namespace's generation when the question was asked.
    pub generation: u64,
    /// Bytes held, computed once: quick_cache's weigher must be cheap.
    pub weight: u64,
}

impl Entry {
    pub fn new(
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        stored_at_ms: u64,
        ttl_ms: u64,
    ) -> Self {
        let header_bytes: usize = headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        let weight = (body.len() + header_bytes + 128) as u64;
        Self {
            status,
            headers,
            body,
            stored_at_ms,
            ttl_ms,
            generation: 0,
            weight,
        }
    }

    /// The entry, stored under `generation`.
    #[must_use]
    pub fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }
}

/// 2: with the generation.
const WIRE_VERSION: u8 = 2;

#[derive(Serialize, Deserialize)]
struct Wire {
    status: u16,
    headers: Vec<(String, Bytes)>,
    body: Bytes,
    stored_at_ms: u64,
    ttl_ms: u64,
    generation: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("undecodable cache entry: {0}")]
pub struct DecodeError(String);

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let wire = Wire {
            status: self.status.as_u16(),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), Bytes::copy_from_slice(v.as_bytes())))
                .collect(),
            body: self.body.clone(),
            stored_at_ms: self.stored_at_ms,
            ttl_ms: self.ttl_ms,
            generation: self.generation,
        };
        let out = vec![WIRE_VERSION];
        postcard::to_extend(&wire, out).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (&version, rest) = bytes
            .split_first()
            .ok_or_else(|| DecodeError("empty".into()))?;
        if version != WIRE_VERSION {
            return Err(DecodeError(format!("version {version}")));
        }
        let wire: Wire = postcard::from_bytes(rest).map_err(|e| DecodeError(e.to_string()))?;
        let mut headers = HeaderMap::with_capacity(wire.headers.len());
        for (k, v) in wire.headers {
            let name = HeaderName::try_from(k).map_err(|e| DecodeError(e.to_string()))?;
            let value =
                HeaderValue::from_maybe_shared(v).map_err(|e| DecodeError(e.to_string()))?;
            headers.append(name, value);
        }
        let status = StatusCode::from_u16(wire.status).map_err(|e| DecodeError(e.to_string()))?;
        Ok(
            Self::new(status, headers, wire.body, wire.stored_at_ms, wire.ttl_ms)
                .with_generation(wire.generation),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_byte_for_byte() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let e = Entry::new(
            StatusCode::CREATED,
            headers,
            Bytes::from_static("{\"answer\":\"Học máy\"}".as_bytes()),
            1_700_000_000_123,
            3_600_000,
        )
        .with_generation(1_764_633_600_123);
        let d = Entry::decode(&e.encode()).unwrap();
        assert_eq!(d.status, e.status);
        assert_eq!(d.headers, e.headers);
        assert_eq!(d.body, e.body);
        assert_eq!(
            (d.stored_at_ms, d.ttl_ms, d.generation),
            (e.stored_at_ms, e.ttl_ms, e.generation)
        );
        assert!(Entry::decode(b"").is_err());
        assert!(Entry::decode(&[9, 1, 2]).is_err());
        let mut truncated = e.encode();
        truncated.truncate(10);
        assert!(Entry::decode(&truncated).is_err());
    }
}
