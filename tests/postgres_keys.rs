//! PostgresKeyStore against a real PostgreSQL server (each test starts its own, see
//! `common/pg.rs`): the migrations, the admin API (create, get, update, disable, delete,
//! list), lookups through KeyAuth, `last_used_at`, a row that cannot be read failing closed,
//! and the change listener (two replicas, a restart).
#![cfg(feature = "postgres")]

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{answer, chat, post, with_key, Inner};
use http::StatusCode;
use pg::PgServer;
use serde_json::json;
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_policy::keys::{AdminError, KeyAdmin, PageRequest};
use tower_llm_policy::postgres::{migrate, pool, KeyChange, PostgresKeyStore, MIGRATIONS};
use tower_llm_policy::{ApiKey, KeyAuthLayer, KeyDigest, KeyStore};

async fn store(server: &PgServer) -> PostgresKeyStore {
    let pool = pool(&server.url(), 4, Duration::from_secs(5)).unwrap();
    migrate(&pool).await.unwrap();
    PostgresKeyStore::new(pool)
}

async fn status_with(store: Arc<dyn KeyStore>, secret: &str) -> StatusCode {
    let inner = Inner::default();
    let svc = ServiceBuilder::new()
        .layer(KeyAuthLayer::new(store))
        .map_request(|r: http::Request<String>| r.map(tower_llm_policy::PolicyBody::from))
        .service(inner.service());
    let req = with_key(post("/v1/chat/completions", chat("gpt-4o")), secret);
    answer(svc.oneshot(req).await.unwrap()).await.status
}

#[tokio::test]
async fn migrations_apply_once_even_from_two_replicas_at_once() {
    let server = PgServer::start();
    let a = pool(&server.url(), 2, Duration::from_secs(5)).unwrap();
    let b = pool(&server.url(), 2, Duration::from_secs(5)).unwrap();
    let (first, second) = tokio::join!(migrate(&a), migrate(&b));
    let mut applied = [first.unwrap(), second.unwrap()];
    applied.sort();
    let all: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(applied, [vec![], all]);
    assert!(migrate(&a).await.unwrap().is_empty());
    let client = a.get().await.unwrap();
    let rows = client
        .query("SELECT version FROM tlp_migrations ORDER BY version", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), MIGRATIONS.len());
}

#[tokio::test]
async fn the_admin_api_creates_reads_changes_and_deletes_keys() {
    let server = PgServer::start();
    let store = store(&server).await;
    let created = store
        .create(ApiKey::new("chat-app").model_limits(["gpt-4o"]).rpm(60))
        .await
        .unwrap();
    assert!(created.secret.starts_with("sk-tlp-"));
    assert!(!format!("{created:?}").contains(&created.secret));
    assert!(created.record.created_at.is_some());
    // Stored by digest only: the secret is nowhere in the table.
    let client = store.pool().get().await.unwrap();
    let row = client
        .query_one("SELECT digest, tlp_keys::text FROM tlp_keys", &[])
        .await
        .unwrap();
    let digest: Vec<u8> = row.get(0);
    assert_eq!(digest.as_slice(), KeyDigest::of(&created.secret).as_bytes());
    let whole: String = row.get(1);
    assert!(!whole.contains(&created.secret[7..]), "{whole}");

    // The key works, through KeyAuth.
    let shared: Arc<dyn KeyStore> = Arc::new(store.clone());
    assert_eq!(
        status_with(shared.clone(), &created.secret).await,
        StatusCode::OK
    );
    assert_eq!(
        status_with(shared.clone(), "sk-tlp-unknown").await,
        StatusCode::UNAUTHORIZED
    );

    // Read, change a field, see it.
    let record = store.get("chat-app").await.unwrap();
    assert_eq!(record.key.rpm, Some(60));
    assert_eq!(record.digest_prefix.len(), 8);
    let changed = store
        .update(
            "chat-app",
            &json!({"rpm": null, "model_limits": ["gpt-4o-mini"], "team": "a"}),
        )
        .await
        .unwrap();
    assert_eq!(changed.key.rpm, None);
    assert_eq!(changed.key.team.as_deref(), Some("a"));
    assert!(changed.updated_at >= record.updated_at);
    let found = store
        .lookup(&KeyDigest::of(&created.secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.model_limits.entries(), ["gpt-4o-mini"]);

    // Refused changes leave the key as it was.
    for bad in [
        json!({"name": "renamed"}),
        json!({"secret": "x"}),
        json!({"rpmm": 1}),
    ] {
        assert!(matches!(
            store.update("chat-app", &bad).await,
            Err(AdminError::Invalid(_))
        ));
    }
    assert!(matches!(
        store.update("nobody", &json!({"rpm": 1})).await,
        Err(AdminError::NotFound(_))
    ));
    assert!(matches!(
        store.create(ApiKey::new("chat-app")).await,
        Err(AdminError::Conflict(_))
    ));
    assert!(matches!(
        store.create(ApiKey::new("team:x")).await,
        Err(AdminError::Invalid(_))
    ));

    // Disabled: refused at once (no cache here).
    store.disable("chat-app").await.unwrap();
    assert_eq!(
        status_with(shared.clone(), &created.secret).await,
        StatusCode::UNAUTHORIZED
    );
    store
        .update("chat-app", &json!({"disabled": false}))
        .await
        .unwrap();
    assert_eq!(
        status_with(shared.clone(), &created.secret).await,
        StatusCode::OK
    );
    // Deleted: unknown.
    store.delete("chat-app").await.unwrap();
    assert!(matches!(
        store.delete("chat-app").await,
        Err(AdminError::NotFound(_))
    ));
    assert_eq!(
        status_with(shared, &created.secret).await,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn keys_are_listed_in_pages_in_name_order() {
    let server = PgServer::start();
    let store = store(&server).await;
    for i in (0..25).rev() {
        store
            .create(ApiKey::new(format!("key-{i:02}")))
            .await
            .unwrap();
    }
    let mut names = Vec::new();
    let mut page = PageRequest {
        after: None,
        limit: Some(10),
    };
    loop {
        let got = store.list(page.clone()).await.unwrap();
        assert!(got.keys.len() <= 10);
        names.extend(got.keys.iter().map(|r| r.key.name.clone()));
        match got.next {
            Some(next) => page.after = Some(next),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("key-{i:02}")).collect();
    assert_eq!(names, expected);
}

#[tokio::test]
async fn last_use_is_written_and_an_unreadable_row_fails_closed() {
    let server = PgServer::start();
    let store = store(&server).await;
    let created = store.create(ApiKey::new("k")).await.unwrap();
    assert!(created.record.last_used_at.is_none());
    let digest = KeyDigest::of(&created.secret);
    store.lookup(&digest).await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.get("k").await.unwrap().last_used_at.is_none() {
        assert!(Instant::now() < deadline, "last_used_at never written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A policy written by hand that is not a key: the lookup fails (503), never passes.
    let client = store.pool().get().await.unwrap();
    client
        .execute(
            "UPDATE tlp_keys SET policy = '{\"name\":\"k\",\"rpm\":\"lots\"}' WHERE name = 'k'",
            &[],
        )
        .await
        .unwrap();
    let err = store.lookup(&digest).await.unwrap_err().to_string();
    assert!(err.contains("`k`"), "{err}");
    let shared: Arc<dyn KeyStore> = Arc::new(store.clone());
    assert_eq!(
        status_with(shared, &created.secret).await,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn a_listener_hears_every_change_within_a_second_and_comes_back_after_a_restart() {
    let mut server = PgServer::start();
    let writer = store(&server).await;
    let replica = store(&server).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let listener = replica
        .listen(&server.url(), move |change| {
            let _ = tx.send(change);
        })
        .unwrap();
    // Connected: first a reset.
    let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap();
    assert_eq!(first, Some(KeyChange::All));
    assert!(listener.is_listening());

    let created = writer.create(ApiKey::new("k")).await.unwrap();
    let digest = KeyDigest::of(&created.secret);
    for change in [json!({"rpm": 5}), json!({"disabled": true})] {
        let started = Instant::now();
        writer.update("k", &change).await.unwrap();
        // The create's notification may come first.
        loop {
            let got = tokio::time::timeout(Duration::from_secs(1), rx.recv())
                .await
                .expect("notified within a second");
            if got == Some(KeyChange::Key(digest)) && started.elapsed() < Duration::from_secs(1) {
                break;
            }
        }
    }
    // `last_used_at` alone is no change.
    let client = writer.pool().get().await.unwrap();
    client
        .execute("UPDATE tlp_keys SET last_used_at = now()", &[])
        .await
        .unwrap();
    writer.delete("k").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(1), rx.recv())
        .await
        .unwrap();
    assert_eq!(
        got,
        Some(KeyChange::Key(digest)),
        "the delete, not the touch"
    );

    // The database restarts: the listener says so, reconnects, and hears changes again.
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut resets = 0;
    while resets < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(KeyChange::All)) => resets += 1,
            Ok(_) => {}
            Err(_) => panic!("no reset after the restart"),
        }
    }
    let again = writer.create(ApiKey::new("k2")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(2), rx.recv())
        .await
        .unwrap();
    assert_eq!(got, Some(KeyChange::Key(KeyDigest::of(&again.secret))));
    drop(listener);
}

#[tokio::test]
async fn a_cache_in_front_answers_hits_and_unknown_keys_without_the_database() {
    use tower_llm_policy::keys::CachedKeyStore;
    let server = PgServer::start();
    let store = store(&server).await;
    let cache = CachedKeyStore::new(store.clone())
        .ttl(Duration::from_secs(3600))
        .negative_ttl(Duration::from_millis(300));
    let created = store.create(ApiKey::new("cached")).await.unwrap();
    let digest = KeyDigest::of(&created.secret);
    // A miss goes to the database, the next lookups are hits.
    assert!(cache.lookup(&digest).await.unwrap().is_some());
    assert!(cache.lookup(&digest).await.unwrap().is_some());
    assert!(cache.lookup_now(&digest).is_some());
    let stats = cache.stats();
    assert_eq!((stats.misses, stats.hits), (1, 2));
    // The row removed behind the cache's back (no listener here): still served, from memory.
    let client = store.pool().get().await.unwrap();
    client.execute("DELETE FROM tlp_keys", &[]).await.unwrap();
    assert!(cache.lookup(&digest).await.unwrap().is_some());
    // Told of the change: the database's answer.
    cache.invalidate(&digest);
    assert!(cache.lookup(&digest).await.unwrap().is_none());
    // Unknown keys are remembered as unknown for the negative TTL: a key inserted meanwhile
    // is found once it ends.
    let unknown = KeyDigest::of("sk-tlp-not-yet");
    assert!(cache.lookup(&unknown).await.unwrap().is_none());
    client
        .execute(
            "INSERT INTO tlp_keys (name, digest, policy) VALUES ('late', $1, '{\"name\":\"late\"}')",
            &[&unknown.as_bytes().as_slice()],
        )
        .await
        .unwrap();
    assert!(cache.lookup(&unknown).await.unwrap().is_none());
    assert!(cache.stats().negative_hits >= 1);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let late = cache.lookup(&unknown).await.unwrap().unwrap();
    assert_eq!(late.name, "late");
}
