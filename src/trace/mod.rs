//! Traces: the W3C trace context passed on to the app ([`context`]) and the
//! export of the sidecar's spans over OTLP/HTTP. [`Tracing`] is what the
//! two trace layers (the server span, the attempt span) hold: the tracer
//! when spans are exported, the sample ratio of new traces when not.
//!
//! Export never blocks or fails a request. Finished spans go to the SDK's
//! batch processor, whose thread sends them with the OTLP exporter (reqwest's
//! blocking client), so a slow or hanging collector holds that thread only.
//! In front of it a gate ([`Gate`]) counts the spans held (queued or in the
//! batch being sent) and drops, and counts, any span over
//! `OTEL_BSP_MAX_QUEUE_SIZE`: the SDK drops silently past its own queue, so
//! the gate keeps the bound itself and the SDK's queue never fills.
//! The figures are `rag_sidecar_trace_spans_total{outcome}`.
//!
//! The sampler is the SDK's: `OTEL_TRACES_SAMPLER` / `_ARG` when set,
//! otherwise parent-based with `tracing.sample_ratio` for new traces. A
//! parent-based ratio sampler (the default, `parentbased_traceidratio`,
//! `parentbased_always_on`/`_off`) is built here, so that the server span
//! can take its decision before the SDK is asked: an unsampled request
//! costs what propagation costs, not an SDK span. The
//! batch processor reads `OTEL_BSP_*`, the exporter
//! `OTEL_EXPORTER_OTLP_TRACES_{ENDPOINT,HEADERS,TIMEOUT}` and
//! `OTEL_EXPORTER_OTLP_{HEADERS,TIMEOUT}`; `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` turn export off.

pub mod context;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter, SpanProcessor,
};

use crate::config::TracingConfig;
use crate::metrics::trace::SpanCounts;

/// The SDK's default queue bound (`OTEL_BSP_MAX_QUEUE_SIZE`).
const DEFAULT_QUEUE: usize = 2048;

/// Why export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("{name}: {message}")]
    Env { name: &'static str, message: String },
}

/// What the trace layers hold.
#[derive(Debug, Clone)]
pub struct Tracing {
    /// Set when spans are exported.
    tracer: Option<SdkTracer>,
    /// The share of new traces sampled: the sampled flag when nothing is
    /// exported, and the sampler's ratio when the sidecar made it.
    ratio: f64,
    /// The SDK's sampler is a parent-based ratio sampler the sidecar set
    /// (from `tracing.sample_ratio`, or a parent-based
    /// `OTEL_TRACES_SAMPLER`): a request it would not sample is known before
    /// the SDK is asked, and the SDK is not asked.
    presampled: bool,
}

impl Tracing {
    /// Propagation only: nothing is exported.
    pub fn off(ratio: f64) -> Self {
        Self {
            tracer: None,
            ratio,
            presampled: true,
        }
    }

    pub fn tracer(&self) -> Option<&SdkTracer> {
        self.tracer.as_ref()
    }

    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// Whether the sampling decision is the parent's sampled flag, or for
    /// a new trace [`context::sampled_at`] the ratio: exactly what the SDK's
    /// `ParentBased(TraceIdRatioBased(ratio))` decides, which the tests check.
    pub fn presampled(&self) -> bool {
        self.presampled
    }

    /// Export as configured, if an endpoint is; the handle flushes on
    /// shutdown.
    pub fn start(
        cfg: &TracingConfig,
        counts: Arc<SpanCounts>,
    ) -> Result<(Self, Option<Exporting>), TraceError> {
        let sampler = env_sampler(cfg.sample_ratio)?;
        let off = Self::off(sampler.unwrap_or(cfg.sample_ratio));
        let Some(endpoint) = endpoint(cfg) else {
            return Ok((off, None));
        };
        if env_is("OTEL_SDK_DISABLED", "true") || env_is("OTEL_TRACES_EXPORTER", "none") {
            return Ok((off, None));
        }
        let bound = queue_bound()?;
        let queued = Arc::new(AtomicUsize::new(0));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint.clone())
            .build()?;
        let counted = CountingExporter {
            inner: exporter,
            counts: Arc::clone(&counts),
            queued: Arc::clone(&queued),
            warned: AtomicBool::new(false),
        };
        // The builder reads the other OTEL_BSP_* variables itself.
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(bound)
            .build();
        let gate = Gate {
            inner: BatchSpanProcessor::builder(counted)
                .with_batch_config(batch)
                .build(),
            queued,
            bound,
            counts,
        };
        let mut provider = SdkTracerProvider::builder()
            .with_span_processor(gate)
            .with_resource(
                Resource::builder()
                    .with_service_name(cfg.service_name.clone())
                    .build(),
            );
        // A parent-based ratio sampler (the default, or named in
        // OTEL_TRACES_SAMPLER) is set here, and the server span decides as
        // it would before asking the SDK; any other is the SDK's to read.
        if let Some(ratio) = sampler {
            provider = provider.with_sampler(own_sampler(ratio));
        }
        let provider = provider.build();
        tracing::info!(%endpoint, queue = bound, "exporting spans over OTLP/HTTP");
        let tracing = Self {
            tracer: Some(provider.tracer("rag-sidecar")),
            ratio: sampler.unwrap_or(cfg.sample_ratio),
            presampled: sampler.is_some(),
        };
        Ok((tracing, Some(Exporting { provider })))
    }
}

/// The ratio of the parent-based sampler in force: `tracing.sample_ratio`
/// when `OTEL_TRACES_SAMPLER` is unset, the ratio its parent-based values
/// name, or `None` for any other sampler (the SDK decides each span).
fn env_sampler(configured: f64) -> Result<Option<f64>, TraceError> {
    let Ok(name) = std::env::var("OTEL_TRACES_SAMPLER") else {
        return Ok(Some(configured));
    };
    Ok(match name.trim() {
        "parentbased_always_on" => Some(1.0),
        "parentbased_always_off" => Some(0.0),
        "parentbased_traceidratio" => {
            const ARG: &str = "OTEL_TRACES_SAMPLER_ARG";
            match std::env::var(ARG) {
                // The SDK's own default for a missing argument.
                Err(_) => Some(1.0),
                Ok(v) => match v.trim().parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => Some(r),
                    _ => {
                        return Err(TraceError::Env {
                            name: ARG,
                            message: format!("{v:?} is not a ratio between 0 and 1"),
                        });
                    }
                },
            }
        }
        _ => None,
    })
}

/// The parent-based ratio sampler the sidecar sets (`OTEL_TRACES_SAMPLER`
/// unset, or naming a parent-based one): the client's sampled flag, or
/// `ratio` of new traces.
fn own_sampler(ratio: f64) -> Sampler {
    Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)))
}

/// The running export, flushed and stopped by [`Exporting::shutdown`].
#[derive(Debug)]
pub struct Exporting {
    provider: SdkTracerProvider,
}

impl Exporting {
    /// Sends what is queued (within `within`) and stops the exporter's
    /// thread. Blocking: call it off the runtime's workers.
    pub fn shutdown(self, within: Duration) {
        if let Err(e) = self.provider.shutdown_with_timeout(within) {
            tracing::warn!("trace export did not finish cleanly: {e}");
        }
    }
}

/// Where spans go: the signal's own variable (a whole URL) wins, then the
/// configured base URL with `/v1/traces`.
fn endpoint(cfg: &TracingConfig) -> Option<String> {
    let own = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .ok()
        .filter(|s| !s.trim().is_empty());
    own.or_else(|| {
        cfg.otlp_endpoint
            .as_ref()
            .map(|base| format!("{base}/v1/traces"))
    })
}

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
}

/// `OTEL_BSP_MAX_QUEUE_SIZE`, read here because the gate keeps the bound.
fn queue_bound() -> Result<usize, TraceError> {
    const NAME: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
    match std::env::var(NAME) {
        Err(_) => Ok(DEFAULT_QUEUE),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(TraceError::Env {
                name: NAME,
                message: format!("{v:?} is not a positive number of spans"),
            }),
        },
    }
}

/// The bound in front of the batch processor: a span over it is dropped
/// and counted; the batch processor's own queue (of the same size) then
/// never refuses one.
#[derive(Debug)]
struct Gate {
    inner: BatchSpanProcessor,
    /// Spans handed on and not yet through the exporter.
    queued: Arc<AtomicUsize>,
    bound: usize,
    counts: Arc<SpanCounts>,
}

impl SpanProcessor for Gate {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let taken = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.bound).then_some(n + 1)
            });
        match taken {
            Ok(_) => self.inner.on_end(span),
            Err(_) => SpanCounts::add(&self.counts.dropped, 1),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, counting what it sent and releasing the gate.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    counts: Arc<SpanCounts>,
    queued: Arc<AtomicUsize>,
    /// The first failure is logged at WARN, the others at DEBUG.
    warned: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let result = self.inner.export(batch).await;
        let counter = match &result {
            Ok(()) => &self.counts.exported,
            Err(_) => &self.counts.failed,
        };
        SpanCounts::add(counter, n as u64);
        self.queued.fetch_sub(n, Ordering::AcqRel);
        // Logged once counted, so that the figure is there when the line is.
        if let Err(e) = &result {
            if self.warned.swap(true, Ordering::Relaxed) {
                tracing::debug!("trace export failed: {e}");
            } else {
                tracing::warn!(
                    "trace export failed: {e}; further failures are counted in rag_sidecar_trace_spans_total{{outcome=\"failed\"}}"
                );
            }
        }
        result
    }

    fn shutdown_with_timeout(&mut self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&mut self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SamplingDecision, SpanKind, TraceId};
    use opentelemetry_sdk::trace::ShouldSample;

    use super::context::{new_trace_id, sampled_at};
    use super::own_sampler;

    /// The presampling in the server span decides as the SDK's sampler
    /// would: for a new trace, `sampled_at` is `TraceIdRatioBased`.
    #[test]
    fn presampling_agrees_with_the_sdk_sampler() {
        for ratio in [0.0, 0.01, 0.25, 0.5, 0.99, 1.0] {
            let sdk = own_sampler(ratio);
            for _ in 0..5_000 {
                let id = new_trace_id();
                let decision = sdk
                    .should_sample(None, TraceId::from(id), "HTTP", &SpanKind::Server, &[], &[])
                    .decision;
                assert_eq!(
                    decision == SamplingDecision::RecordAndSample,
                    sampled_at(id, ratio),
                    "ratio {ratio}, trace {id:032x}"
                );
            }
        }
    }
}
