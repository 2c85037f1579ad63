//! PostgresSink against a real PostgreSQL server (each test starts its own, see
//! `common/pg.rs`): 10,000 records with none lost, the columns and the JSON, a database restart
//! in the middle, a record PostgreSQL would refuse, a bad record in a batch, a record written
//! twice, and the spend per key per day.
#![cfg(feature = "postgres")]

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::time::{Duration, Instant, SystemTime};

use deadpool_postgres::Pool;
use pg::PgServer;
use serde_json::{json, Value};
use tower_llm_policy::audit::{AuditRecord, LogSink};
use tower_llm_policy::postgres::{migrate, pool, spend_per_day, DaySpend, PostgresSink};

/// Every test is bounded: a flush that does not return in this long fails it.
const FLUSH_LIMIT: Duration = Duration::from_secs(60);

async fn migrated(server: &PgServer) -> Pool {
    let pool = pool(&server.url(), 4, Duration::from_secs(5)).unwrap();
    migrate(&pool).await.unwrap();
    pool
}

fn record(request_id: &str, timestamp: &str, key: Option<&str>, cost: Option<f64>) -> AuditRecord {
    serde_json::from_value(json!({
        "request_id": request_id,
        "timestamp": timestamp,
        "key": key,
        "key_metadata": {"team": "search"},
        "user": "user-1",
        "client_ip": "10.1.2.3",
        "method": "POST",
        "path": "/v1/chat/completions",
        "endpoint": "chat_completions",
        "model": "gpt-4o-2024-08-06",
        "canonical_model": "gpt-4o",
        "stream": false,
        "usage_injected": false,
        "status": 200,
        "outcome": "completed",
        "blocked_by": null,
        "code": null,
        "flags": [],
        "prompt_tokens": 12,
        "completion_tokens": 34,
        "total_tokens": 46,
        "cached_tokens": null,
        "reasoning_tokens": null,
        "cost_usd": cost,
        "latency_ms": 12.5,
        "ttft_ms": 3.0,
        "response_bytes": 512
    }))
    .unwrap()
}

fn now_record(i: usize) -> AuditRecord {
    let ts = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    record(&format!("req-{i}"), &ts, Some("team-a"), Some(0.001))
}

async fn rows(pool: &Pool) -> i64 {
    let client = pool.get().await.unwrap();
    client
        .query_one("SELECT count(*) FROM tlp_audit", &[])
        .await
        .unwrap()
        .get(0)
}

async fn flush(sink: &PostgresSink) {
    tokio::time::timeout(FLUSH_LIMIT, sink.flush())
        .await
        .expect("the flush returns in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_records_are_written_none_lost() {
    let server = PgServer::start();
    let pool = migrated(&server).await;
    let sink = PostgresSink::new(pool.clone());
    let records: Vec<AuditRecord> = (0..10_000).map(now_record).collect();
    let start = Instant::now();
    for r in &records {
        sink.record(r);
    }
    flush(&sink).await;
    let elapsed = start.elapsed();
    println!(
        "10,000 records in {elapsed:?}: {:.0} records/s",
        10_000.0 / elapsed.as_secs_f64()
    );
    assert_eq!(rows(&pool).await, 10_000);
    assert_eq!(
        sink.dropped() + sink.failed() + sink.skipped(),
        0,
        "{sink:?}"
    );
    assert_eq!(sink.written(), 10_000);
    assert_eq!(sink.queue_depth(), 0);
}

#[tokio::test]
async fn fields_land_in_their_columns_and_the_record_in_json() {
    let server = PgServer::start();
    let pool = migrated(&server).await;
    let sink = PostgresSink::new(pool.clone());
    let r = record(
        "req-fields",
        "2024-03-01T10:00:00.123Z",
        Some("team-a"),
        Some(0.25),
    );
    sink.record(&r);
    flush(&sink).await;
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT ts, request_id, key, model, endpoint, status, outcome, blocked_by, code, \
             prompt_tokens, completion_tokens, cost_usd, record = $1::text::jsonb \
             FROM tlp_audit",
            &[&serde_json::to_string(&r).unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, SystemTime>(0), r.timestamp);
    assert_eq!(row.get::<_, String>(1), "req-fields");
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("team-a"));
    // The canonical model: the name the record was priced by.
    assert_eq!(row.get::<_, Option<String>>(3).as_deref(), Some("gpt-4o"));
    assert_eq!(row.get::<_, String>(4), "chat_completions");
    assert_eq!(row.get::<_, Option<i32>>(5), Some(200));
    assert_eq!(row.get::<_, String>(6), "completed");
    assert_eq!(row.get::<_, Option<String>>(7), None);
    assert_eq!(row.get::<_, Option<String>>(8), None);
    assert_eq!(row.get::<_, Option<i64>>(9), Some(12));
    assert_eq!(row.get::<_, Option<i64>>(10), Some(34));
    assert_eq!(row.get::<_, Option<f64>>(11), Some(0.25));
    assert!(row.get::<_, bool>(12), "record is the record's JSON");
    assert_eq!(sink.written(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_loses_no_record_uncounted() {
    let mut server = PgServer::start();
    let pool = migrated(&server).await;
    let sink = PostgresSink::builder()
        .queue_capacity(2_000)
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .build(pool.clone());
    let mut sent = 0;
    for _ in 0..1_000 {
        sink.record(&now_record(sent));
        sent += 1;
    }
    flush(&sink).await;
    assert_eq!(rows(&pool).await, 1_000);

    // Records queued when the server goes, and more while it is away: more than the queue holds.
    for _ in 0..500 {
        sink.record(&now_record(sent));
        sent += 1;
    }
    tokio::task::block_in_place(|| server.stop());
    for _ in 0..3_000 {
        sink.record(&now_record(sent));
        sent += 1;
    }
    // The writer is retrying against a server that is not there.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.retries() == 0 {
        assert!(Instant::now() < deadline, "no retry: {sink:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(sink.dropped() > 0, "a full queue drops: {sink:?}");
    assert!(sink.queue_depth() > 0);
    tokio::task::block_in_place(|| server.restart());
    flush(&sink).await;

    let written = rows(&pool).await as u64;
    assert!(written > 1_000, "queued records written after the restart");
    assert_eq!(
        written + sink.dropped() + sink.failed(),
        sent as u64,
        "{sink:?}"
    );
    assert_eq!(written, sink.written() + sink.skipped());
    assert_eq!(sink.queue_depth(), 0);
}

#[tokio::test]
async fn a_nul_character_is_replaced_not_refused() {
    let server = PgServer::start();
    let pool = migrated(&server).await;
    let sink = PostgresSink::new(pool.clone());
    let mut odd = now_record(1);
    odd.key = Some("te\u{0}am".into());
    odd.user = Some("a\u{0}b".into());
    odd.key_metadata.insert("k\u{0}".into(), "v".into());
    sink.record(&now_record(0));
    sink.record(&odd);
    sink.record(&now_record(2));
    flush(&sink).await;
    assert_eq!((sink.written(), sink.failed()), (3, 0), "{sink:?}");
    let client = pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT key, record FROM tlp_audit WHERE request_id = 'req-1'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "te\u{FFFD}am");
    let json: Value = row.get(1);
    assert_eq!(json["user"], "a\u{FFFD}b");
    assert_eq!(json["key_metadata"]["k\u{FFFD}"], "v");
}

#[tokio::test]
async fn a_bad_record_fails_alone_and_its_batch_is_written() {
    let server = PgServer::start();
    let pool = migrated(&server).await;
    let sink = PostgresSink::builder()
        .batch_size(100)
        .flush_interval(Duration::from_secs(1))
        .build(pool.clone());
    for i in 0..10 {
        let mut r = now_record(i);
        if i == 4 {
            // Out of a bigint's range: PostgreSQL refuses it (22003).
            r.prompt_tokens = Some(u64::MAX);
        }
        sink.record(&r);
    }
    flush(&sink).await;
    assert_eq!((sink.written(), sink.failed()), (9, 1), "{sink:?}");
    assert_eq!(rows(&pool).await, 9);
    assert_eq!(sink.queue_depth(), 0);
}

#[tokio::test]
async fn a_record_written_again_adds_no_row() {
    let server = PgServer::start();
    let pool = migrated(&server).await;
    let sink = PostgresSink::new(pool.clone());
    let r = now_record(7);
    sink.record(&r);
    flush(&sink).await;
    // As a retried batch whose commit's reply was lost: the same records again.
    sink.record(&r);
    sink.record(&now_record(8));
    flush(&sink).await;
    assert_eq!(rows(&pool).await, 2);
    assert_eq!((sink.written(), sink.skipped()), (2, 1), "{sink:?}");
}

#[tokio::test]
async fn spend_per_day_sums_per_key_and_day() {
    let server = PgServer::start();
    let pool = migrated(&server).await;
    let sink = PostgresSink::new(pool.clone());
    let day1 = "2024-03-01T";
    let day2 = "2024-03-02T";
    let records = [
        record("a1", &format!("{day1}00:00:00.000Z"), Some("a"), Some(0.5)),
        record("a2", &format!("{day1}23:59:59.999Z"), Some("a"), Some(0.25)),
        // Refused: no cost, still a request.
        record("a3", &format!("{day2}08:00:00.000Z"), Some("a"), None),
        record("b1", &format!("{day1}12:00:00.000Z"), Some("b"), Some(1.0)),
        record("b2", &format!("{day2}12:00:00.000Z"), Some("b"), Some(2.0)),
        // Outside the range.
        record("b3", "2024-03-03T00:00:00.000Z", Some("b"), Some(4.0)),
    ];
    for r in &records {
        sink.record(r);
    }
    flush(&sink).await;
    let from = humantime::parse_rfc3339("2024-03-01T00:00:00Z").unwrap();
    let to = humantime::parse_rfc3339("2024-03-03T00:00:00Z").unwrap();
    let day = |key: &str, day: &str, cost_usd: f64, requests: i64| DaySpend {
        key: Some(key.into()),
        day: day.into(),
        cost_usd,
        requests,
        prompt_tokens: 12 * requests,
        completion_tokens: 34 * requests,
    };
    assert_eq!(
        spend_per_day(&pool, from, to, None).await.unwrap(),
        [
            day("a", "2024-03-01", 0.75, 2),
            day("b", "2024-03-01", 1.0, 1),
            day("a", "2024-03-02", 0.0, 1),
            day("b", "2024-03-02", 2.0, 1),
        ]
    );
    assert_eq!(
        spend_per_day(&pool, from, to, Some("b")).await.unwrap(),
        [
            day("b", "2024-03-01", 1.0, 1),
            day("b", "2024-03-02", 2.0, 1)
        ]
    );
    let json =
        serde_json::to_value(&spend_per_day(&pool, from, to, Some("b")).await.unwrap()[0]).unwrap();
    assert_eq!(json["day"], "2024-03-01");
    assert_eq!(json["requests"], 1);
}

#[tokio::test]
async fn debug_shows_no_connection_details() {
    let server = PgServer::start();
    let url = server.url().replace("tlp@", "tlp:hunter2@");
    let pool = pool(&url, 1, Duration::from_secs(5)).unwrap();
    let sink = PostgresSink::new(pool);
    let debug = format!("{sink:?}");
    assert!(
        !debug.contains("hunter2") && !debug.contains("127.0.0.1"),
        "{debug}"
    );
}
