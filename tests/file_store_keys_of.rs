//! `FileKeyStore::open_keys_of`: the keys of a larger configuration file, reloaded on edit.
#![cfg(feature = "file-store")]

use std::io::Write;

use tower_llm_policy::keys::{FileKeyStore, KeyDigest, KeyStore};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const CONFIG: &str = r#"listen = "127.0.0.1:8080"

[upstream]
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"

[audit]
jsonl = "audit.jsonl"

[[keys]]
name = "chat-app"
secret = "sk-chat-app"
model_limits_enabled = true
model_limits = ["gpt-4o-mini"]
"#;

fn write(file: &mut tempfile::NamedTempFile, text: &str) -> std::io::Result<()> {
    let f = file.as_file_mut();
    f.set_len(0)?;
    std::io::Seek::rewind(f)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

fn config_file(text: &str) -> std::io::Result<tempfile::NamedTempFile> {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile()?;
    write(&mut file, text)?;
    Ok(file)
}

async fn name_of(store: &FileKeyStore, secret: &str) -> Option<String> {
    store
        .lookup(&KeyDigest::of(secret))
        .await
        .expect("the file store always answers")
        .map(|key| key.name.clone())
}

#[tokio::test]
async fn keys_of_a_config_file_are_read_and_other_tables_ignored() -> TestResult {
    let file = config_file(CONFIG)?;
    let store = FileKeyStore::open_keys_of(file.path())?.check_interval(std::time::Duration::ZERO);
    assert_eq!(store.len(), 1);
    assert_eq!(
        name_of(&store, "sk-chat-app").await.as_deref(),
        Some("chat-app")
    );
    Ok(())
}

#[test]
fn a_plain_key_file_store_still_refuses_other_tables() -> TestResult {
    let file = config_file(CONFIG)?;
    let err = FileKeyStore::open(file.path()).unwrap_err().to_string();
    assert!(err.contains("unknown field `listen`"), "{err}");
    Ok(())
}

#[test]
fn unknown_fields_inside_keys_are_still_errors_with_their_line() -> TestResult {
    let text = CONFIG.replace("model_limits_enabled", "model_limit_enabled");
    let file = config_file(&text)?;
    let err = FileKeyStore::open_keys_of(file.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("model_limit_enabled"), "{err}");
    assert!(err.contains("line 13"), "{err}");
    Ok(())
}

#[test]
fn a_config_without_keys_has_none() -> TestResult {
    let file = config_file("listen = \"127.0.0.1:8080\"\n[upstream]\nbase_url = \"x\"\n")?;
    let store = FileKeyStore::open_keys_of(file.path())?.check_interval(std::time::Duration::ZERO);
    assert!(store.is_empty());
    Ok(())
}

#[tokio::test]
async fn edits_to_the_keys_are_picked_up_on_the_next_lookup() -> TestResult {
    let mut file = config_file(CONFIG)?;
    let store = FileKeyStore::open_keys_of(file.path())?.check_interval(std::time::Duration::ZERO);
    assert_eq!(name_of(&store, "sk-batch").await, None);

    let edited = format!("{CONFIG}\n[[keys]]\nname = \"batch\"\nsecret = \"sk-batch\"\n");
    write(&mut file, &edited)?;
    assert_eq!(name_of(&store, "sk-batch").await.as_deref(), Some("batch"));
    assert_eq!(store.reloads(), 1);

    // An edit elsewhere in the file that breaks only what the store ignores is no error.
    write(
        &mut file,
        &edited.replace("[audit]", "[audit]\nsomething_new = 1"),
    )?;
    assert_eq!(name_of(&store, "sk-batch").await.as_deref(), Some("batch"));
    assert_eq!(store.failed_reloads(), 0);

    // A bad key keeps the keys in force.
    write(
        &mut file,
        &edited.replace("name = \"batch\"", "nme = \"batch\""),
    )?;
    assert_eq!(
        name_of(&store, "sk-chat-app").await.as_deref(),
        Some("chat-app")
    );
    assert_eq!(store.failed_reloads(), 1);
    assert!(store.last_error().unwrap().contains("nme"));
    Ok(())
}

#[tokio::test]
async fn json_configs_work_the_same() -> TestResult {
    let mut file = tempfile::Builder::new().suffix(".json").tempfile()?;
    write(
        &mut file,
        r#"{"listen":"127.0.0.1:8080","upstream":{"base_url":"x"},
            "keys":[{"name":"chat-app","secret":"sk-chat-app"}]}"#,
    )?;
    let store = FileKeyStore::open_keys_of(file.path())?.check_interval(std::time::Duration::ZERO);
    assert_eq!(
        name_of(&store, "sk-chat-app").await.as_deref(),
        Some("chat-app")
    );
    Ok(())
}

#[test]
fn the_file_is_checked_at_most_once_per_interval() -> Result<(), Box<dyn std::error::Error>> {
    assert_eq!(
        FileKeyStore::DEFAULT_CHECK_INTERVAL,
        std::time::Duration::from_secs(1)
    );
    let mut file = tempfile::NamedTempFile::new()?;
    write!(
        file,
        "[[keys]]\nname = \"first\"\nsecret = \"sk-first-key-0123\"\n"
    )?;
    file.flush()?;
    let store =
        FileKeyStore::open(file.path())?.check_interval(std::time::Duration::from_secs(3600));
    let first = KeyDigest::of("sk-first-key-0123");
    // The first lookup checks the file; an edit right after waits for the next check.
    assert!(store.lookup_now(&first).unwrap()?.is_some());
    std::fs::write(
        file.path(),
        "[[keys]]\nname = \"second\"\nsecret = \"sk-second-key-0123\"\n",
    )?;
    assert!(store.lookup_now(&first).unwrap()?.is_some());
    assert!(store
        .lookup_now(&KeyDigest::of("sk-second-key-0123"))
        .unwrap()?
        .is_none());
    // An explicit check sees it at once.
    assert!(store.refresh());
    assert!(store.lookup_now(&first).unwrap()?.is_none());
    Ok(())
}
