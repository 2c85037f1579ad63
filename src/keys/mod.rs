//! Virtual API keys, their policy, and the pluggable [`KeyStore`] that finds them.
//!
//! A store never holds a plaintext key: it is indexed by the SHA-256 [`KeyDigest`] of each
//! key, and [`KeyAuth`](crate::key_auth::KeyAuth) digests the presented key once per request
//! and asks the store for that digest. The [`ApiKey`] found goes into the request's extensions
//! as `Arc<ApiKey>`, where later layers read their part of it.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::endpoint::{hex_digit, FeatureSet};
use crate::model::ModelList;
use crate::quota::BudgetPeriod;

fn is_lifetime(period: &BudgetPeriod) -> bool {
    *period == BudgetPeriod::Lifetime
}

pub mod admin;
mod cache;
pub use cache::{CacheInvalidator, CacheStats, CachedKeyStore};

mod memory;
pub use admin::{AdminError, CreatedKey, KeyAdmin, KeyPage, KeyRecord, PageRequest};
pub use memory::MemoryKeyStore;

#[cfg(feature = "file-store")]
mod file;
#[cfg(feature = "file-store")]
mod file_admin;
#[cfg(feature = "file-store")]
pub use file::{toml_message, FileKeyStore, KeyFileError};

/// A boxed, sendable future, as the object-safe traits of this crate return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The SHA-256 digest of a key: what stores keep and look up instead of the key.
///
/// `Debug` and `Display` show only the first four bytes, enough to tell keys apart in logs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// Digests a plaintext key.
    pub fn of(secret: &str) -> Self {
        KeyDigest(Sha256::digest(secret.as_bytes()).into())
    }

    /// Wraps a digest's 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        KeyDigest(bytes)
    }

    /// Parses 64 hexadecimal digits (either case).
    pub fn from_hex(hex: &str) -> Result<Self, InvalidDigest> {
        let hex = hex.trim().as_bytes();
        if hex.len() != 64 {
            return Err(InvalidDigest);
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let hi = hex_digit(pair[0]).ok_or(InvalidDigest)?;
            let lo = hex_digit(pair[1]).ok_or(InvalidDigest)?;
            out[i] = hi << 4 | lo;
        }
        Ok(KeyDigest(out))
    }

    /// The 64 lowercase hexadecimal digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({self})")
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

impl<'de> Deserialize<'de> for KeyDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(d)?;
        KeyDigest::from_hex(&hex).map_err(serde::de::Error::custom)
    }
}

/// A digest that is not 64 hexadecimal digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a key digest must be 64 hexadecimal digits (SHA-256)")]
pub struct InvalidDigest;

/// A virtual API key's policy. Never holds the key itself.
///
/// Which layer reads each field:
///
/// | field | read by |
/// |---|---|
/// | `name`, `metadata` | audit records (the key's identity and labels) |
/// | `disabled`, `expires_at`, `allow_ips` | [`KeyAuth`](crate::key_auth::KeyAuth) |
/// | `model_limits_enabled`, `model_limits` | [`ModelAllowList`](crate::model_allow_list::ModelAllowList) |
/// | `blocked_features`, `blocked_models`, `blocked_image_sizes`, `blocked_image_qualities` | [`FeatureBlock`](crate::feature_block::FeatureBlock) |
/// | `max_prompt_chars`, `max_prompt_tokens`, `max_output_tokens`, `max_n`, `max_messages`, `require_user` | [`PromptLimit`](crate::prompt_limit::PromptLimit) |
/// | `name`, `metadata` (again) | [`AuditLayer`](crate::audit::AuditLayer) records |
/// | `credit_limit_usd`, `budget_period`, `rpm`, `tpm`, `team` | [`Quota`](crate::quota::Quota) |
/// | `guards` | `GuardLayer` (feature `guards`) |
///
/// Build one with [`ApiKey::new`] and the builder methods, or load it from a file store (the
/// field names are the configuration keys; unknown fields are an error).
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The key's name or id, unique per store: what audit records show.
    pub name: String,
    /// Whether `model_limits` applies.
    #[serde(default)]
    pub model_limits_enabled: bool,
    /// The models this key may use, when `model_limits_enabled`.
    #[serde(default)]
    pub model_limits: ModelList,
    /// Features (endpoints) this key may not use.
    #[serde(default)]
    pub blocked_features: FeatureSet,
    /// Models this key may not use, whatever else allows them.
    #[serde(default)]
    pub blocked_models: ModelList,
    /// Image sizes (`1792x1024`, ...) this key may not request (compared without regard to
    /// case).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_image_sizes: Vec<String>,
    /// Image qualities (`hd`, `high`, ...) this key may not request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_image_qualities: Vec<String>,
    /// Maximum prompt size in characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prompt_chars: Option<u64>,
    /// Maximum prompt size in tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prompt_tokens: Option<u64>,
    /// Maximum requested output tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// Maximum `n` (choices per request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_n: Option<u64>,
    /// Maximum number of chat messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u64>,
    /// Client addresses (CIDR blocks or single addresses) allowed to use the key; empty: any.
    #[serde(default, deserialize_with = "deserialize_ips")]
    pub allow_ips: Vec<IpNet>,
    /// When the key stops working. In files: RFC 3339 (`2027-01-01T00:00:00Z`) or Unix seconds.
    #[serde(default, with = "expiry", skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<SystemTime>,
    /// A disabled key is refused as if unknown (401).
    #[serde(default)]
    pub disabled: bool,
    /// Spend cap in USD, per [`budget_period`](Self::budget_period).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credit_limit_usd: Option<f64>,
    /// The period `credit_limit_usd` covers (UTC): `none` (the default, the key's whole
    /// life), `daily` or `monthly`.
    #[serde(default, skip_serializing_if = "is_lifetime")]
    pub budget_period: BudgetPeriod,
    /// Whether every request must carry `user` or `safety_identifier`.
    #[serde(default)]
    pub require_user: bool,
    /// Requests per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// The team the key belongs to: its requests count toward the team's spend cap too, when
    /// the [`QuotaLayer`](crate::quota::QuotaLayer) has one
    /// ([`team_cap`](crate::quota::QuotaLayer::team_cap)), shared by every key of the team.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// The named content guards and tool-call firewall policies this key is bound to, on top
    /// of the workspace's defaults (a key can add guards, never remove a workspace one): see
    /// the `guard` module (feature `guards`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guards: Vec<String>,
    /// Free-form labels (team, owner, ...) copied into audit records.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The plaintext key, present only between reading a configuration and
    /// [`take_credential`](ApiKey::take_credential); stores clear it before sharing the key.
    #[serde(default, skip_serializing)]
    secret: Option<Secret>,
    /// The key's SHA-256 digest as configured (`secret_sha256`), until `take_credential`.
    #[serde(default, skip_serializing)]
    secret_sha256: Option<KeyDigest>,
}

/// A plaintext key read from configuration. Its `Debug` shows nothing of it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
struct Secret(String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A configured key with neither or both of `secret` and `secret_sha256`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("key `{name}`: {problem}")]
pub struct CredentialError {
    /// The key's name.
    pub name: String,
    /// What is wrong.
    pub problem: &'static str,
}

impl ApiKey {
    /// A key with this name and no restrictions.
    pub fn new(name: impl Into<String>) -> Self {
        ApiKey {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Enables the model allow-list with these models (names or `prefix*` wildcards).
    #[must_use]
    pub fn model_limits<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.model_limits_enabled = true;
        self.model_limits = ModelList::new(models);
        self
    }

    /// Blocks these features (names or groups, see [`Feature`](crate::endpoint::Feature)).
    #[must_use]
    pub fn blocked_features(mut self, features: FeatureSet) -> Self {
        self.blocked_features = features;
        self
    }

    /// Blocks these models.
    #[must_use]
    pub fn blocked_models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.blocked_models = ModelList::new(models);
        self
    }

    /// Limits the prompt to this many tokens.
    #[must_use]
    pub fn max_prompt_tokens(mut self, tokens: u64) -> Self {
        self.max_prompt_tokens = Some(tokens);
        self
    }

    /// Allows the key only from these networks.
    #[must_use]
    pub fn allow_ips<I: IntoIterator<Item = IpNet>>(mut self, nets: I) -> Self {
        self.allow_ips = nets.into_iter().collect();
        self
    }

    /// Makes the key expire at `when`.
    #[must_use]
    pub fn expires_at(mut self, when: SystemTime) -> Self {
        self.expires_at = Some(when);
        self
    }

    /// Disables the key.
    #[must_use]
    pub fn disabled(mut self, disabled: bool) -> Self {
        self.disabled = disabled;
        self
    }

    /// Requires `user` (or `safety_identifier`) on every request.
    #[must_use]
    pub fn require_user(mut self, require: bool) -> Self {
        self.require_user = require;
        self
    }

    /// Caps the key's spend, in USD, per `period`.
    #[must_use]
    pub fn credit_limit_usd(mut self, cap: f64, period: BudgetPeriod) -> Self {
        self.credit_limit_usd = Some(cap);
        self.budget_period = period;
        self
    }

    /// Limits the key's requests per minute.
    #[must_use]
    pub fn rpm(mut self, requests: u64) -> Self {
        self.rpm = Some(requests);
        self
    }

    /// Limits the key's tokens (prompt and completion) per minute.
    #[must_use]
    pub fn tpm(mut self, tokens: u64) -> Self {
        self.tpm = Some(tokens);
        self
    }

    /// Puts the key in `team`, whose spend cap (if the quota layer has one) it shares.
    #[must_use]
    pub fn team(mut self, team: impl Into<String>) -> Self {
        self.team = Some(team.into());
        self
    }

    /// Adds a metadata label.
    #[must_use]
    pub fn label(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(name.into(), value.into());
        self
    }

    /// Takes the credential read with the key from a configuration (`secret` or
    /// `secret_sha256`, exactly one of them) and returns its digest, leaving no secret behind.
    pub fn take_credential(&mut self) -> Result<KeyDigest, CredentialError> {
        let err = |problem| CredentialError {
            name: self.name.clone(),
            problem,
        };
        match (self.secret.take(), self.secret_sha256.take()) {
            (Some(secret), None) if secret.0.trim().is_empty() => Err(err("`secret` is empty")),
            (Some(secret), None) => Ok(KeyDigest::of(&secret.0)),
            (None, Some(digest)) => Ok(digest),
            (None, None) => Err(err("needs `secret` or `secret_sha256`")),
            (Some(_), Some(_)) => Err(err("has both `secret` and `secret_sha256`: keep one")),
        }
    }

    /// Whether the key has expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every field is policy, none is secret; the key itself is never part of an ApiKey.
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("model_limits_enabled", &self.model_limits_enabled)
            .field("model_limits", &self.model_limits)
            .field("blocked_features", &self.blocked_features)
            .field("blocked_models", &self.blocked_models)
            .field("blocked_image_sizes", &self.blocked_image_sizes)
            .field("blocked_image_qualities", &self.blocked_image_qualities)
            .field("max_prompt_chars", &self.max_prompt_chars)
            .field("max_prompt_tokens", &self.max_prompt_tokens)
            .field("max_output_tokens", &self.max_output_tokens)
            .field("max_n", &self.max_n)
            .field("max_messages", &self.max_messages)
            .field("allow_ips", &self.allow_ips)
            .field("expires_at", &self.expires_at)
            .field("disabled", &self.disabled)
            .field("credit_limit_usd", &self.credit_limit_usd)
            .field("budget_period", &self.budget_period)
            .field("require_user", &self.require_user)
            .field("rpm", &self.rpm)
            .field("tpm", &self.tpm)
            .field("team", &self.team)
            .field("guards", &self.guards)
            .field("metadata", &self.metadata)
            .finish()
    }
}

fn deserialize_ips<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| serde::de::Error::custom(format!("invalid address or CIDR `{s}`")))
        })
        .collect()
}

mod expiry {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        let at = match Option::<Raw>::deserialize(d)? {
            None => return Ok(None),
            Some(Raw::Seconds(s)) => UNIX_EPOCH.checked_add(Duration::from_secs(s)),
            Some(Raw::Text(t)) => {
                Some(humantime::parse_rfc3339_weak(t.trim()).map_err(|e| {
                    serde::de::Error::custom(format!("invalid expires_at `{t}`: {e}"))
                })?)
            }
        };
        match at {
            Some(at) if at <= latest() => Ok(Some(at)),
            _ => Err(serde::de::Error::custom(
                "invalid expires_at: after 9999-12-31T23:59:59Z",
            )),
        }
    }

    /// The latest time RFC 3339 can write: 9999-12-31T23:59:59Z.
    pub(crate) fn latest() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(253_402_300_799)
    }

    pub(super) fn serialize<S: Serializer>(
        at: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match at {
            // A later time (set in code) is written as the latest one: it never comes either.
            Some(at) => {
                s.serialize_str(&humantime::format_rfc3339_seconds((*at).min(latest())).to_string())
            }
            None => s.serialize_none(),
        }
    }
}

/// Why a key store could not answer. [`KeyAuth`](crate::key_auth::KeyAuth) fails closed on it
/// (503 `policy_unavailable`).
#[derive(Debug, thiserror::Error)]
#[error("key store unavailable: {message}")]
pub struct StoreError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl StoreError {
    /// An error with a message (never include a key in it).
    pub fn new(message: impl Into<String>) -> Self {
        StoreError {
            message: message.into(),
            source: None,
        }
    }

    /// An error caused by another.
    pub fn with_source(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

/// Finds a key's policy by the digest of the presented key.
///
/// Object safe: hold stores as `Arc<dyn KeyStore>`. `Ok(None)` means "unknown key" (401);
/// `Err` means the store could not answer, and the request fails closed (503).
pub trait KeyStore: Send + Sync + 'static {
    /// Looks a key up by its digest.
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>>;

    /// Answers at once, without a future, when the store can (it holds its keys in memory).
    /// `None` (the default) means "ask [`lookup`](KeyStore::lookup)". KeyAuth tries this
    /// first, which saves a boxed future per request; the two must agree.
    fn lookup_now(&self, digest: &KeyDigest) -> Option<Result<Option<Arc<ApiKey>>, StoreError>> {
        let _ = digest;
        None
    }
}

impl<T: KeyStore + ?Sized> KeyStore for Arc<T> {
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        (**self).lookup(digest)
    }
    fn lookup_now(&self, digest: &KeyDigest) -> Option<Result<Option<Arc<ApiKey>>, StoreError>> {
        (**self).lookup_now(digest)
    }
}

impl<T: KeyStore + ?Sized> KeyStore for Box<T> {
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        (**self).lookup(digest)
    }
    fn lookup_now(&self, digest: &KeyDigest) -> Option<Result<Option<Arc<ApiKey>>, StoreError>> {
        (**self).lookup_now(digest)
    }
}
