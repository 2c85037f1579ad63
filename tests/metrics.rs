//! MetricsSink (feature `metrics`) through the public API: what a mix of allowed and rejected
//! requests counts, bounded labels, stream outcomes, cost totals, the JSONL sink's queue, and
//! the layers' own time (`policy_ms`) that leaves the upstream's out.
#![cfg(feature = "metrics")]

mod common;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use serde_json::json;
use tower::util::BoxCloneService;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::{flag, AuditLayer, AuditRecord, FanOut, JsonlSink, LogSink};
use tower_llm_policy::audit::{MemorySink, Outcome};
use tower_llm_policy::keys::{ApiKey, MemoryKeyStore};
use tower_llm_policy::metrics::{names, MetricsSink, OTHER_MODEL, UNKNOWN_MODEL};
use tower_llm_policy::{KeyAuthLayer, ModelAllowListLayer, PolicyBody};

const SECRET: &str = "sk-virt-metrics-Q7wZp3LmN8vR2xTk";

const CHAT_JSON: &str = r#"{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":2000,"completion_tokens":300,"total_tokens":2300}}"#;

/// One series: its name, its labels, its value.
type Sample = (String, Vec<(String, String)>, DebugValue);
type Snapshot = Vec<Sample>;
type Series<'a> = Vec<(&'a [(String, String)], &'a DebugValue)>;

/// The series of `name`, with their labels.
fn series<'a>(snapshot: &'a [Sample], name: &str) -> Series<'a> {
    snapshot
        .iter()
        .filter(|(n, ..)| n == name)
        .map(|(_, labels, value)| (labels.as_slice(), value))
        .collect()
}

fn take(snapshotter: &Snapshotter) -> Snapshot {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels = key
                .key()
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            (key.key().name().to_owned(), labels, value)
        })
        .collect()
}

fn has(labels: &[(String, String)], want: &[(&str, &str)]) -> bool {
    want.iter()
        .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
}

/// The sum of the counters of `name` whose labels include `want`.
fn counter(snapshot: &[Sample], name: &str, want: &[(&str, &str)]) -> u64 {
    series(snapshot, name)
        .into_iter()
        .filter(|(labels, _)| has(labels, want))
        .map(|(_, value)| match value {
            DebugValue::Counter(n) => *n,
            other => panic!("{name} is not a counter: {other:?}"),
        })
        .sum()
}

/// The values recorded into the histograms of `name` whose labels include `want`.
fn histogram(snapshot: &[Sample], name: &str, want: &[(&str, &str)]) -> Vec<f64> {
    series(snapshot, name)
        .into_iter()
        .filter(|(labels, _)| has(labels, want))
        .flat_map(|(_, value)| match value {
            DebugValue::Histogram(values) => values.iter().map(|v| v.into_inner()),
            other => panic!("{name} is not a histogram: {other:?}"),
        })
        .collect()
}

fn gauge(snapshot: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    let found = series(snapshot, name)
        .into_iter()
        .find(|(labels, _)| has(labels, want))
        .unwrap_or_else(|| panic!("no {name} {want:?}"));
    match found.1 {
        DebugValue::Gauge(v) => v.into_inner(),
        other => panic!("{name} is not a gauge: {other:?}"),
    }
}

/// Runs `f` with a local recorder on a current-thread runtime (the records are emitted on
/// this thread, when the response bodies end), and returns what was recorded.
fn recorded<F: FnOnce(&tokio::runtime::Runtime)>(f: F) -> Snapshot {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || f(&runtime));
    take(&snapshotter)
}

/// An audit record as the audit layer would write it, with `fields` over a plain allowed chat.
fn record(fields: serde_json::Value) -> AuditRecord {
    let mut base = json!({
        "request_id": "req_1",
        "timestamp": "2026-12-03T10:00:00.000Z",
        "key": "app",
        "method": "POST",
        "path": "/v1/chat/completions",
        "endpoint": "chat_completions",
        "model": "gpt-4o-mini",
        "canonical_model": "gpt-4o-mini",
        "stream": false,
        "usage_injected": false,
        "status": 200,
        "outcome": "completed",
        "latency_ms": 12.5,
        "response_bytes": 10,
    });
    for (k, v) in fields.as_object().unwrap() {
        base[k] = v.clone();
    }
    serde_json::from_value(base).unwrap()
}

type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
type Svc = BoxCloneService<Request<String>, Response<Body>, Infallible>;

/// Audit (to `sink`) ► KeyAuth ► ModelAllowList ► an upstream that answers a chat completion
/// after `upstream_delay`.
fn stack(sink: impl LogSink, upstream_delay: Duration) -> Svc {
    let store = Arc::new(MemoryKeyStore::new().with_key(
        SECRET,
        ApiKey::new("metrics-app").model_limits(["gpt-4o-mini"]),
    ));
    ServiceBuilder::new()
        .map_response(|res: Response<_>| {
            res.map(|body: _| BodyExt::map_err(body, Into::into).boxed_unsync())
        })
        .layer(AuditLayer::new(sink))
        .layer(KeyAuthLayer::new(store))
        .layer(ModelAllowListLayer::new())
        .service(service_fn(move |_req: Request<PolicyBody>| async move {
            tokio::time::sleep(upstream_delay).await;
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", "application/json")
                    .body(CHAT_JSON.to_owned())
                    .unwrap(),
            )
        }))
        .boxed_clone()
}

fn chat(key: &str, model: &str) -> Request<String> {
    Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#
        ))
        .unwrap()
}

async fn send(svc: Svc, req: Request<String>) -> StatusCode {
    let res = svc.oneshot(req).await.unwrap();
    let status = res.status();
    res.into_body().collect().await.unwrap();
    status
}

#[test]
fn a_mix_of_allowed_and_rejected_requests_is_counted() {
    let snapshot = recorded(|rt| {
        let svc = stack(MetricsSink::new(), Duration::ZERO);
        rt.block_on(async {
            assert_eq!(
                send(svc.clone(), chat(SECRET, "gpt-4o-mini")).await,
                StatusCode::OK
            );
            assert_eq!(
                send(svc.clone(), chat(SECRET, "gpt-4o-mini")).await,
                StatusCode::OK
            );
            assert_eq!(
                send(svc.clone(), chat("sk-nobody-123456789", "gpt-4o-mini")).await,
                StatusCode::UNAUTHORIZED
            );
            assert_eq!(
                send(svc.clone(), chat(SECRET, "gpt-4o")).await,
                StatusCode::FORBIDDEN
            );
        });
    });
    let requests = |want: &[(&str, &str)]| counter(&snapshot, names::REQUESTS, want);
    assert_eq!(requests(&[]), 4);
    assert_eq!(
        requests(&[
            ("key", "metrics-app"),
            ("model", "gpt-4o-mini"),
            ("endpoint", "chat_completions"),
            ("status", "200"),
            ("outcome", "completed"),
        ]),
        2
    );
    assert_eq!(
        requests(&[("key", "none"), ("status", "401"), ("outcome", "rejected")]),
        1
    );
    // A model the key may not use is still a known name: it is its own label.
    assert_eq!(
        requests(&[
            ("key", "metrics-app"),
            ("model", "gpt-4o"),
            ("status", "403")
        ]),
        1
    );

    let blocked = |want: &[(&str, &str)]| counter(&snapshot, names::BLOCKED, want);
    assert_eq!(blocked(&[]), 2);
    assert_eq!(
        blocked(&[("layer", "key_auth"), ("code", "invalid_api_key")]),
        1
    );
    assert_eq!(
        blocked(&[("layer", "model_allow_list"), ("code", "model_not_allowed")]),
        1
    );

    let tokens = |direction| {
        counter(
            &snapshot,
            names::TOKENS,
            &[
                ("key", "metrics-app"),
                ("model", "gpt-4o-mini"),
                ("direction", direction),
            ],
        )
    };
    assert_eq!(tokens("in"), 4000);
    assert_eq!(tokens("out"), 600);
    // gpt-4o-mini: $0.15 in, $0.60 out per million tokens; twice.
    let cost = 2.0 * (2000.0 * 0.15 + 300.0 * 0.60);
    assert_eq!(
        counter(
            &snapshot,
            names::COST_MICROUSD,
            &[("key", "metrics-app"), ("model", "gpt-4o-mini")]
        ),
        cost as u64
    );
    // Not streamed: no stream outcome.
    assert_eq!(counter(&snapshot, names::STREAMS, &[]), 0);

    assert_eq!(histogram(&snapshot, names::REQUEST_DURATION, &[]).len(), 4);
    assert_eq!(
        histogram(
            &snapshot,
            names::LAYERS_DURATION,
            &[("decision", "forwarded")]
        )
        .len(),
        2
    );
    assert_eq!(
        histogram(
            &snapshot,
            names::LAYERS_DURATION,
            &[("decision", "rejected")]
        )
        .len(),
        2
    );
}

#[test]
fn the_layers_time_leaves_the_upstream_out() {
    let sink = MemorySink::new();
    let snapshot = recorded(|rt| {
        let svc = stack(
            FanOut::new().with(sink.clone()).with(MetricsSink::new()),
            Duration::from_millis(100),
        );
        rt.block_on(async {
            assert_eq!(
                send(svc.clone(), chat(SECRET, "gpt-4o-mini")).await,
                StatusCode::OK
            );
            assert_eq!(
                send(svc, chat(SECRET, "gpt-4o")).await,
                StatusCode::FORBIDDEN
            );
        });
    });
    let records = sink.records();
    let allowed = &records[0];
    assert!(allowed.latency_ms >= 100.0, "{}", allowed.latency_ms);
    let policy_ms = allowed
        .policy_ms
        .expect("forwarded: the time until the upstream was called");
    assert!(
        policy_ms < 100.0 && policy_ms <= allowed.latency_ms,
        "{policy_ms}"
    );
    let rejected = &records[1];
    assert!(rejected.policy_ms.unwrap() <= rejected.latency_ms);
    let forwarded = histogram(
        &snapshot,
        names::LAYERS_DURATION,
        &[("decision", "forwarded")],
    );
    assert_eq!(forwarded, [policy_ms / 1000.0]);
    // Serialized only when known.
    let line = serde_json::to_value(allowed).unwrap();
    assert_eq!(line["policy_ms"], json!(policy_ms));
    let mut none = allowed.clone();
    none.policy_ms = None;
    assert!(serde_json::to_value(&none)
        .unwrap()
        .get("policy_ms")
        .is_none());
}

#[test]
fn model_names_a_client_makes_up_are_one_label() {
    let snapshot = recorded(|_| {
        let sink = MetricsSink::new().models(["My-Model"]);
        for i in 0..100 {
            sink.record(&record(json!({
                "outcome": "rejected", "status": 403, "blocked_by": "model_allow_list",
                "code": "model_not_allowed", "model": format!("made-up-{i}"),
                "canonical_model": format!("made-up-{i}"),
            })));
        }
        sink.record(&record(json!({"canonical_model": "my-model"})));
        sink.record(&record(
            json!({"canonical_model": null, "model": null, "endpoint": "models"}),
        ));
        sink.record(&record(json!({"endpoint": "/v1/../../etc/passwd"})));
    });
    let models: std::collections::BTreeSet<String> = series(&snapshot, names::REQUESTS)
        .into_iter()
        .flat_map(|(labels, _)| {
            labels
                .iter()
                .filter(|(k, _)| k == "model")
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert_eq!(
        models.into_iter().collect::<Vec<_>>(),
        ["gpt-4o-mini", "my-model", OTHER_MODEL, UNKNOWN_MODEL]
    );
    assert_eq!(
        counter(&snapshot, names::REQUESTS, &[("model", OTHER_MODEL)]),
        100
    );
    assert_eq!(
        counter(&snapshot, names::REQUESTS, &[("endpoint", "unknown")]),
        1
    );
    assert_eq!(
        counter(
            &snapshot,
            names::REQUESTS,
            &[("endpoint", "models"), ("model", UNKNOWN_MODEL)]
        ),
        1
    );
}

#[test]
fn stream_outcomes_are_counted_for_streams_that_went_upstream() {
    let snapshot = recorded(|_| {
        let sink = MetricsSink::new();
        let stream = |fields: serde_json::Value| {
            let mut r = record(fields);
            r.stream = true;
            r
        };
        sink.record(&stream(json!({})));
        sink.record(&stream(json!({})));
        sink.record(&stream(json!({"outcome": "cancelled"})));
        sink.record(&stream(json!({"outcome": "upstream_error", "status": 502})));
        sink.record(&stream(
            json!({"outcome": "stopped", "blocked_by": "quota", "flags": [flag::BUDGET_CUT]}),
        ));
        sink.record(&stream(
            json!({"outcome": "stopped", "blocked_by": "guard"}),
        ));
        // A rejected stream never started; a request that is not a stream is not one.
        sink.record(&stream(json!({"outcome": "rejected", "status": 429})));
        sink.record(&record(json!({})));
    });
    let streams = |outcome| {
        counter(
            &snapshot,
            names::STREAMS,
            &[("model", "gpt-4o-mini"), ("outcome", outcome)],
        )
    };
    assert_eq!(streams("completed"), 2);
    assert_eq!(streams("cancelled"), 1);
    assert_eq!(streams("error"), 1);
    assert_eq!(streams("cut"), 1);
    assert_eq!(streams("blocked"), 1);
    assert_eq!(counter(&snapshot, names::STREAMS, &[]), 6);
}

#[test]
fn costs_are_summed_before_they_are_rounded() {
    let snapshot = recorded(|_| {
        let sink = MetricsSink::new();
        // 0.4 millionths of a dollar each: each alone would round to nothing.
        for _ in 0..10 {
            sink.record(&record(json!({"cost_usd": 0.000_000_4})));
        }
        // Shared by clones; another key is its own series.
        sink.clone().record(&record(json!({"cost_usd": 0.000_002})));
        sink.record(&record(json!({"key": "other-app", "cost_usd": 1.5})));
        // Not a cost: nothing is added.
        sink.record(&record(json!({"cost_usd": null})));
    });
    assert_eq!(
        counter(&snapshot, names::COST_MICROUSD, &[("key", "app")]),
        6
    );
    assert_eq!(
        counter(&snapshot, names::COST_MICROUSD, &[("key", "other-app")]),
        1_500_000
    );
}

#[test]
fn the_key_label_can_be_turned_off() {
    let snapshot = recorded(|_| {
        let sink = MetricsSink::new().key_label(false);
        sink.record(&record(json!({"key": "a", "prompt_tokens": 5})));
        sink.record(&record(json!({"key": "b", "prompt_tokens": 7})));
    });
    assert_eq!(counter(&snapshot, names::REQUESTS, &[("key", "all")]), 2);
    assert_eq!(
        counter(
            &snapshot,
            names::TOKENS,
            &[("key", "all"), ("direction", "in")]
        ),
        12
    );
}

#[test]
fn a_jsonl_sinks_queue_and_drops_are_reported() {
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let out = Arc::new(Mutex::new(Vec::new()));
    let writer = common::GatedWriter {
        entered: entered_tx,
        gate: Arc::new(Mutex::new(gate)),
        out: out.clone(),
    };
    let jsonl = JsonlSink::builder()
        .queue_capacity(1)
        .flush_interval(Duration::from_millis(1))
        .writer(writer)
        .unwrap();
    let sink = MetricsSink::new().watch_jsonl("audit_file", &jsonl);
    // Dropped before the sinks should an assertion fail: the writer is let go before the last
    // sink waits for it.
    let release = release;
    let snapshot = recorded(|_| {
        // The writer takes the first record and blocks writing it out.
        jsonl.record(&record(json!({})));
        entered.recv().unwrap();
        // One more fits in the queue; the next is dropped.
        jsonl.record(&record(json!({})));
        jsonl.record(&record(json!({})));
        sink.report_sinks();
    });
    let labels = [("sink", "audit_file")];
    assert_eq!(gauge(&snapshot, names::AUDIT_QUEUE_DEPTH, &labels), 1.0);
    assert!(gauge(&snapshot, names::AUDIT_QUEUE_BYTES, &labels) > 0.0);
    assert_eq!(counter(&snapshot, names::AUDIT_DROPPED, &labels), 1);
    assert_eq!(counter(&snapshot, names::AUDIT_WRITE_ERRORS, &labels), 0);
    drop(release);
    jsonl.flush().unwrap();
    assert_eq!(jsonl.queued(), 0);
    assert_eq!(jsonl.queued_bytes(), 0);
    assert_eq!(
        out.lock().unwrap().iter().filter(|&&b| b == b'\n').count(),
        2
    );

    // Recording through the sink reports the queue too.
    let snapshot = recorded(|_| sink.record(&record(json!({}))));
    assert_eq!(gauge(&snapshot, names::AUDIT_QUEUE_DEPTH, &labels), 0.0);
    assert_eq!(counter(&snapshot, names::AUDIT_DROPPED, &labels), 1);
}

#[test]
fn debug_output_names_no_key_and_no_secret() {
    let sink = MetricsSink::new().models(["gpt-4o-mini"]);
    let shown = format!("{sink:?}");
    assert!(shown.contains("MetricsSink"), "{shown}");
    assert!(!shown.contains("sk-"), "{shown}");
    // The record's outcome is the label.
    assert_eq!(Outcome::Rejected.as_str(), "rejected");
}

#[test]
fn descriptions_and_units_are_registered() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        MetricsSink::describe();
        MetricsSink::new().record(&record(json!({"policy_ms": 0.5})));
    });
    let described: Vec<_> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, unit, description, _)| (key.key().name().to_owned(), unit, description))
        .collect();
    let of = |name: &str| {
        described
            .iter()
            .find(|(n, ..)| n == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    assert!(of(names::REQUESTS).2.is_some());
    assert_eq!(of(names::LAYERS_DURATION).1, Some(metrics::Unit::Seconds));
    assert_eq!(of(names::REQUEST_DURATION).1, Some(metrics::Unit::Seconds));
}
