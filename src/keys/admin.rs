//! Managing keys at run time: the [`KeyAdmin`] trait (create, read, update, disable, delete,
//! list), implemented by the stores that can write.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use super::{ApiKey, BoxFuture, KeyDigest, StoreError};

/// Longest page [`KeyAdmin::list`] returns.
pub const MAX_PAGE: usize = 1000;

/// A key as the admin API shows it: its policy, its times, and the first bytes of its digest
/// (enough to tell keys apart; never the key, which is not stored).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeyRecord {
    /// The key's policy (its `name` is its id).
    #[serde(flatten)]
    pub key: ApiKey,
    /// The first 4 bytes of the key's SHA-256 digest, in hexadecimal.
    pub digest_prefix: String,
    /// When the key was created, when the store knows.
    #[serde(serialize_with = "time", skip_serializing_if = "Option::is_none")]
    pub created_at: Option<SystemTime>,
    /// When its policy last changed, when the store knows.
    #[serde(serialize_with = "time", skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<SystemTime>,
    /// When it was last used (to the minute), when the store knows.
    #[serde(serialize_with = "time", skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<SystemTime>,
}

fn time<S: Serializer>(at: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    // RFC 3339 ends with the year 9999 (a database may hold later times).
    let latest = super::expiry::latest();
    match at {
        Some(at) => {
            s.serialize_str(&humantime::format_rfc3339_millis((*at).min(latest)).to_string())
        }
        None => s.serialize_none(),
    }
}

impl KeyRecord {
    /// A record of `key` with the digest `digest` and no times.
    pub fn new(key: ApiKey, digest: &KeyDigest) -> Self {
        KeyRecord {
            key,
            digest_prefix: digest_prefix(digest),
            created_at: None,
            updated_at: None,
            last_used_at: None,
        }
    }
}

/// The first 4 bytes of a digest, in hexadecimal.
pub(crate) fn digest_prefix(digest: &KeyDigest) -> String {
    digest.as_bytes()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A key just created: its record, and the key itself, which is shown this once (only its
/// digest is stored). `Debug` does not show the key.
#[derive(Clone, Serialize)]
pub struct CreatedKey {
    /// The new key's record.
    #[serde(flatten)]
    pub record: KeyRecord,
    /// The key to hand to its user (`sk-tlp-` and 43 random characters).
    pub secret: String,
}

impl fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedKey")
            .field("record", &self.record)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Which page of keys to list: the keys whose names sort after `after` (none: from the
/// first), at most `limit` of them (at most [`MAX_PAGE`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct PageRequest {
    /// The last name of the previous page.
    #[serde(default)]
    pub after: Option<String>,
    /// How many keys at most (default 100).
    #[serde(default)]
    pub limit: Option<usize>,
}

impl PageRequest {
    /// The number of keys to return: `limit`, 100 by default, at most [`MAX_PAGE`], at least 1.
    pub fn size(&self) -> usize {
        self.limit.unwrap_or(100).clamp(1, MAX_PAGE)
    }
}

/// A page of keys, in name order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct KeyPage {
    /// The keys.
    pub keys: Vec<KeyRecord>,
    /// The `after` of the next page; `None` on the last page.
    pub next: Option<String>,
}

/// The page `page` asks for of `keys` (in any order): sorted by name, those after `after`,
/// at most [`PageRequest::size`], and where the next page starts.
pub(crate) fn page_of<'a>(
    keys: impl Iterator<Item = (&'a KeyDigest, &'a std::sync::Arc<ApiKey>)>,
    page: &PageRequest,
) -> KeyPage {
    let mut all: Vec<_> = keys
        .filter(|(_, k)| {
            page.after
                .as_deref()
                .is_none_or(|after| k.name.as_str() > after)
        })
        .collect();
    all.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    let size = page.size();
    let more = all.len() > size;
    let keys: Vec<KeyRecord> = all
        .into_iter()
        .take(size)
        .map(|(d, k)| KeyRecord::new((**k).clone(), d))
        .collect();
    let next = more
        .then(|| keys.last().map(|r| r.key.name.clone()))
        .flatten();
    KeyPage { keys, next }
}

/// Why an admin operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// No key has this name.
    #[error("no key named `{0}`")]
    NotFound(String),
    /// A key with this name exists already.
    #[error("a key named `{0}` exists already")]
    Conflict(String),
    /// The key or the change is not valid (an unknown field, a wrong type, a renaming).
    #[error("{0}")]
    Invalid(String),
    /// This store cannot write (a read-only store).
    #[error("this key store cannot be changed at run time")]
    ReadOnly,
    /// The store could not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Manages the keys of a store at run time. Object safe: hold it as `Arc<dyn KeyAdmin>`.
///
/// Keys are named: the name is a key's id in every operation, and cannot change. The key
/// itself is generated by [`create`](Self::create) and returned once; a store keeps only its
/// digest. A change is seen by the store's next lookup (a cache in front of it is told by the
/// store's own notifications, see the store's docs).
pub trait KeyAdmin: Send + Sync + 'static {
    /// Creates a key with the policy `key` (its `name` must be new; a credential it carries
    /// is ignored) and a fresh random secret.
    fn create(&self, key: ApiKey) -> BoxFuture<'_, Result<CreatedKey, AdminError>>;

    /// The key named `name`.
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<KeyRecord, AdminError>>;

    /// Changes the policy of the key named `name` by a JSON merge patch (RFC 7396) over its
    /// fields, as [`apply_patch`] does: `{"model_limits": ["gpt-4o"], "rpm": null}` sets the
    /// models and removes the rate limit.
    fn update<'a>(
        &'a self,
        name: &'a str,
        patch: &'a Value,
    ) -> BoxFuture<'a, Result<KeyRecord, AdminError>>;

    /// Deletes the key named `name`.
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), AdminError>>;

    /// A page of keys, in name order.
    fn list(&self, page: PageRequest) -> BoxFuture<'_, Result<KeyPage, AdminError>>;

    /// Disables the key named `name` (it is refused as unknown from the store's next lookup).
    fn disable<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<KeyRecord, AdminError>> {
        Box::pin(async move {
            let patch = serde_json::json!({ "disabled": true });
            self.update(name, &patch).await
        })
    }
}

impl<T: KeyAdmin + ?Sized> KeyAdmin for std::sync::Arc<T> {
    fn create(&self, key: ApiKey) -> BoxFuture<'_, Result<CreatedKey, AdminError>> {
        (**self).create(key)
    }
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<KeyRecord, AdminError>> {
        (**self).get(name)
    }
    fn update<'a>(
        &'a self,
        name: &'a str,
        patch: &'a Value,
    ) -> BoxFuture<'a, Result<KeyRecord, AdminError>> {
        (**self).update(name, patch)
    }
    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), AdminError>> {
        (**self).delete(name)
    }
    fn list(&self, page: PageRequest) -> BoxFuture<'_, Result<KeyPage, AdminError>> {
        (**self).list(page)
    }
    fn disable<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<KeyRecord, AdminError>> {
        (**self).disable(name)
    }
}

/// Checks a new key's policy: a name that is not blank, at most 200 bytes, without control
/// characters, and not starting with `team:` (a team's spend account); the key's credential
/// fields are dropped.
pub fn check_new_key(mut key: ApiKey) -> Result<ApiKey, AdminError> {
    let _ = key.take_credential();
    check_name(&key.name)?;
    check_no_nul(&key)?;
    Ok(key)
}

/// A NUL character anywhere in a key's policy: refused (a database cannot store it in text,
/// and no name, model or label needs one).
fn check_no_nul(key: &ApiKey) -> Result<(), AdminError> {
    fn has_nul(value: &Value) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(has_nul),
            Value::Object(fields) => fields.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
            _ => false,
        }
    }
    let value =
        serde_json::to_value(key).map_err(|e| AdminError::Invalid(format!("invalid key: {e}")))?;
    if has_nul(&value) {
        return Err(AdminError::Invalid(
            "a key's policy may not hold a NUL character".into(),
        ));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), AdminError> {
    if name.trim().is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(AdminError::Invalid(
            "a key's name must be 1 to 200 bytes without control characters".into(),
        ));
    }
    if name.starts_with("team:") {
        return Err(AdminError::Invalid(
            "a key's name may not start with `team:` (a team's spend account)".into(),
        ));
    }
    Ok(())
}

/// Applies a JSON merge patch (RFC 7396) to a key's policy: each field of `patch` replaces
/// the key's (`null` removes it, back to its default; an object is merged into an object).
/// The result must be a valid key: an unknown field or a wrong type is
/// [`AdminError::Invalid`], and so are a change of `name` and a credential (`secret`,
/// `secret_sha256`): a key's name and secret never change.
pub fn apply_patch(key: &ApiKey, patch: &Value) -> Result<ApiKey, AdminError> {
    let Value::Object(fields) = patch else {
        return Err(AdminError::Invalid(
            "a key's change is a JSON object of its fields".into(),
        ));
    };
    for (field, value) in fields {
        match field.as_str() {
            "name" if value.as_str() != Some(key.name.as_str()) => {
                return Err(AdminError::Invalid("a key's name cannot change".into()))
            }
            "secret" | "secret_sha256" => {
                return Err(AdminError::Invalid(
                    "a key's secret cannot change: create a new key".into(),
                ))
            }
            _ => {}
        }
    }
    let mut current = serde_json::to_value(key)
        .map_err(|e| AdminError::Invalid(format!("the key cannot be read: {e}")))?;
    merge(&mut current, patch);
    let patched: ApiKey = serde_json::from_value(current)
        .map_err(|e| AdminError::Invalid(format!("invalid key: {e}")))?;
    check_no_nul(&patched)?;
    Ok(patched)
}

/// RFC 7396's MergePatch.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    let target = target.as_object_mut().expect("made an object");
    for (field, value) in patch {
        if value.is_null() {
            target.remove(field);
        } else {
            merge(target.entry(field.clone()).or_insert(Value::Null), value);
        }
    }
}

/// A new random key: `sk-tlp-` and 43 characters of base 62 (256 bits from the operating
/// system's random source).
pub fn generate_secret() -> Result<String, AdminError> {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::from("sk-tlp-");
    // Rejection sampling: bytes of 248 and above would favour the first characters.
    let mut pool = [0u8; 64];
    let mut produced = 0;
    while produced < 43 {
        getrandom::fill(&mut pool)
            .map_err(|e| AdminError::Store(StoreError::new(format!("no random source: {e}"))))?;
        for b in pool {
            if b < 248 && produced < 43 {
                out.push(ALPHABET[usize::from(b % 62)] as char);
                produced += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_changes_the_fields_it_names_and_nothing_else() {
        let key = ApiKey::new("k").rpm(10).model_limits(["gpt-4o"]);
        let patched = apply_patch(
            &key,
            &serde_json::json!({"rpm": null, "tpm": 500, "model_limits": ["gpt-4o-mini"], "model_limits_enabled": true}),
        )
        .unwrap();
        assert_eq!(patched.rpm, None);
        assert_eq!(patched.tpm, Some(500));
        assert!(patched.model_limits_enabled);
        assert_eq!(patched.name, "k");
        for bad in [
            serde_json::json!({"name": "other"}),
            serde_json::json!({"secret": "sk-new"}),
            serde_json::json!({"secret_sha256": "00"}),
            serde_json::json!({"rpmm": 1}),
            serde_json::json!({"rpm": "ten"}),
            serde_json::json!(["rpm"]),
        ] {
            assert!(
                matches!(apply_patch(&key, &bad), Err(AdminError::Invalid(_))),
                "{bad}"
            );
        }
        // Naming the same name is no change.
        assert!(apply_patch(&key, &serde_json::json!({"name": "k"})).is_ok());
    }

    #[test]
    fn a_record_shows_the_first_four_bytes_of_the_digest() {
        let digest = KeyDigest::of("sk-some-key");
        let record = KeyRecord::new(ApiKey::new("k"), &digest);
        assert_eq!(record.digest_prefix, digest.to_hex()[..8]);
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["digest_prefix"], digest.to_hex()[..8]);
        assert_eq!(json["name"], "k");
        assert!(json.get("created_at").is_none(), "no time, no field");
    }

    #[test]
    fn pages_hold_the_names_after_the_cursor_in_order() {
        let keys: std::collections::HashMap<KeyDigest, std::sync::Arc<ApiKey>> = [7, 2, 9, 0, 4]
            .iter()
            .map(|i| {
                let name = format!("k{i}");
                (KeyDigest::of(&name), std::sync::Arc::new(ApiKey::new(name)))
            })
            .collect();
        let names = |page: &KeyPage| {
            page.keys
                .iter()
                .map(|r| r.key.name.clone())
                .collect::<Vec<_>>()
        };
        let first = page_of(
            keys.iter(),
            &PageRequest {
                after: None,
                limit: Some(2),
            },
        );
        assert_eq!(names(&first), ["k0", "k2"]);
        assert_eq!(first.next.as_deref(), Some("k2"));
        // Strictly after the cursor.
        let second = page_of(
            keys.iter(),
            &PageRequest {
                after: first.next.clone(),
                limit: Some(2),
            },
        );
        assert_eq!(names(&second), ["k4", "k7"]);
        let last = page_of(
            keys.iter(),
            &PageRequest {
                after: second.next.clone(),
                limit: Some(2),
            },
        );
        assert_eq!(names(&last), ["k9"]);
        assert_eq!(last.next, None);
        // A page exactly as long as what is left has no next page.
        let exact = page_of(
            keys.iter(),
            &PageRequest {
                after: None,
                limit: Some(5),
            },
        );
        assert_eq!(exact.keys.len(), 5);
        assert_eq!(exact.next, None);
        let all = page_of(keys.iter(), &PageRequest::default());
        assert_eq!(all.keys.len(), 5);
    }

    #[test]
    fn page_sizes_are_bounded() {
        let size = |limit| PageRequest { after: None, limit }.size();
        assert_eq!(size(None), 100);
        assert_eq!(size(Some(0)), 1);
        assert_eq!(size(Some(7)), 7);
        assert_eq!(size(Some(MAX_PAGE + 1)), MAX_PAGE);
    }

    #[test]
    fn a_nul_anywhere_in_a_policy_is_refused() {
        let bad = [
            ApiKey::new("k").label("team", "a\0b"),
            ApiKey::new("k").label("te\0am", "a"),
            ApiKey::new("k").model_limits(["gpt-4o", "gpt\0"]),
        ];
        for key in bad {
            assert!(
                matches!(check_new_key(key.clone()), Err(AdminError::Invalid(_))),
                "{key:?}"
            );
        }
        let key = ApiKey::new("k");
        for patch in [
            serde_json::json!({"metadata": {"team": "a\0"}}),
            serde_json::json!({"metadata": {"a\0": "x"}}),
            serde_json::json!({"model_limits": ["gpt\0"]}),
        ] {
            assert!(
                matches!(apply_patch(&key, &patch), Err(AdminError::Invalid(_))),
                "{patch}"
            );
        }
        assert!(
            check_new_key(ApiKey::new("k").label("team", "a").model_limits(["gpt-4o"])).is_ok()
        );
    }

    #[test]
    fn names_are_at_most_200_bytes() {
        assert!(check_new_key(ApiKey::new("x".repeat(200))).is_ok());
        assert!(check_new_key(ApiKey::new("x".repeat(201))).is_err());
    }

    #[test]
    fn times_are_rfc3339_and_never_past_the_year_9999() {
        let mut record = KeyRecord::new(ApiKey::new("k"), &KeyDigest::of("x"));
        record.created_at =
            Some(std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_764_720_000_250));
        record.updated_at =
            Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(400_000_000_000));
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["created_at"], "2025-12-03T00:00:00.250Z");
        assert_eq!(json["updated_at"], "9999-12-31T23:59:59.000Z");
    }

    #[test]
    fn a_created_key_shows_no_secret_in_debug() {
        let created = CreatedKey {
            record: KeyRecord::new(ApiKey::new("k"), &KeyDigest::of("x")),
            secret: "sk-tlp-secret-value".into(),
        };
        let shown = format!("{created:?}");
        assert!(!shown.contains("secret-value"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("\"k\""),
            "{shown}"
        );
    }

    #[test]
    fn secrets_are_random_and_well_formed() {
        let a = generate_secret().unwrap();
        let b = generate_secret().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 7 + 43);
        assert!(a.starts_with("sk-tlp-"));
        assert!(a[7..].chars().all(|c| c.is_ascii_alphanumeric()));
        // The whole alphabet is used: 860 characters of 62 leave none out in practice (a
        // sampling that kept only a few byte values would show a handful).
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            seen.extend(generate_secret().unwrap()[7..].chars());
        }
        assert!(seen.len() >= 55, "{} distinct characters", seen.len());
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "  ", "team:x", "a\nb", &"x".repeat(201)] {
            assert!(check_new_key(ApiKey::new(bad)).is_err(), "{bad:?}");
        }
        assert!(check_new_key(ApiKey::new("ok-name")).is_ok());
    }
}
