//! `FileKeyStore` never fails open: a half-written, empty, invalid or oversize key file is a
//! refused reload (reported), and the keys in force, restrictions included, stay.
#![cfg(feature = "file-store")]

use std::io::Write;
use std::path::Path;

use tower_llm_policy::keys::{ApiKey, FileKeyStore, KeyDigest, KeyStore};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const RESTRICTED: &str = "[[keys]]
name = \"chat-app\"
secret = \"sk-chat-app-5e1f9a\"
model_limits_enabled = true
model_limits = [\"gpt-4o-mini\"]
";

/// Overwrites the file in place (truncate, then write), as a non-atomic writer does.
fn overwrite(path: &Path, text: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(text)?;
    f.sync_all()
}

fn key_file(
    dir: &tempfile::TempDir,
    name: &str,
    text: &str,
) -> std::io::Result<std::path::PathBuf> {
    let path = dir.path().join(name);
    std::fs::write(&path, text)?;
    Ok(path)
}

fn find(store: &FileKeyStore, secret: &str) -> Option<std::sync::Arc<ApiKey>> {
    store
        .lookup_now(&KeyDigest::of(secret))
        .expect("the file store answers at once")
        .expect("the file store never fails")
}

fn assert_still_restricted(store: &FileKeyStore) {
    let key = find(store, "sk-chat-app-5e1f9a").expect("the old key is still in force");
    assert!(key.model_limits_enabled, "the restriction was lost");
    assert_eq!(key.model_limits.entries(), ["gpt-4o-mini"]);
}

#[test]
fn a_file_cut_off_mid_key_keeps_the_old_keys_and_their_restrictions() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = key_file(&dir, "keys.toml", RESTRICTED)?;
    let store = FileKeyStore::open(&path)?.check_interval(std::time::Duration::ZERO);
    assert_still_restricted(&store);

    // Cut right after the secret: as it stands this parses, with the restriction cut away.
    let cut = RESTRICTED.find("\nmodel_limits_enabled").unwrap();
    overwrite(&path, &RESTRICTED.as_bytes()[..cut])?;
    assert!(!store.refresh(), "a cut-off file replaced the keys");
    assert_still_restricted(&store);
    assert_eq!(store.failed_reloads(), 1);
    let err = store.last_error().unwrap();
    assert!(err.contains("newline"), "{err}");
    assert!(!err.contains("sk-chat-app"), "secret leaked: {err}");

    // Cut in the middle of a value: a parse error, with its line and column.
    let cut = RESTRICTED.find("true").unwrap() + 2;
    overwrite(&path, &RESTRICTED.as_bytes()[..cut])?;
    assert!(!store.refresh());
    assert_still_restricted(&store);
    assert_eq!(store.failed_reloads(), 2);
    let err = store.last_error().unwrap();
    assert!(err.contains("line 4, column"), "{err}");
    assert!(!err.contains("sk-chat-app"), "secret leaked: {err}");

    // Cut in the middle of the secret.
    let cut = RESTRICTED.find("5e1f").unwrap();
    overwrite(&path, &RESTRICTED.as_bytes()[..cut])?;
    assert!(!store.refresh());
    assert_still_restricted(&store);
    assert_eq!(store.failed_reloads(), 3);
    assert!(find(&store, "sk-chat-app-").is_none());

    // The write completes: the new file is taken, and the error cleared.
    let edited = RESTRICTED.replace("gpt-4o-mini", "gpt-4o");
    overwrite(&path, edited.as_bytes())?;
    assert!(store.refresh());
    assert_eq!(
        find(&store, "sk-chat-app-5e1f9a")
            .unwrap()
            .model_limits
            .entries(),
        ["gpt-4o"]
    );
    assert_eq!(store.last_error(), None);
    assert_eq!(store.reloads(), 1);
    Ok(())
}

#[test]
fn a_truncated_json_file_keeps_the_old_keys() -> TestResult {
    let dir = tempfile::tempdir()?;
    let json = r#"{"keys": [{"name": "chat-app", "secret": "sk-chat-app-5e1f9a", "model_limits_enabled": true, "model_limits": ["gpt-4o-mini"]}]}"#;
    let path = key_file(&dir, "keys.json", json)?;
    let store = FileKeyStore::open(&path)?.check_interval(std::time::Duration::ZERO);
    let cut = json.find(", \"model_limits_enabled").unwrap();
    overwrite(&path, &json.as_bytes()[..cut])?;
    assert!(!store.refresh());
    assert_still_restricted(&store);
    assert_eq!(store.failed_reloads(), 1);
    let err = store.last_error().unwrap();
    assert!(err.contains("line 1"), "{err}");
    assert!(!err.contains("sk-chat-app"), "secret leaked: {err}");
    Ok(())
}

#[test]
fn an_empty_or_blank_file_keeps_the_old_keys_and_reports() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = key_file(&dir, "keys.toml", RESTRICTED)?;
    let store = FileKeyStore::open(&path)?.check_interval(std::time::Duration::ZERO);

    overwrite(&path, b"")?;
    assert!(!store.refresh(), "an empty file replaced the keys");
    assert_still_restricted(&store);
    assert_eq!(store.failed_reloads(), 1);
    let err = store.last_error().unwrap();
    assert!(err.contains("empty"), "{err}");

    overwrite(&path, b" \n\t\n")?;
    assert!(!store.refresh(), "a blank file replaced the keys");
    assert_still_restricted(&store);
    assert_eq!(store.failed_reloads(), 2);

    // Revoking every key on purpose is still possible.
    overwrite(&path, b"keys = []\n")?;
    assert!(store.refresh());
    assert!(store.is_empty());
    assert_eq!(store.last_error(), None);
    Ok(())
}

#[test]
fn an_oversize_file_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = key_file(&dir, "keys.toml", RESTRICTED)?;
    let store = FileKeyStore::open(&path)?
        .max_file_size(1024)
        .check_interval(std::time::Duration::ZERO);

    // A valid file, padded with comments past the limit.
    let padded = format!(
        "{}{}",
        "# padding\n".repeat(200),
        RESTRICTED.replace("gpt-4o-mini", "gpt-4o")
    );
    overwrite(&path, padded.as_bytes())?;
    assert!(!store.refresh(), "an oversize file replaced the keys");
    assert_still_restricted(&store);
    assert_eq!(store.failed_reloads(), 1);
    let err = store.last_error().unwrap();
    assert!(err.contains("too large") && err.contains("1024"), "{err}");

    // At start-up the documented default applies: 16 MiB.
    assert_eq!(FileKeyStore::DEFAULT_MAX_FILE_SIZE, 16 * 1024 * 1024);
    let big = dir.path().join("big.toml");
    std::fs::File::create(&big)?.set_len(FileKeyStore::DEFAULT_MAX_FILE_SIZE + 1)?;
    let err = FileKeyStore::open(&big).unwrap_err().to_string();
    assert!(err.contains("too large"), "{err}");
    Ok(())
}

#[test]
fn an_invalid_edit_keeps_the_old_keys_until_the_file_changes_again() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = key_file(&dir, "keys.toml", RESTRICTED)?;
    let store = FileKeyStore::open(&path)?.check_interval(std::time::Duration::ZERO);
    overwrite(
        &path,
        RESTRICTED
            .replace("model_limits =", "model_limitz =")
            .as_bytes(),
    )?;
    assert!(!store.refresh());
    assert_still_restricted(&store);
    assert_eq!(store.failed_reloads(), 1);
    // The same bad file is not parsed (nor counted) again.
    assert!(!store.refresh());
    assert_eq!(store.failed_reloads(), 1);
    let err = store.last_error().unwrap();
    assert!(
        err.contains("model_limitz") && err.contains("line 5"),
        "{err}"
    );
    Ok(())
}

/// The host's check: every guard a key lists must be one it configured.
fn known_guards(key: &ApiKey) -> Result<(), String> {
    match key
        .guards
        .iter()
        .find(|g| !["pii", "injection"].contains(&g.as_str()))
    {
        Some(g) => Err(format!("no guard is named `{g}`")),
        None => Ok(()),
    }
}

const GUARDED: &str = "[[keys]]
name = \"chat-app\"
secret = \"sk-chat-app-5e1f9a\"
model_limits_enabled = true
model_limits = [\"gpt-4o-mini\"]
guards = [\"pii\"]
";

#[test]
fn a_key_failing_the_hosts_check_is_refused_at_open_and_at_reload() -> TestResult {
    let dir = tempfile::tempdir()?;
    // At open: the error names the key and the reason, never the secret.
    let bad = key_file(
        &dir,
        "bad.toml",
        &GUARDED.replace("\"pii\"", "\"pii\", \"typo\""),
    )?;
    let err = FileKeyStore::open(&bad)?
        .validate_keys(known_guards)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`chat-app`") && err.contains("`typo`"),
        "{err}"
    );
    assert!(!err.contains("sk-chat-app"), "{err}");

    // At reload: refused like an invalid file, the keys in force stay.
    let path = key_file(&dir, "keys.toml", GUARDED)?;
    let store = FileKeyStore::open(&path)?
        .check_interval(std::time::Duration::ZERO)
        .validate_keys(known_guards)?;
    assert_still_restricted(&store);
    overwrite(
        &path,
        GUARDED
            .replace("gpt-4o-mini", "gpt-4o")
            .replace("\"pii\"", "\"injection\", \"typo\"")
            .as_bytes(),
    )?;
    assert!(!store.refresh());
    assert_still_restricted(&store);
    let key = find(&store, "sk-chat-app-5e1f9a").unwrap();
    assert_eq!(key.guards, ["pii"]);
    assert_eq!(store.failed_reloads(), 1);
    let err = store.last_error().unwrap();
    assert!(err.contains("`typo`"), "{err}");

    // A fixed file loads.
    overwrite(
        &path,
        GUARDED.replace("\"pii\"", "\"injection\"").as_bytes(),
    )?;
    assert!(store.refresh());
    assert_eq!(
        find(&store, "sk-chat-app-5e1f9a").unwrap().guards,
        ["injection"]
    );
    assert_eq!(store.last_error(), None);
    Ok(())
}

#[tokio::test]
async fn an_admin_change_failing_the_hosts_check_is_refused_and_not_written() -> TestResult {
    use tower_llm_policy::keys::{AdminError, KeyAdmin};
    let dir = tempfile::tempdir()?;
    let path = key_file(&dir, "keys.toml", GUARDED)?;
    let store = FileKeyStore::open(&path)?.validate_keys(known_guards)?;
    let before = std::fs::read_to_string(&path)?;
    let err = store
        .update("chat-app", &serde_json::json!({"guards": ["typo"]}))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AdminError::Invalid(m) if m.contains("`typo`")),
        "{err:?}"
    );
    let mut new = ApiKey::new("other");
    new.guards = vec!["nope".into()];
    assert!(matches!(
        store.create(new).await,
        Err(AdminError::Invalid(_))
    ));
    assert_eq!(std::fs::read_to_string(&path)?, before);
    // A valid change goes through.
    store
        .update("chat-app", &serde_json::json!({"guards": ["injection"]}))
        .await?;
    assert_eq!(
        find(&store, "sk-chat-app-5e1f9a").unwrap().guards,
        ["injection"]
    );
    Ok(())
}
