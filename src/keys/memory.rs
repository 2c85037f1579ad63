use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::admin::{
    apply_patch, check_new_key, generate_secret, page_of, AdminError, CreatedKey, KeyAdmin,
    KeyPage, KeyRecord, PageRequest,
};
use super::{ApiKey, BoxFuture, KeyDigest, KeyStore, StoreError};

/// A key store in memory: the embedded default. Keys can be added and removed at run time.
///
/// ```
/// use tower_llm_policy::keys::{ApiKey, MemoryKeyStore};
///
/// let store = MemoryKeyStore::new()
///     .with_key("sk-demo", ApiKey::new("demo").model_limits(["gpt-4o-mini"]));
/// assert_eq!(store.len(), 1);
/// ```
#[derive(Default)]
pub struct MemoryKeyStore {
    keys: RwLock<HashMap<KeyDigest, Arc<ApiKey>>>,
}

impl MemoryKeyStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key given in plaintext (only its digest is kept).
    #[must_use]
    pub fn with_key(self, secret: &str, key: ApiKey) -> Self {
        self.insert(KeyDigest::of(secret), key);
        self
    }

    /// Adds a key by its digest.
    #[must_use]
    pub fn with_digest(self, digest: KeyDigest, key: ApiKey) -> Self {
        self.insert(digest, key);
        self
    }

    /// Adds or replaces a key by its digest. Any credential still held by `key` is dropped.
    pub fn insert(&self, digest: KeyDigest, mut key: ApiKey) {
        let _ = key.take_credential();
        self.write().insert(digest, Arc::new(key));
    }

    /// Removes a key; returns whether it was there.
    pub fn remove(&self, digest: &KeyDigest) -> bool {
        self.write().remove(digest).is_some()
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether the store has no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks a key up without going through the async trait.
    pub fn get(&self, digest: &KeyDigest) -> Option<Arc<ApiKey>> {
        self.read().get(digest).cloned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<KeyDigest, Arc<ApiKey>>> {
        // A panic elsewhere while holding the lock leaves the map consistent (every write is
        // a single insert or remove), so a poisoned lock is still safe to use.
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<KeyDigest, Arc<ApiKey>>> {
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for MemoryKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.read();
        f.debug_struct("MemoryKeyStore")
            .field(
                "keys",
                &keys.values().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl KeyStore for MemoryKeyStore {
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        let found = self.get(digest);
        Box::pin(std::future::ready(Ok(found)))
    }

    fn lookup_now(&self, digest: &KeyDigest) -> Option<Result<Option<Arc<ApiKey>>, StoreError>> {
        Some(Ok(self.get(digest)))
    }
}

impl MemoryKeyStore {
    /// The digest and key named `name`.
    fn named(&self, name: &str) -> Option<(KeyDigest, Arc<ApiKey>)> {
        self.read()
            .iter()
            .find(|(_, k)| k.name == name)
            .map(|(d, k)| (*d, k.clone()))
    }
}

/// The admin API on memory: changes last until the process ends. Records carry no times.
impl KeyAdmin for MemoryKeyStore {
    fn create(&self, key: ApiKey) -> BoxFuture<'_, Result<CreatedKey, AdminError>> {
        Box::pin(async move {
            let key = check_new_key(key)?;
            let secret = generate_secret()?;
            let digest = KeyDigest::of(&secret);
            let mut keys = self.write();
            if keys.values().any(|k| k.name == key.name) {
                return Err(AdminError::Conflict(key.name));
            }
            keys.insert(digest, Arc::new(key.clone()));
            Ok(CreatedKey {
                record: KeyRecord::new(key, &digest),
                secret,
            })
        })
    }

    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<KeyRecord, AdminError>> {
        let found = self
            .named(name)
            .map(|(digest, key)| KeyRecord::new((*key).clone(), &digest))
            .ok_or_else(|| AdminError::NotFound(name.to_owned()));
        Box::pin(std::future::ready(found))
    }

    fn update<'a>(
        &'a self,
        name: &'a str,
        patch: &'a serde_json::Value,
    ) -> BoxFuture<'a, Result<KeyRecord, AdminError>> {
        Box::pin(async move {
            let mut keys = self.write();
            let (digest, key) = keys
                .iter()
                .find(|(_, k)| k.name == name)
                .map(|(d, k)| (*d, k.clone()))
                .ok_or_else(|| AdminError::NotFound(name.to_owned()))?;
            let patched = apply_patch(&key, patch)?;
            keys.insert(digest, Arc::new(patched.clone()));
            Ok(KeyRecord::new(patched, &digest))
        })
    }

    fn delete<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), AdminError>> {
        let removed = match self.named(name) {
            Some((digest, _)) => {
                self.remove(&digest);
                Ok(())
            }
            None => Err(AdminError::NotFound(name.to_owned())),
        };
        Box::pin(std::future::ready(removed))
    }

    fn list(&self, page: PageRequest) -> BoxFuture<'_, Result<KeyPage, AdminError>> {
        let page = page_of(self.read().iter(), &page);
        Box::pin(std::future::ready(Ok(page)))
    }
}
