//! Hostile tests of the admin API over a key file (`FileKeyStore` as `KeyAdmin`): each attack
//! here once worked (a hostile review found it); each test asserts it no longer does.
#![cfg(feature = "file-store")]

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tower_llm_policy::keys::AdminError;
use tower_llm_policy::keys::{FileKeyStore, KeyAdmin};
use tower_llm_policy::{ApiKey, KeyDigest, KeyStore};

const VICTIM_SECRET: &str = "sk-victim-secret-0000000000";

fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn keys_file() -> String {
    format!("[[keys]]\nname = \"victim\"\nsecret = \"{VICTIM_SECRET}\"\nrpm = 10\n")
}

/// What the file on disk says (a fresh store, as a restart or another replica would read it).
fn on_disk(path: &std::path::Path, secret: &str) -> Option<Arc<ApiKey>> {
    let fresh = FileKeyStore::open(path).unwrap();
    futures_lookup(&fresh, secret)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn futures_lookup(store: &FileKeyStore, secret: &str) -> Option<Arc<ApiKey>> {
    match store.lookup_now(&KeyDigest::of(secret)) {
        Some(Ok(found)) => found,
        other => panic!("lookup_now: {other:?}"),
    }
}

/// Two PATCHes of one key at the same time (an operator disabling a leaked key while an
/// automation adjusts its rate limit): `update` reads the key from the loaded snapshot
/// *outside* the admin lock, then `change` writes that stale copy over the file. The
/// disable is lost, both requests answered success, and the leaked key keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_patches_never_lose_a_disable() {
    let (_dir, path) = temp_file("keys.toml", &keys_file());
    let store = Arc::new(FileKeyStore::open(&path).unwrap());
    let mut lost = 0;
    let mut lost_rpm = 0;
    let rounds = 200;
    let t0 = std::time::Instant::now();
    store.update("victim", &json!({"rpm": 10})).await.unwrap();
    // How long one change takes here (the fsync dominates).
    let one = t0.elapsed().as_micros() as u64;
    for i in 0..rounds {
        store
            .update("victim", &json!({"disabled": false}))
            .await
            .unwrap();
        // Two admin requests on two threads (two connections to the proxy).
        let barrier = Arc::new(std::sync::Barrier::new(2));
        let (a, b) = (store.clone(), store.clone());
        let (ba, bb) = (barrier.clone(), barrier.clone());
        let disable = std::thread::spawn(move || {
            ba.wait();
            block_on(a.update("victim", &json!({"disabled": true})))
        });
        let adjust = std::thread::spawn(move || {
            bb.wait();
            // Arrives while the disable is being written.
            std::thread::sleep(Duration::from_micros(one * (i % 20) / 20));
            block_on(b.update("victim", &json!({"rpm": 100 + i})))
        });
        let disabled = disable
            .join()
            .unwrap()
            .expect("the disable answered success");
        assert!(
            disabled.key.disabled,
            "the disable's own answer shows it disabled"
        );
        adjust
            .join()
            .unwrap()
            .expect("the rpm change answered success");
        // The truth on disk, as every later reload / restart sees it.
        let key = on_disk(&path, VICTIM_SECRET).unwrap();
        if !key.disabled {
            lost += 1;
        }
        if key.rpm != Some(100 + i) {
            lost_rpm += 1;
        }
    }
    assert_eq!(
        (lost, lost_rpm),
        (0, 0),
        "of {rounds} rounds, {lost} disables and {lost_rpm} rpm changes answered success but \
         are not in the file (a lost update)"
    );
}

/// Sequential changes: after `update` answers, the store's snapshot must be the new file.
/// `refresh()` gives up when another caller holds the reload lock (every lookup takes it
/// with `check_interval(0)`), so the admin's next PATCH is computed from the stale snapshot
/// and silently reverts the previous one (here: a disable).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_patch_under_lookup_traffic_never_reverts_a_disable() {
    let (_dir, path) = temp_file("keys.toml", &keys_file());
    let store = Arc::new(
        FileKeyStore::open(&path)
            .unwrap()
            .check_interval(Duration::ZERO),
    );
    // Client traffic: lookups of the key, as KeyAuth makes them.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut traffic = Vec::new();
    for _ in 0..3 {
        let (s, stop) = (store.clone(), stop.clone());
        traffic.push(std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = s.lookup_now(&KeyDigest::of(VICTIM_SECRET));
            }
        }));
    }
    let mut lost = 0;
    let rounds = 60;
    for i in 0..rounds {
        store
            .update("victim", &json!({"disabled": false}))
            .await
            .unwrap();
        let r = store
            .update("victim", &json!({"disabled": true}))
            .await
            .unwrap();
        assert!(r.key.disabled);
        // Strictly after the disable answered.
        store
            .update("victim", &json!({"rpm": 100 + i}))
            .await
            .unwrap();
        if !on_disk(&path, VICTIM_SECRET).unwrap().disabled {
            lost += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in traffic {
        t.join().unwrap();
    }
    assert_eq!(
        lost, 0,
        "{lost} of {rounds} sequential disables were reverted by the next PATCH"
    );
}

/// Sequential changes without any other traffic: a change whose file has the same length,
/// the same (coarse) mtime and a recycled inode is not seen by `refresh()` (the stamp is
/// unchanged), so the next PATCH starts from the stale snapshot.
#[tokio::test]
async fn sequential_patches_of_the_same_length_are_in_force_at_once() {
    let (_dir, path) = temp_file("keys.toml", &keys_file());
    let store = FileKeyStore::open(&path).unwrap();
    let mut stale = 0;
    let rounds = 300;
    for i in 0..rounds {
        // rpm 10..99: every file has the same length.
        let rpm = 10 + (i % 90);
        store.update("victim", &json!({"rpm": rpm})).await.unwrap();
        let served = futures_lookup(&store, VICTIM_SECRET).unwrap();
        if served.rpm != Some(rpm) {
            stale += 1;
        }
    }
    assert_eq!(
        stale, 0,
        "{stale} of {rounds} answered changes were not in force after the answer"
    );
}

/// A change that would grow the file past the store's size limit is refused (the store
/// would refuse to load that file, and the change would never take effect); the file and
/// the keys in force stay as they were, and later changes still work.
#[tokio::test]
async fn a_change_past_the_size_limit_is_refused_and_the_next_one_works() {
    let (_dir, path) = temp_file("keys.toml", &keys_file());
    let store = FileKeyStore::open(&path).unwrap().max_file_size(4096);
    let before = std::fs::read_to_string(&path).unwrap();
    let big = store
        .create(ApiKey::new("big").label("notes", "x".repeat(5000)))
        .await;
    assert!(matches!(big, Err(AdminError::Invalid(_))), "{big:?}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    store.delete("victim").await.unwrap();
    assert!(
        futures_lookup(&store, VICTIM_SECRET).is_none(),
        "the deleted key is gone"
    );
}

/// The proxy refuses a key named `team:<x>` at start (it would share team x's spend
/// account), and so does the admin API; but the live reload of the same file accepts it.
#[tokio::test]
async fn a_reload_refuses_a_key_named_like_a_team_account() {
    let (_dir, path) = temp_file("keys.toml", &keys_file());
    let store = FileKeyStore::open(&path)
        .unwrap()
        .check_interval(Duration::ZERO);
    let tmp = path.with_extension("new");
    std::fs::write(
        &tmp,
        format!(
            "{}\n[[keys]]\nname = \"team:research\"\nsecret = \"sk-team-collide-000000\"\n",
            keys_file()
        ),
    )
    .unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let found = futures_lookup(&store, "sk-team-collide-000000");
    assert!(
        found.is_none(),
        "the reload accepted a key named `{}`: it spends from team research's account",
        found.unwrap().name
    );
}

/// A JSON key file whose `expires_at` is Unix seconds past `SystemTime`'s range (valid JSON,
/// a u64) panics inside `refresh()` while it holds the reload mutex. KeyAuth catches the
/// panic, but the mutex stays poisoned and `refresh()` / `maybe_refresh()` read a poisoned
/// `try_lock` as "someone else is reloading": the store never reloads again. Fixing the file
/// and revoking a key afterwards is silently ignored until a restart.
#[tokio::test]
async fn a_json_file_with_an_impossible_expiry_never_freezes_the_store() {
    let (_dir, path) = temp_file(
        "keys.json",
        &format!(r#"{{"keys": [{{"name": "victim", "secret": "{VICTIM_SECRET}"}}]}}"#),
    );
    let store = Arc::new(
        FileKeyStore::open(&path)
            .unwrap()
            .check_interval(Duration::ZERO),
    );
    assert!(futures_lookup(&store, VICTIM_SECRET).is_some());
    let replace = |text: String| {
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    // A bad edit (a typo'd timestamp, or written by a tool that emits u64 seconds).
    replace(format!(
        r#"{{"keys": [{{"name": "victim", "secret": "{VICTIM_SECRET}", "expires_at": 18446744073709551615}}]}}"#
    ));
    let s = store.clone();
    let panicked = std::thread::spawn(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.lookup_now(&KeyDigest::of(VICTIM_SECRET))
        }))
        .is_err()
    })
    .join()
    .unwrap();
    // The operator fixes the file and revokes the leaked key.
    std::thread::sleep(Duration::from_millis(20));
    replace(r#"{"keys": []}"#.to_owned());
    let still = futures_lookup(&store, VICTIM_SECRET);
    assert!(
        still.is_none(),
        "the reload panicked ({panicked}); after the file was fixed and the key revoked, the \
         store still serves `{}` (reloads: {}, failed: {}, last_error: {:?})",
        still.as_ref().unwrap().name,
        store.reloads(),
        store.failed_reloads(),
        store.last_error()
    );
}

/// Held: names and metadata built to break out of their TOML string or table (quotes,
/// `]]`, newlines in metadata, `'''`, a fake `[[keys]]` with a secret) round-trip as data;
/// the file still loads with exactly the keys created, and no injected key authenticates.
#[tokio::test]
async fn names_and_metadata_cannot_inject_toml() {
    let (_dir, path) = temp_file(
        "proxy.toml",
        &format!("listen = \"127.0.0.1:1\"\n\n{}", keys_file()),
    );
    let store = FileKeyStore::open_keys_of(&path).unwrap();
    let evil = [
        "a\"\n[[keys]]\nname = \"inj\"\nsecret = \"sk-injected-0000000\"\n#",
        "b\"]]\n[[keys]]",
        "c'''\n[[keys]]\nname='inj2'\nsecret='sk-injected-0000001'\n'''",
        "d\\\"\\u0022",
        "e = 1 # \u{2028}\u{feff}",
        "[[keys]]",
    ];
    let mut made = 0;
    for (i, text) in evil.iter().enumerate() {
        let name = format!("n{i}-{}", text.replace(['\n'], " "));
        let key = ApiKey::new(name.clone())
            .label(*text, *text)
            .label("v", format!("x\n{text}"));
        if store.create(key).await.is_ok() {
            made += 1;
        }
    }
    let fresh = FileKeyStore::open_keys_of(&path).unwrap();
    assert_eq!(fresh.len(), 1 + made);
    for secret in ["sk-injected-0000000", "sk-injected-0000001"] {
        assert!(futures_lookup(&fresh, secret).is_none());
    }
}
