//! Logs, traces and metrics of the binaries.
//!
//! Logs go to stderr, readable by default or as JSON lines (`--log-format json`), filtered by
//! `RUST_LOG`. Traces and metrics are exported over OTLP/HTTP only when the standard
//! OpenTelemetry variables ask for it: `OTEL_EXPORTER_OTLP_ENDPOINT` (or the signal-specific
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`), with the
//! other `OTEL_EXPORTER_OTLP_*` settings (headers, timeout, protocol) read by the exporter;
//! `OTEL_SDK_DISABLED=true` turns it off. The resource carries `service.name` (`OTEL_SERVICE_NAME`,
//! else the binary's name), `service.version` and `OTEL_RESOURCE_ATTRIBUTES`. W3C trace context
//! is the propagator.

use std::collections::BTreeMap;

use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Text,
    /// One JSON object per event (timestamp, level, fields, spans).
    Json,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OTLP exporter could not be built from the environment.
    #[error("cannot export telemetry over OTLP: {0}")]
    Exporter(String),
    /// A global subscriber was installed already.
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(String),
}

impl Error {
    /// Starting again with the same environment fails the same way.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes what is still buffered.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Whether traces are exported.
    pub fn exports_traces(&self) -> bool {
        self.tracer.is_some()
    }

    /// Whether metrics are exported.
    pub fn exports_metrics(&self) -> bool {
        self.meter.is_some()
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(self) {
        if let Some(t) = self.tracer
            && let Err(e) = t.shutdown()
        {
            eprintln!("warning: traces not flushed: {e}");
        }
        if let Some(m) = self.meter
            && let Err(e) = m.shutdown()
        {
            eprintln!("warning: metrics not flushed: {e}");
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// Whether the environment asks for metrics to be exported.
pub fn metrics_requested() -> bool {
    !sdk_disabled()
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
}

fn sdk_disabled() -> bool {
    std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The resource of this process: `service.name`, `service.version`, and the environment's.
pub fn resource(default_service: &str) -> Resource {
    let mut builder = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        builder = builder.with_service_name(default_service.to_owned());
    }
    builder
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Installs the log subscriber (`format`, `RUST_LOG` or `default_filter`, colour only when
/// `ansi`), and OTLP export of traces and metrics when the environment asks for it.
pub fn init(
    service: &str,
    format: LogFormat,
    default_filter: &str,
    ansi: bool,
) -> Result<Telemetry, Error> {
    init_with(service, format, default_filter, ansi, None)
}

/// Like [`init`], exporting traces and metrics to the OTLP/HTTP collector at `collector`
/// (`http://host:port`) when given, whatever the environment says (benchmarks use it).
pub fn init_with(
    service: &str,
    format: LogFormat,
    default_filter: &str,
    ansi: bool,
    collector: Option<&str>,
) -> Result<Telemetry, Error> {
    use opentelemetry_otlp::WithExportConfig as _;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let traces = collector.is_some()
        || (!sdk_disabled()
            && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
                || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")));
    let metrics = collector.is_some() || metrics_requested();
    let resource = resource(service);
    let mut telemetry = Telemetry::default();
    let otel_layer = if traces {
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
        if let Some(c) = collector {
            builder = builder.with_endpoint(format!("{c}/v1/traces"));
        }
        let exporter = builder
            .build()
            .map_err(|e| Error::Exporter(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.clone())
            .build();
        let tracer = provider.tracer(service.to_owned());
        opentelemetry::global::set_tracer_provider(provider.clone());
        telemetry.tracer = Some(provider);
        Some(trace_layer(tracer))
    } else {
        None
    };
    if metrics {
        let mut builder = opentelemetry_otlp::MetricExporter::builder().with_http();
        if let Some(c) = collector {
            builder = builder.with_endpoint(format!("{c}/v1/metrics"));
        }
        let exporter = builder
            .build()
            .map_err(|e| Error::Exporter(e.to_string()))?;
        let provider = SdkMeterProvider::builder()
            .with_periodic_exporter(exporter)
            .with_resource(resource)
            .build();
        opentelemetry::global::set_meter_provider(provider.clone());
        telemetry.meter = Some(provider);
    }
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_target(false)
            .compact()
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel_layer)
        .try_init()
        .map_err(|e| Error::Subscriber(e.to_string()))?;
    Ok(telemetry)
}

/// The layer that exports spans to `tracer`: spans at info and above whatever `RUST_LOG` says
/// (so a quiet worker still traces), and of the log events only warnings and errors, as span
/// events (the others are in the logs, and would double each span's size).
pub fn trace_layer<S>(tracer: opentelemetry_sdk::trace::Tracer) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    // Per span, the layer by default adds thread and source location attributes, times every
    // enter and exit (busy and idle time) and activates an OpenTelemetry context on each poll;
    // none of it is needed here (trace context is read from the span itself), and together it
    // cost several percent of the engine's throughput.
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_threads(false)
        .with_location(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_filter(
            tracing_subscriber::filter::filter_fn(|meta| {
                let most_verbose = if meta.is_span() {
                    tracing::Level::INFO
                } else {
                    tracing::Level::WARN
                };
                *meta.level() <= most_verbose
            })
            .with_max_level_hint(tracing_subscriber::filter::LevelFilter::INFO),
        )
}

struct Writer<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Writer<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct Reader<'a>(&'a BTreeMap<String, String>);

impl Extractor for Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The W3C trace context (`traceparent`, `tracestate`) of the current span, as message
/// attributes; empty when traces are not exported.
pub fn current_context() -> BTreeMap<String, String> {
    let mut attributes = BTreeMap::new();
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut Writer(&mut attributes));
    });
    attributes
}

/// Makes `span` continue the trace whose context `attributes` carry (a message's), so one
/// push is one trace across processes and retries.
pub fn continue_trace(span: &tracing::Span, attributes: &BTreeMap<String, String>) {
    if !attributes.contains_key("traceparent") {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Reader(attributes)));
    let _ = span.set_parent(cx);
}
