//! The admin API on a key file: each change is written atomically, keeps the file's comments,
//! other tables and each key's credential, is seen by the next lookup, and is refused when it
//! would leave a file the store refuses.
#![cfg(feature = "file-store")]

use serde_json::json;
use tower_llm_policy::keys::{AdminError, FileKeyStore, KeyAdmin, PageRequest};
use tower_llm_policy::{ApiKey, KeyDigest, KeyStore};

const CONFIG: &str = r#"# The proxy's configuration, keys included.
listen = "127.0.0.1:8080"

[upstream]
base_url = "http://127.0.0.1:9/v1" # a comment to keep

# The first key.
[[keys]]
name = "plain"
secret = "sk-plaintext-key-of-the-file"
rpm = 10
"#;

fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

#[tokio::test]
async fn a_toml_config_is_changed_in_place_keeping_its_comments_and_credentials() {
    let (dir, path) = temp_file("proxy.toml", CONFIG);
    let store = FileKeyStore::open_keys_of(&path).unwrap();

    let created = store
        .create(
            ApiKey::new("new-app")
                .model_limits(["gpt-4o-mini"])
                .label("team", "a"),
        )
        .await
        .unwrap();
    // Seen at once, by the digest of the secret handed out; the file holds the digest only.
    let found = store
        .lookup(&KeyDigest::of(&created.secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.name, "new-app");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(&created.secret), "{text}");
    assert!(text.contains(&KeyDigest::of(&created.secret).to_hex()));
    for kept in [
        "# The proxy's configuration",
        "# a comment to keep",
        "[upstream]",
        "# The first key.",
    ] {
        assert!(text.contains(kept), "{kept} lost:\n{text}");
    }

    // A change keeps the plaintext credential of a key that had one.
    store
        .update("plain", &json!({"rpm": 20, "model_limits": ["gpt-4o"]}))
        .await
        .unwrap();
    let plain = store
        .lookup(&KeyDigest::of("sk-plaintext-key-of-the-file"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(plain.rpm, Some(20));
    assert_eq!(plain.model_limits.entries(), ["gpt-4o"]);
    // Another store on the same file (a restart) loads the same keys.
    let again = FileKeyStore::open_keys_of(&path).unwrap();
    assert_eq!(again.len(), 2);

    // Refused: the file stays as it was.
    let before = std::fs::read_to_string(&path).unwrap();
    assert!(matches!(
        store.update("plain", &json!({"rpm": "x"})).await,
        Err(AdminError::Invalid(_))
    ));
    assert!(matches!(
        store.create(ApiKey::new("plain")).await,
        Err(AdminError::Conflict(_))
    ));
    assert!(matches!(
        store.delete("nobody").await,
        Err(AdminError::NotFound(_))
    ));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);

    // Disabled, then deleted.
    store.disable("new-app").await.unwrap();
    let off = store
        .lookup(&KeyDigest::of(&created.secret))
        .await
        .unwrap()
        .unwrap();
    assert!(off.disabled);
    store.delete("new-app").await.unwrap();
    assert!(store
        .lookup(&KeyDigest::of(&created.secret))
        .await
        .unwrap()
        .is_none());
    let page = store.list(PageRequest::default()).await.unwrap();
    assert_eq!(page.keys.len(), 1);
    assert_eq!(page.keys[0].key.name, "plain");
    // No temporary file left behind.
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1);
}

#[tokio::test]
async fn a_json_key_file_works_too() {
    let (_dir, path) = temp_file(
        "keys.json",
        r#"{"keys": [{"name": "a", "secret": "sk-json-key-a-long-enough"}]}"#,
    );
    let store = FileKeyStore::open(&path).unwrap();
    let created = store.create(ApiKey::new("b").tpm(1000)).await.unwrap();
    store.update("a", &json!({"max_n": 1})).await.unwrap();
    let reopened = FileKeyStore::open(&path).unwrap();
    let a = reopened
        .lookup(&KeyDigest::of("sk-json-key-a-long-enough"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.max_n, Some(1));
    let b = reopened
        .lookup(&KeyDigest::of(&created.secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.tpm, Some(1000));
}

#[tokio::test]
async fn many_changes_in_a_row_leave_a_file_that_loads() {
    let (_dir, path) = temp_file("keys.toml", "keys = []\n");
    let store = std::sync::Arc::new(FileKeyStore::open(&path).unwrap());
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.create(ApiKey::new(format!("k{i:02}"))).await.unwrap()
        }));
    }
    let mut secrets = Vec::new();
    for task in tasks {
        secrets.push(task.await.unwrap().secret);
    }
    let reopened = FileKeyStore::open(&path).unwrap();
    assert_eq!(reopened.len(), 20);
    for secret in &secrets {
        assert!(reopened
            .lookup(&KeyDigest::of(secret))
            .await
            .unwrap()
            .is_some());
    }
}
