use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use super::{ApiKey, BoxFuture, CredentialError, KeyDigest, KeyStore, StoreError};

/// A key store backed by a TOML or JSON file, which picks up edits without a restart.
///
/// The file lists keys with the fields of [`ApiKey`] and exactly one of `secret` (the
/// plaintext key, digested on load and then dropped) or `secret_sha256` (64 hex digits):
///
/// ```toml
/// [[keys]]
/// name = "chat-app"
/// secret_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
/// model_limits_enabled = true
/// model_limits = ["gpt-4o-mini", "gpt-4o"]
/// metadata = { team = "search" }
/// ```
///
/// JSON files (by the `.json` extension) have the same shape: `{"keys": [{...}]}`. Unknown
/// fields, two keys with the same name or the same secret, and keys without a credential are
/// errors, reported with the line where the parser names one.
///
/// **Reload.** Before a lookup the store compares the file's modification time, size (and on
/// Unix its inode) with what it loaded, at most once per [`check_interval`] (default: every
/// lookup, which costs one `stat`). A changed file is read again on that lookup, so an edit
/// takes effect on the next request. If the new contents are invalid (or the file is gone),
/// the store keeps serving the keys it had, counts the failure and keeps the error for
/// [`last_error`]: a typo must not lock every client out. It does not retry a bad file until
/// the file changes again. Reading happens on the calling task; key files are small.
///
/// **Keys inside a larger configuration file.** [`FileKeyStore::open_keys_of`] reads only the
/// top-level `keys` array of the file and ignores every other table, so a host (the example
/// proxy, say) can keep its keys next to the rest of its configuration and still have them
/// reloaded on edit. The `[[keys]]` entries are checked exactly as above; validating the
/// other tables is the host's job.
///
/// [`check_interval`]: FileKeyStore::check_interval
/// [`last_error`]: FileKeyStore::last_error
pub struct FileKeyStore {
    path: PathBuf,
    section: Section,
    check_interval: Duration,
    state: RwLock<State>,
    reload: Mutex<Option<Instant>>,
}

struct State {
    keys: Arc<HashMap<KeyDigest, Arc<ApiKey>>>,
    stamp: Option<Stamp>,
    last_error: Option<String>,
    reloads: u64,
    failures: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        let meta = std::fs::metadata(path)?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            inode,
        })
    }
}

/// Why a key file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML/JSON or does not have the expected fields.
    #[error("invalid key file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line where it has one.
        message: String,
    },
    /// A key has no credential, or two.
    #[error("invalid key file {path}: {source}")]
    Credential {
        /// The file.
        path: PathBuf,
        /// The problem.
        #[source]
        source: CredentialError,
    },
    /// Two keys share a name or a secret.
    #[error("invalid key file {path}: {what}")]
    Duplicate {
        /// The file.
        path: PathBuf,
        /// Which name (secrets are never shown).
        what: String,
    },
}

/// What of the file the store reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    /// The file is a key file: `keys` and nothing else.
    WholeFile,
    /// The file is a larger configuration: its `keys` array, other tables ignored.
    KeysOnly,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    keys: Vec<ApiKey>,
}

/// The `keys` of a larger configuration file; every other top-level field is skipped unread.
/// The entries themselves are still `ApiKey`s, so their unknown fields remain errors.
#[derive(Deserialize)]
struct KeysOf {
    #[serde(default)]
    keys: Vec<ApiKey>,
}

/// Parses the contents of a key file (or the `keys` of a larger file) into a digest → key
/// map. `json` selects the format.
fn parse_section(
    path: &Path,
    text: &str,
    json: bool,
    section: Section,
) -> Result<HashMap<KeyDigest, Arc<ApiKey>>, KeyFileError> {
    fn parse<T: serde::de::DeserializeOwned>(text: &str, json: bool) -> Result<T, String> {
        if json {
            serde_json::from_str(text).map_err(|e| without_quoted_values(&e.to_string()))
        } else {
            toml::from_str(text).map_err(|e| toml_message(text, &e))
        }
    }
    let keys = match section {
        Section::WholeFile => parse::<KeyFile>(text, json).map(|f| f.keys),
        Section::KeysOnly => parse::<KeysOf>(text, json).map(|f| f.keys),
    }
    .map_err(|message| KeyFileError::Parse {
        path: path.to_owned(),
        message,
    })?;
    build_index(path, keys)
}

/// A TOML error's message with its line and column, without the quoted source line that the
/// error's `Display` adds and without the values the parser quotes (`invalid type: string
/// "…"`): in a file that may hold secrets (a key file, a gateway's configuration) that line may
/// be a `secret = "..."`, and the message goes to logs (start-up errors,
/// [`FileKeyStore::last_error`]).
pub fn toml_message(text: &str, error: &toml::de::Error) -> String {
    let message = without_quoted_values(error.message().trim_end());
    let message = message.as_str();
    match error.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("TOML parse error at line {line}, column {column}: {message}")
        }
        None => format!("TOML parse error: {message}"),
    }
}

/// A parser's message with the values it quotes (`invalid type: string "…", expected u64`)
/// replaced by `"…"`: a secret in the wrong field, or a field name mistyped next to one, must
/// not reach a log through the error. Field names (quoted with backticks) are kept.
fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        match rest.find('"') {
            Some(close) => {
                out.push_str("…\"");
                rest = &rest[close + 1..];
            }
            None => {
                out.push('…');
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Indexes configured keys by digest, taking their credentials out.
pub(crate) fn build_index(
    path: &Path,
    keys: Vec<ApiKey>,
) -> Result<HashMap<KeyDigest, Arc<ApiKey>>, KeyFileError> {
    let mut index = HashMap::with_capacity(keys.len());
    let mut names = HashSet::with_capacity(keys.len());
    for mut key in keys {
        let digest = key
            .take_credential()
            .map_err(|source| KeyFileError::Credential {
                path: path.to_owned(),
                source,
            })?;
        if key.name.trim().is_empty() {
            return Err(KeyFileError::Parse {
                path: path.to_owned(),
                message: "a key has an empty `name`".into(),
            });
        }
        if !names.insert(key.name.clone()) {
            return Err(KeyFileError::Duplicate {
                path: path.to_owned(),
                what: format!("two keys are named `{}`", key.name),
            });
        }
        let name = key.name.clone();
        if index.insert(digest, Arc::new(key)).is_some() {
            return Err(KeyFileError::Duplicate {
                path: path.to_owned(),
                what: format!("key `{name}` has the same secret as another key"),
            });
        }
    }
    Ok(index)
}

fn load(
    path: &Path,
    section: Section,
) -> Result<(HashMap<KeyDigest, Arc<ApiKey>>, Stamp), KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    // Stamp first: an edit landing between the stamp and the read is seen again next check.
    let stamp = Stamp::of(path).map_err(io)?;
    let text = std::fs::read_to_string(path).map_err(io)?;
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    Ok((parse_section(path, &text, json, section)?, stamp))
}

impl FileKeyStore {
    /// Loads the key file. A missing or invalid file is an error here (at start-up).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, KeyFileError> {
        Self::open_section(path.into(), Section::WholeFile)
    }

    /// Loads the `keys` array of a larger configuration file (TOML, or JSON by the `.json`
    /// extension), ignoring every other top-level field, now and on every reload. The keys
    /// are checked as in a key file (unknown fields, credentials, duplicates); a missing
    /// `keys` array is no keys. See the [type docs](FileKeyStore).
    pub fn open_keys_of(path: impl Into<PathBuf>) -> Result<Self, KeyFileError> {
        Self::open_section(path.into(), Section::KeysOnly)
    }

    fn open_section(path: PathBuf, section: Section) -> Result<Self, KeyFileError> {
        let (keys, stamp) = load(&path, section)?;
        Ok(FileKeyStore {
            path,
            section,
            check_interval: Duration::ZERO,
            state: RwLock::new(State {
                keys: Arc::new(keys),
                stamp: Some(stamp),
                last_error: None,
                reloads: 0,
                failures: 0,
            }),
            reload: Mutex::new(None),
        })
    }

    /// Checks the file for changes at most this often (default: on every lookup).
    #[must_use]
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of keys loaded.
    pub fn len(&self) -> usize {
        self.read().keys.len()
    }

    /// Whether no keys are loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many times the file was reloaded successfully after the first load.
    pub fn reloads(&self) -> u64 {
        self.read().reloads
    }

    /// How many reloads failed (the previous keys stayed in force).
    pub fn failed_reloads(&self) -> u64 {
        self.read().failures
    }

    /// The error of the last failed reload, cleared by a successful one.
    pub fn last_error(&self) -> Option<String> {
        self.read().last_error.clone()
    }

    /// Checks the file now and reloads it if it changed. Returns whether keys were replaced.
    pub fn refresh(&self) -> bool {
        let Ok(mut last) = self.reload.try_lock() else {
            // Another caller is reloading right now: use the keys in force.
            return false;
        };
        *last = Some(Instant::now());
        let current = Stamp::of(&self.path).ok();
        if current.is_some() && current == self.read().stamp {
            return false;
        }
        let outcome = load(&self.path, self.section);
        let mut state = self.write();
        match outcome {
            Ok((keys, stamp)) => {
                state.keys = Arc::new(keys);
                state.stamp = Some(stamp);
                state.last_error = None;
                state.reloads += 1;
                true
            }
            Err(err) => {
                if current.is_some() || state.stamp.is_some() {
                    state.failures += 1;
                    state.last_error = Some(err.to_string());
                }
                // Don't parse the same bad file again until it changes.
                state.stamp = current;
                false
            }
        }
    }

    fn maybe_refresh(&self) {
        if !self.check_interval.is_zero() {
            let due = match self.reload.try_lock() {
                Ok(last) => last.is_none_or(|at| at.elapsed() >= self.check_interval),
                Err(_) => false,
            };
            if !due {
                return;
            }
        }
        self.refresh();
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl std::fmt::Debug for FileKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKeyStore")
            .field("path", &self.path)
            .field("keys_only", &(self.section == Section::KeysOnly))
            .field("keys", &self.len())
            .field("check_interval", &self.check_interval)
            .finish()
    }
}

impl KeyStore for FileKeyStore {
    fn lookup<'a>(
        &'a self,
        digest: &'a KeyDigest,
    ) -> BoxFuture<'a, Result<Option<Arc<ApiKey>>, StoreError>> {
        Box::pin(std::future::ready(Ok(self.find(digest))))
    }

    fn lookup_now(&self, digest: &KeyDigest) -> Option<Result<Option<Arc<ApiKey>>, StoreError>> {
        Some(Ok(self.find(digest)))
    }
}

impl FileKeyStore {
    fn find(&self, digest: &KeyDigest) -> Option<Arc<ApiKey>> {
        self.maybe_refresh();
        self.read().keys.get(digest).cloned()
    }
}
