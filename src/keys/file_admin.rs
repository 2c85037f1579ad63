//! The admin API on a [`FileKeyStore`]: each change rewrites the file atomically.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use super::admin::{apply_patch, check_new_key, generate_secret, page_of};
use super::file::{parse_section, FileKeyStore, KeyFileError};
use super::{
    AdminError, ApiKey, BoxFuture, CreatedKey, KeyAdmin, KeyDigest, KeyPage, KeyRecord,
    PageRequest, StoreError,
};

/// The credential fields of a key's entry, kept as they are by a change.
const CREDENTIALS: [&str; 2] = ["secret", "secret_sha256"];

fn io_error(what: &str, e: std::io::Error) -> AdminError {
    AdminError::Store(StoreError::new(format!("key file: cannot {what}: {e}")))
}

/// A change to the file's keys.
enum Edit<'a> {
    /// Append this key with this digest (its `secret_sha256`).
    Create(&'a ApiKey, &'a KeyDigest),
    /// Replace the policy of the key named so by this one, keeping its credential.
    Update(&'a str, &'a ApiKey),
    /// Remove the key named so.
    Delete(&'a str),
}

/// The entries of a JSON file's `keys`.
fn json_keys(doc: &mut Value) -> Result<&mut Vec<Value>, AdminError> {
    let Value::Object(root) = doc else {
        return Err(AdminError::Invalid(
            "the key file is not a JSON object".into(),
        ));
    };
    root.entry("keys")
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .ok_or_else(|| AdminError::Invalid("the key file's `keys` is not an array".into()))
}

fn json_entry(key: &ApiKey) -> Result<serde_json::Map<String, Value>, AdminError> {
    match serde_json::to_value(key) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(AdminError::Invalid("the key cannot be written".into())),
    }
}

fn edit_json(text: &str, edit: &Edit<'_>) -> Result<String, AdminError> {
    let mut doc: Value = if text.trim().is_empty() {
        Value::Object(serde_json::Map::new())
    } else {
        serde_json::from_str(text)
            .map_err(|e| AdminError::Invalid(format!("the key file cannot be read: {e}")))?
    };
    let keys = json_keys(&mut doc)?;
    let position = |name: &str| {
        keys.iter()
            .position(|k| k.get("name").and_then(Value::as_str) == Some(name))
    };
    match edit {
        Edit::Create(key, digest) => {
            let mut entry = json_entry(key)?;
            entry.insert("secret_sha256".into(), Value::String(digest.to_hex()));
            keys.push(Value::Object(entry));
        }
        Edit::Update(name, key) => {
            let at = position(name).ok_or_else(|| AdminError::NotFound(name.to_string()))?;
            let mut entry = json_entry(key)?;
            if let Value::Object(old) = &keys[at] {
                for field in CREDENTIALS {
                    if let Some(value) = old.get(field) {
                        entry.insert(field.into(), value.clone());
                    }
                }
            }
            keys[at] = Value::Object(entry);
        }
        Edit::Delete(name) => {
            let at = position(name).ok_or_else(|| AdminError::NotFound(name.to_string()))?;
            keys.remove(at);
        }
    }
    let mut out = serde_json::to_string_pretty(&doc)
        .map_err(|e| AdminError::Invalid(format!("the key file cannot be written: {e}")))?;
    out.push('\n');
    Ok(out)
}

/// A key's entry as a TOML table (nested tables inline, as a key file writes them).
fn toml_entry(key: &ApiKey) -> Result<toml_edit::Table, AdminError> {
    let text = toml::to_string(key)
        .map_err(|e| AdminError::Invalid(format!("the key cannot be written: {e}")))?;
    let doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| AdminError::Invalid(format!("the key cannot be written: {e}")))?;
    let mut table = doc.as_table().clone();
    let nested: Vec<String> = table
        .iter()
        .filter(|(_, item)| item.is_table())
        .map(|(k, _)| k.to_owned())
        .collect();
    for field in nested {
        if let Some(item) = table.remove(&field) {
            if let Ok(inline) = item.into_table().map(toml_edit::Table::into_inline_table) {
                table.insert(&field, toml_edit::value(inline));
            }
        }
    }
    table.set_implicit(false);
    Ok(table)
}

fn edit_toml(text: &str, edit: &Edit<'_>) -> Result<String, AdminError> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| AdminError::Invalid(format!("the key file cannot be read: {e}")))?;
    match doc.get("keys") {
        None => {
            doc.insert(
                "keys",
                toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new()),
            );
        }
        // `keys = []`, or `keys = [{ name = "a", ... }]`: written as `[[keys]]` tables from
        // now on.
        Some(item) if item.is_array() => {
            let mut tables = toml_edit::ArrayOfTables::new();
            for value in item.as_array().expect("checked").iter() {
                let entry = value.as_inline_table().ok_or_else(|| {
                    AdminError::Invalid("the key file's `keys` holds something not a key".into())
                })?;
                tables.push(entry.clone().into_table());
            }
            doc.insert("keys", toml_edit::Item::ArrayOfTables(tables));
        }
        Some(_) => {}
    }
    let keys = doc["keys"].as_array_of_tables_mut().ok_or_else(|| {
        AdminError::Invalid("the key file's `keys` is not an array of tables ([[keys]])".into())
    })?;
    let position = |keys: &toml_edit::ArrayOfTables, name: &str| {
        keys.iter()
            .position(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
    };
    match edit {
        Edit::Create(key, digest) => {
            let mut entry = toml_entry(key)?;
            entry.insert("secret_sha256", toml_edit::value(digest.to_hex()));
            keys.push(entry);
        }
        Edit::Update(name, key) => {
            let at = position(keys, name).ok_or_else(|| AdminError::NotFound(name.to_string()))?;
            let mut entry = toml_entry(key)?;
            let old = keys.get(at).expect("found above");
            for field in CREDENTIALS {
                if let Some(item) = old.get(field) {
                    entry.insert(field, item.clone());
                }
            }
            *keys.get_mut(at).expect("found above") = entry;
        }
        Edit::Delete(name) => {
            let at = position(keys, name).ok_or_else(|| AdminError::NotFound(name.to_string()))?;
            keys.remove(at);
        }
    }
    let mut out = doc.to_string();
    if !out.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

/// Writes `text` to `path` atomically: a temporary file in the same directory, synced, then
/// renamed over it. Readers see the old file or the new one, never a part.
fn write_atomically(path: &Path, text: &str) -> Result<(), AdminError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keys".into());
    let temp_name = format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let temp = match dir {
        Some(dir) => dir.join(temp_name),
        None => Path::new(&temp_name).to_owned(),
    };
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        // Readable by the owner alone until it has the key file's own permissions: the file
        // may hold plaintext secrets and passwords.
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&temp).map_err(|e| io_error("write", e))?;
        // The key file's permissions are kept (it may hold plaintext secrets).
        if let Ok(meta) = std::fs::metadata(path) {
            let _ = file.set_permissions(meta.permissions());
        }
        file.write_all(text.as_bytes())
            .map_err(|e| io_error("write", e))?;
        file.sync_all().map_err(|e| io_error("write", e))?;
        std::fs::rename(&temp, path).map_err(|e| io_error("replace the file", e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    } else if let Some(dir) = dir {
        // The rename itself, durable (best effort: not every platform syncs directories).
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    result
}

/// A change asked of the file.
enum Op<'a> {
    Create(&'a ApiKey, &'a KeyDigest),
    Update(&'a str, &'a Value),
    Delete(&'a str),
}

impl FileKeyStore {
    /// Applies `op` to the file: under the admin lock, reads the file, finds the key in it
    /// (never in the keys loaded earlier, which another change may have made stale), edits
    /// the text (TOML keeps its comments and every other table), checks that the result loads
    /// as a key file would and fits the size limit, writes it atomically and puts its keys in
    /// force. Returns the key as it now is, with its digest (none for a delete).
    fn change(&self, op: Op<'_>) -> Result<Option<(KeyDigest, ApiKey)>, AdminError> {
        let _one = self.admin_lock();
        let text = std::fs::read_to_string(self.path()).map_err(|e| io_error("read", e))?;
        let json = self
            .path()
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let current = parse_section(self.path(), &text, json, self.section())
            .map_err(|e| AdminError::Invalid(format!("the key file does not load now: {e}")))?;
        let named = |name: &str| {
            current
                .iter()
                .find(|(_, k)| k.name == name)
                .map(|(d, k)| (*d, (**k).clone()))
        };
        let edit_text = |edit: &Edit<'_>| {
            if json {
                edit_json(&text, edit)
            } else {
                edit_toml(&text, edit)
            }
        };
        let (new, outcome) = match op {
            Op::Create(key, digest) => {
                if named(&key.name).is_some() {
                    return Err(AdminError::Conflict(key.name.clone()));
                }
                (
                    edit_text(&Edit::Create(key, digest))?,
                    Some((*digest, key.clone())),
                )
            }
            Op::Update(name, patch) => {
                let (digest, key) =
                    named(name).ok_or_else(|| AdminError::NotFound(name.to_owned()))?;
                let patched = apply_patch(&key, patch)?;
                (
                    edit_text(&Edit::Update(name, &patched))?,
                    Some((digest, patched)),
                )
            }
            Op::Delete(name) => {
                if named(name).is_none() {
                    return Err(AdminError::NotFound(name.to_owned()));
                }
                (edit_text(&Edit::Delete(name))?, None)
            }
        };
        if new.len() as u64 > self.max_size() {
            return Err(AdminError::Invalid(format!(
                "the key file would be {} bytes, over the store's limit of {}",
                new.len(),
                self.max_size()
            )));
        }
        // The new file must load: a change never leaves a file the store would refuse.
        let keys = parse_section(self.path(), &new, json, self.section())
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        self.validated(&keys).map_err(|e| match e {
            KeyFileError::Rejected { key, message, .. } => {
                AdminError::Invalid(format!("key `{key}`: {message}"))
            }
            e => AdminError::Invalid(e.to_string()),
        })?;
        write_atomically(self.path(), &new)?;
        // In force at once, whatever a reload running now does.
        self.install(keys);
        Ok(outcome)
    }
}

impl FileKeyStore {
    /// The key named `name` and its digest, as loaded.
    fn named(&self, name: &str) -> Option<(KeyDigest, std::sync::Arc<ApiKey>)> {
        self.snapshot()
            .iter()
            .find(|(_, k)| k.name == name)
            .map(|(d, k)| (*d, k.clone()))
    }
}

/// The admin API on a key file. Each change rewrites the file atomically (a temporary file
/// renamed over it); a TOML file keeps its comments and other tables, though the changed
/// key's entry is written anew. Created keys are written with their `secret_sha256` only. A
/// change that would leave a file the store refuses is refused. Changes from two processes
/// at once are not serialized: one store writes the file. Records carry no times.
impl KeyAdmin for FileKeyStore {
    fn create(&self, key: ApiKey) -> BoxFuture<'_, Result<CreatedKey, AdminError>> {
        Box::pin(async move {
            let key = check_new_key(key)?;
            let secret = generate_secret()?;
            let digest = KeyDigest::of(&secret);
            self.change(Op::Create(&key, &digest))?;
            Ok(CreatedKey {
                record: KeyRecord::new(key, &digest),
                secret,
            })
        })
    }

    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<KeyRecord, AdminError>> {
        Box::pin(async move {
            self.refresh();
            self.named(name)
                .map(|(digest, key)| KeyRecord::new((*key).clone(), &digest))
                .ok_or_else(|| AdminError::NotFound(name.to_owned()))
        })
    }

    fn update<'a>(
        &'a self,
        name: &'a str,
        patch: &'a Value,
    ) -> BoxFuture<'a, Result<KeyRecord, AdminError>> {
        Box::pin(async move {
            let (digest, key) = self
                .change(Op::Update(name, patch))?
                .expect("an update returns the key");
            Ok(KeyRecord::new(key, &digest))
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), AdminError>> {
        Box::pin(async move { self.change(Op::Delete(name)).map(drop) })
    }

    fn list(&self, page: PageRequest) -> BoxFuture<'_, Result<KeyPage, AdminError>> {
        Box::pin(async move {
            self.refresh();
            Ok(page_of(self.snapshot().iter(), &page))
        })
    }
}
