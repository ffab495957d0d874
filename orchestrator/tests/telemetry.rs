//! One push is one trace: a webhook over HTTP into the ingress, then two workers (two engines
//! with their own backend handles on one file, as two processes) handling the event and every
//! step, all under the webhook's trace through the W3C context the messages carry. Spans are
//! collected with the OpenTelemetry SDK's in-memory exporter.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use activities::{Activities, Invocation, Outcome};
use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use orchestrator::clock::{SharedClock, SystemClock};
use orchestrator::engine::{Engine, EngineConfig};
use orchestrator::ingress::{Ingress, IngressConfig};
use orchestrator::ports::Store;
use orchestrator::sqlite::{SqliteBackend, SqliteConfig};
use orchestrator::tenants::token_sha256;
use testkit::fixtures::tenant;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt as _;
use workflows::testing::output_for;
use workflows::{Environment, State, TenantId, WorkflowKey};

struct Instant;

impl Activities for Instant {
    async fn invoke(&self, invocation: Invocation<'_>) -> Outcome {
        Outcome::Done(output_for(invocation.task))
    }
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_is_one_trace_across_ingress_and_two_workers() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let subscriber = tracing_subscriber::registry().with(orchestrator::telemetry::trace_layer(
        provider.tracer("test"),
    ));
    tracing::subscriber::set_global_default(subscriber).expect("one subscriber per test binary");
    let metric_exporter = InMemoryMetricExporter::default();
    let meters = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(metric_exporter.clone()).build())
        .build();
    opentelemetry::global::set_meter_provider(meters.clone());

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.sqlite");
    let backend = SqliteBackend::open(SqliteConfig::new(&path)).expect("open");
    let mut acme = tenant("acme", 11, 12);
    acme.webhook.token_sha256 = token_sha256("whk_secret");
    backend.put_tenant(&acme, true).await.expect("tenant");
    let clock: SharedClock = Arc::new(SystemClock);

    let ingress = Arc::new(Ingress::new(
        Arc::new(backend.clone()),
        Arc::new(backend.clone()),
        clock.clone(),
        IngressConfig::default(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/hooks/gitlab",
        listener.local_addr().expect("addr")
    );
    let stop = CancellationToken::new();
    tokio::spawn(ingress.clone().serve(listener, stop.clone()));

    let mut workers = Vec::new();
    let mut engines = Vec::new();
    for _ in 0..2 {
        let b = Arc::new(SqliteBackend::open(SqliteConfig::new(&path)).expect("open"));
        let engine = Arc::new(Engine::new(
            b.clone(),
            b.clone(),
            b,
            Arc::new(Instant),
            clock.clone(),
            EngineConfig {
                wait: Duration::from_millis(50),
                ..EngineConfig::default()
            },
        ));
        engines.push(engine.clone());
        workers.push(tokio::spawn(engine.run(stop.clone())));
    }

    let mut payload: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/gitlab/gitlab-docs_push.json"
        ))
        .expect("payload"),
    )
    .expect("json");
    payload["project_id"] = serde_json::json!(11);
    let answer = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .header("x-gitlab-event", "Push Hook")
        .header("x-gitlab-token", "whk_secret")
        .body(payload.to_string())
        .send()
        .await
        .expect("answered");
    assert_eq!(answer.status().as_u16(), 202);

    let key = WorkflowKey::new(TenantId::new("acme").expect("id"), Environment::Production);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !matches!(backend.workflow(&key).await, Ok(Some(r)) if r.state() == State::Live) {
        assert!(tokio::time::Instant::now() < deadline, "not live");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    for w in workers {
        w.await.expect("worker stops");
    }
    engines[0].observe(true).await;
    provider.force_flush().expect("flush");
    let spans = exporter.get_finished_spans().expect("spans");

    let webhook: Vec<&SpanData> = spans.iter().filter(|s| s.name == "webhook").collect();
    assert_eq!(
        webhook.len(),
        1,
        "{:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let webhook = webhook[0];
    let trace = webhook.span_context.trace_id();
    assert_eq!(
        attribute(webhook, "http.response.status_code").as_deref(),
        Some("202")
    );

    // A received message is handled in its consumer span: `event` for an event, `step` for a
    // step message (the activity invocation). The report a step produces is applied in an
    // internal `event` span under the step. Every span of the workflow is in the push's trace.
    let events: Vec<&SpanData> = spans.iter().filter(|s| s.name == "event").collect();
    let steps: Vec<&SpanData> = spans.iter().filter(|s| s.name == "step").collect();
    assert!(!events.is_empty() && !steps.is_empty());
    let by_id: HashMap<_, &SpanData> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let parent = |s: &SpanData| by_id.get(&s.parent_span_id).map(|p| p.name.to_string());
    let consumers: Vec<&SpanData> = events
        .iter()
        .chain(steps.iter())
        .copied()
        .filter(|s| s.span_kind == SpanKind::Consumer)
        .collect();
    // Each step message, and at least the push, arrived over the queue.
    assert!(
        consumers.len() > steps.len(),
        "{} consumer spans",
        consumers.len()
    );
    for c in &consumers {
        assert!(attribute(c, "messaging.destination.name").is_some());
        assert_eq!(attribute(c, "messaging.system").as_deref(), Some("sqlite"));
        assert_eq!(
            attribute(c, "messaging.operation.type").as_deref(),
            Some("process")
        );
        assert!(attribute(c, "messaging.message.id").is_some());
        assert!(attribute(c, "messaging.message.delivery_count").is_some());
        // Its parent is the span that sent the message, in another delivery (or process).
        let p = parent(c);
        assert!(
            matches!(p.as_deref(), Some("webhook" | "event" | "step")),
            "consumer under {p:?}"
        );
    }
    for s in &steps {
        assert_eq!(s.span_kind, SpanKind::Consumer, "a step span not consumed");
    }
    for s in events.iter().filter(|s| s.span_kind != SpanKind::Consumer) {
        assert_eq!(parent(s).as_deref(), Some("step"), "an internal event span");
        assert!(attribute(s, "messaging.message.id").is_none());
    }
    // The push's event continues the webhook's trace (a remote parent, across the queue).
    let push_event = events
        .iter()
        .find(|s| attribute(s, "event.kind").as_deref() == Some("push"))
        .expect("the push's event span");
    assert_eq!(push_event.parent_span_id, webhook.span_context.span_id());
    assert_eq!(push_event.span_kind, SpanKind::Consumer);
    for s in events.iter().chain(steps.iter()) {
        assert_eq!(s.span_context.trace_id(), trace);
        assert_eq!(attribute(s, "tenant.id").as_deref(), Some("acme"));
        assert_eq!(attribute(s, "workflow.env").as_deref(), Some("production"));
    }
    assert_eq!(
        attribute(push_event, "event.verdict").as_deref(),
        Some("accepted")
    );
    assert_eq!(
        attribute(push_event, "workflow.from_state").as_deref(),
        Some("unprovisioned")
    );
    assert_eq!(
        attribute(push_event, "workflow.to_state").as_deref(),
        Some("preparing")
    );
    assert_eq!(attribute(push_event, "run").as_deref(), Some("r1"));
    assert!(
        steps
            .iter()
            .all(|s| attribute(s, "step.outcome").as_deref() == Some("done"))
    );

    meters.force_flush().expect("flush metrics");
    let metrics = metric_exporter.get_finished_metrics().expect("metrics");
    // The last export holds the cumulative sums.
    let last = &metrics[metrics.len().saturating_sub(1)..];
    assert_eq!(
        counter(
            last,
            "orchestrator.events",
            &[("verdict", "accepted"), ("event.kind", "push")]
        ),
        1
    );
    assert_eq!(
        counter(
            last,
            "orchestrator.transitions",
            &[("from_state", "unprovisioned"), ("to_state", "preparing")]
        ),
        1
    );
    assert_eq!(
        counter(last, "orchestrator.transitions", &[("to_state", "live")]),
        1
    );
    let mut step_calls = 0;
    for rm in last {
        for sm in rm.scope_metrics() {
            for m in sm
                .metrics()
                .filter(|m| m.name() == "orchestrator.step.duration")
            {
                if let AggregatedMetrics::F64(MetricData::Histogram(h)) = m.data() {
                    step_calls += h.data_points().map(|dp| dp.count()).sum::<u64>();
                }
            }
        }
    }
    assert_eq!(
        step_calls as usize,
        steps.len(),
        "one duration per activity invocation"
    );

    let kinds: BTreeSet<String> = steps.iter().filter_map(|s| attribute(s, "step")).collect();
    for step in [
        "network",
        "source_infra",
        "image",
        "database",
        "routing",
        "rollout",
    ] {
        assert!(kinds.contains(step), "no span of step {step}: {kinds:?}");
    }
}

/// Sums of a u64 counter's data points whose attributes include all of `with`.
fn counter(
    metrics: &[opentelemetry_sdk::metrics::data::ResourceMetrics],
    name: &str,
    with: &[(&str, &str)],
) -> u64 {
    let mut total = 0;
    for rm in metrics {
        for sm in rm.scope_metrics() {
            for m in sm.metrics().filter(|m| m.name() == name) {
                if let AggregatedMetrics::U64(MetricData::Sum(sum)) = m.data() {
                    for dp in sum.data_points() {
                        let attrs: Vec<(String, String)> = dp
                            .attributes()
                            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                            .collect();
                        if with
                            .iter()
                            .all(|(k, v)| attrs.iter().any(|(ak, av)| ak == k && av == v))
                        {
                            total += dp.value();
                        }
                    }
                }
            }
        }
    }
    total
}
