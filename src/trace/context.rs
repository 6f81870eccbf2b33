//! The W3C trace context (<https://www.w3.org/TR/trace-context/>) at the
//! proxy boundary: a client's `traceparent` read (a broken one is
//! refused), the one the app receives written, `tracestate` kept only
//! beside a valid `traceparent` and only when it is well formed.
//!
//! `traceparent` is read and written here rather than through the SDK's
//! `TraceContextPropagator`: the propagator builds a `Context` and goes
//! through a text-map carrier on every request, exported or not, which cost
//! about 13 % of a proxied request's instructions when measured (issue 22);
//! this is one pass over 55 bytes. `tracestate`, rarer and harder to check,
//! is checked with the API's own `TraceState` parser.

use std::str::FromStr;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The sampled bit of `trace-flags`.
pub const SAMPLED: u8 = 0x01;

/// Lowercase hex digits, by value.
const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Longest `tracestate` passed on (the W3C's 512 bytes).
const MAX_TRACESTATE: usize = 512;

/// A `traceparent`: the trace, the caller's span, the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    /// The span of whoever sent the request.
    pub parent_id: u64,
    pub flags: u8,
}

impl TraceParent {
    /// A new trace, with `parent_id` as its first span.
    pub fn new_trace(sampled: bool) -> Self {
        Self {
            trace_id: new_trace_id(),
            parent_id: new_span_id(),
            flags: if sampled { SAMPLED } else { 0 },
        }
    }

    /// The same trace and flags, with `span_id` as the parent.
    pub fn child(self, span_id: u64) -> Self {
        Self {
            parent_id: span_id,
            ..self
        }
    }

    /// An OpenTelemetry context whose parent is this one's span: the
    /// client's (`remote`), or the sidecar's own server span.
    pub fn as_parent(self, remote: bool, state: TraceState) -> Context {
        Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(self.trace_id),
            SpanId::from(self.parent_id),
            TraceFlags::new(self.flags),
            remote,
            state,
        ))
    }

    /// The trace context of an OpenTelemetry span.
    pub fn of(sc: &SpanContext) -> Self {
        Self {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            parent_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            flags: sc.trace_flags().to_u8() & SAMPLED,
        }
    }

    pub fn sampled(self) -> bool {
        self.flags & SAMPLED != 0
    }

    /// Whether a `traceparent` the sidecar wrote (version 00, so its flags
    /// are its last two digits) says sampled: a look at one byte, for the
    /// layers below the server span, which wrote it.
    pub fn written_sampled(v: &HeaderValue) -> bool {
        let b = v.as_bytes();
        let flags = b.get(54).map_or(NOT_HEX, |&d| NIBBLE[usize::from(d)]);
        b.len() == 55 && flags != NOT_HEX && flags & SAMPLED != 0
    }

    /// The request's one `traceparent`, if valid: none, several, or a
    /// broken one all read as none (the W3C's "restart the trace").
    pub fn from_headers(h: &HeaderMap) -> Option<Self> {
        let mut all = h.get_all(TRACEPARENT).iter();
        let v = all.next()?;
        if all.next().is_some() {
            return None;
        }
        Self::parse(v.as_bytes())
    }

    /// `version-traceid-parentid-flags`, lowercase hex. A later version's
    /// value is read by its first four fields, as the W3C asks; version
    /// `ff`, an all-zero id and any other shape are refused.
    pub fn parse(v: &[u8]) -> Option<Self> {
        if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return None;
        }
        let version = hex(&v[0..2])? as u8;
        match version {
            0xff => return None,
            0 if v.len() != 55 => return None,
            0 => {}
            _ if v.len() > 55 && v[55] != b'-' => return None,
            _ => {}
        }
        let trace_id = hex(&v[3..35])?;
        let parent_id = hex(&v[36..52])? as u64;
        let flags = hex(&v[53..55])? as u8;
        if trace_id == 0 || parent_id == 0 {
            return None;
        }
        Some(Self {
            trace_id,
            parent_id,
            // Only the sampled flag is defined for version 00, the one
            // written: the others are not passed on.
            flags: flags & SAMPLED,
        })
    }

    /// The header value, version 00.
    pub fn to_header(self) -> HeaderValue {
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        put_hex(&mut out[3..35], self.trace_id);
        out[35] = b'-';
        put_hex(&mut out[36..52], u128::from(self.parent_id));
        out[52] = b'-';
        put_hex(&mut out[53..55], u128::from(self.flags));
        // Hex digits and dashes: always a valid header value.
        HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// Sets `traceparent` (replacing the client's) and `tracestate` (the
    /// given one, or none).
    pub fn write(self, h: &mut HeaderMap, state: Option<HeaderValue>) {
        h.insert(TRACEPARENT, self.to_header());
        match state {
            Some(s) => {
                h.insert(TRACESTATE, s);
            }
            None => {
                h.remove(TRACESTATE);
            }
        }
    }
}

/// The request's `tracestate` to pass on: its lines joined, if the whole is
/// well formed and within 512 bytes; otherwise none.
pub fn tracestate(h: &HeaderMap) -> Option<HeaderValue> {
    let mut all = h.get_all(TRACESTATE).iter();
    let first = all.next()?;
    let mut joined: Option<Vec<u8>> = None;
    for more in all {
        let j = joined.get_or_insert_with(|| first.as_bytes().to_vec());
        j.push(b',');
        j.extend_from_slice(more.as_bytes());
    }
    let bytes = joined.as_deref().unwrap_or(first.as_bytes());
    if bytes.len() > MAX_TRACESTATE {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    // The API's parser checks every list member's key and value.
    TraceState::from_str(text).ok()?;
    match joined {
        Some(j) => HeaderValue::from_bytes(&j).ok(),
        None => Some(first.clone()),
    }
}

/// A random, non-zero trace id.
pub fn new_trace_id() -> u128 {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id;
        }
    }
}

/// A random, non-zero span id.
pub fn new_span_id() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

/// Whether a new trace is sampled at `ratio`: the trace id's low 63 bits
/// against the ratio, as the SDK's `TraceIdRatioBased` decides.
pub fn sampled_at(trace_id: u128, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    ((trace_id as u64) >> 1) < bound
}

/// Each byte's value as a lowercase hex digit, or `NOT_HEX`.
const NIBBLE: [u8; 256] = {
    let mut t = [NOT_HEX; 256];
    let mut i = 0;
    while i < 16 {
        t[DIGITS[i] as usize] = i as u8;
        i += 1;
    }
    t
};
const NOT_HEX: u8 = 0xff;

/// Lowercase hex of at most 32 digits; an uppercase digit is refused.
fn hex(digits: &[u8]) -> Option<u128> {
    let mut n = 0u128;
    let mut bad = 0u8;
    for &d in digits {
        let v = NIBBLE[usize::from(d)];
        // One test after the loop instead of a branch per digit.
        bad |= v & 0xf0;
        n = (n << 4) | u128::from(v & 0xf);
    }
    (bad == 0).then_some(n)
}

/// `n`'s low `out.len()` hex digits (an even number), most significant
/// first: a byte at a time.
fn put_hex(out: &mut [u8], n: u128) {
    let bytes = n.to_be_bytes();
    let from = bytes.len() - out.len() / 2;
    for (pair, b) in out.chunks_exact_mut(2).zip(&bytes[from..]) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_and_writes_the_w3c_example() {
        let p = TraceParent::parse(GOOD.as_bytes()).unwrap();
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.parent_id, 0x00f067aa0ba902b7);
        assert!(p.sampled());
        assert_eq!(p.to_header(), GOOD);
        let child = p.child(1);
        assert_eq!(
            child.to_header(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000001-01"
        );
    }

    #[test]
    fn broken_values_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-comes-later";
        let p = TraceParent::parse(v.as_bytes()).unwrap();
        assert_eq!(p.parent_id, 0x00f067aa0ba902b7);
        assert_eq!(p.flags, SAMPLED, "unknown flags are not passed on");
        assert!(p.to_header().to_str().unwrap().starts_with("00-"));
    }

    #[test]
    fn the_written_sampled_flag_is_read_from_one_byte() {
        let on = TraceParent::parse(GOOD.as_bytes()).unwrap();
        assert!(TraceParent::written_sampled(&on.to_header()));
        let off = TraceParent { flags: 0, ..on };
        assert!(!TraceParent::written_sampled(&off.to_header()));
        assert!(!TraceParent::written_sampled(&HeaderValue::from_static(
            "01"
        )));
    }

    #[test]
    fn two_traceparent_headers_read_as_none() {
        let mut h = HeaderMap::new();
        h.append(TRACEPARENT, HeaderValue::from_static(GOOD));
        assert!(TraceParent::from_headers(&h).is_some());
        h.append(TRACEPARENT, HeaderValue::from_static(GOOD));
        assert_eq!(TraceParent::from_headers(&h), None);
    }

    #[test]
    fn tracestate_is_joined_checked_and_bounded() {
        let mut h = HeaderMap::new();
        assert_eq!(tracestate(&h), None);
        h.append(
            TRACESTATE,
            HeaderValue::from_static("rojo=00f067aa0ba902b7"),
        );
        assert_eq!(tracestate(&h).unwrap(), "rojo=00f067aa0ba902b7");
        h.append(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        assert_eq!(
            tracestate(&h).unwrap(),
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
        );
        let mut bad = HeaderMap::new();
        bad.insert(TRACESTATE, HeaderValue::from_static("no equals sign"));
        assert_eq!(tracestate(&bad), None);
        let mut long = HeaderMap::new();
        let v = format!("k={}", "v".repeat(600));
        long.insert(TRACESTATE, HeaderValue::from_str(&v).unwrap());
        assert_eq!(tracestate(&long), None);
    }

    #[test]
    fn ids_are_never_zero_and_the_ratio_bounds_the_share() {
        assert!((0..1000).all(|_| new_trace_id() != 0 && new_span_id() != 0));
        let n = 20_000;
        let kept = (0..n).filter(|_| sampled_at(new_trace_id(), 0.25)).count();
        assert!((4_000..6_000).contains(&kept), "{kept} of {n} at 0.25");
        assert!(sampled_at(new_trace_id(), 1.0));
        assert!(!(0..1000).any(|_| sampled_at(new_trace_id(), 0.0)));
    }
}
