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
/// Unix its inode) with what it loaded, at most once per [`check_interval`] (default: once a
/// second, [`FileKeyStore::DEFAULT_CHECK_INTERVAL`]; zero checks on every lookup, which costs
/// one `stat` per request). A changed file is read again on that lookup, so an edit takes
/// effect within the interval. If the new contents are invalid (or the file is gone),
/// the store keeps serving the keys it had, counts the failure ([`failed_reloads`]), keeps the
/// error for [`last_error`] and (feature `tracing`) emits a `warn` event with the error's line
/// and column (never a secret): a typo must not lock every client out. It does not retry a bad
/// file until the file changes again. Reading happens on the calling task; key files are small.
///
/// **Never fail open.** Only a file that parses completely and validates replaces the keys. A
/// reload is also refused, keeping the keys in force, when:
///
/// - the file is empty or only whitespace (a truncate-then-write caught between the two). To
///   revoke every key on purpose, write `keys = []` (or `{"keys": []}`);
/// - a TOML file does not end with a newline (it was most likely cut off mid-write: a cut
///   after `secret = "..."` would otherwise parse, with the key's restrictions missing);
/// - the file's size, modification time or inode changed while it was being read (it is read
///   again on the next check);
/// - the file is larger than [`max_file_size`] (default [`FileKeyStore::DEFAULT_MAX_FILE_SIZE`], 16 MiB).
///
/// A file cut exactly at the end of a line can still be a valid, shorter file, which no reader
/// can tell from a deliberate edit. **Replace the file atomically**: write the new contents to
/// a temporary file in the same directory, then `rename` it over the key file (`mv` does this;
/// so do most editors and configuration tools). The store then only ever sees the old or the
/// new file, never a half-written one.
///
/// **Keys inside a larger configuration file.** [`FileKeyStore::open_keys_of`] reads only the
/// top-level `keys` array of the file and ignores every other table, so a host (the example
/// proxy, say) can keep its keys next to the rest of its configuration and still have them
/// reloaded on edit. The `[[keys]]` entries are checked exactly as above; validating the
/// other tables is the host's job.
///
/// [`check_interval`]: FileKeyStore::check_interval
/// [`last_error`]: FileKeyStore::last_error
/// [`failed_reloads`]: FileKeyStore::failed_reloads
/// [`max_file_size`]: FileKeyStore::max_file_size
pub struct FileKeyStore {
    path: PathBuf,
    section: Section,
    check_interval: Duration,
    max_file_size: u64,
    state: RwLock<State>,
    reload: Mutex<Option<Instant>>,
    /// One admin change at a time.
    admin: Mutex<()>,
    /// The host's own check of each key, at every load ([`FileKeyStore::validate_keys`]).
    validator: Option<KeyValidator>,
}

/// A host's check of one key: `Err(why)` refuses the file that holds it.
type KeyValidator = Arc<dyn Fn(&ApiKey) -> Result<(), String> + Send + Sync>;

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
    /// The file is larger than the store's limit.
    #[error("key file {path} is too large: {len} bytes, the limit is {limit}")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (at least; a growing file is cut off at the limit).
        len: u64,
        /// The limit ([`FileKeyStore::max_file_size`]).
        limit: u64,
    },
    /// A key failed the host's check ([`FileKeyStore::validate_keys`]).
    #[error("invalid key file {path}: key `{key}`: {message}")]
    Rejected {
        /// The file.
        path: PathBuf,
        /// The key's name (never its secret).
        key: String,
        /// The host's reason.
        message: String,
    },
    /// The file looks half-written (empty, cut off mid-line, or changing while read). Only
    /// reloads are refused this way; the keys in force stay.
    #[error("key file {path} refused: {reason}")]
    Incomplete {
        /// The file.
        path: PathBuf,
        /// Why it looks incomplete.
        reason: &'static str,
    },
}

/// What of the file the store reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Section {
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
pub(super) fn parse_section(
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
        if key.name.starts_with("team:") {
            // A team's spend is counted under `team:<name>` (see `quota::team_account`).
            return Err(KeyFileError::Parse {
                path: path.to_owned(),
                message: format!(
                    "key `{}`: a key's name may not start with `team:` (a team's spend account)",
                    key.name
                ),
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

/// `check` over `keys`, in name order (the first failure is the same on every load).
fn validate(
    path: &Path,
    keys: &HashMap<KeyDigest, Arc<ApiKey>>,
    check: &KeyValidator,
) -> Result<(), KeyFileError> {
    let mut keys: Vec<&Arc<ApiKey>> = keys.values().collect();
    keys.sort_by(|a, b| a.name.cmp(&b.name));
    for key in keys {
        check(key).map_err(|message| KeyFileError::Rejected {
            path: path.to_owned(),
            key: key.name.clone(),
            message,
        })?;
    }
    Ok(())
}

/// Reads and parses the file. `reload` adds the checks against half-written files that only
/// make sense when there are keys in force to keep (see the type docs).
fn load(
    path: &Path,
    section: Section,
    limit: u64,
    reload: bool,
) -> Result<(HashMap<KeyDigest, Arc<ApiKey>>, Stamp), KeyFileError> {
    use std::io::Read;
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let incomplete = |reason| KeyFileError::Incomplete {
        path: path.to_owned(),
        reason,
    };
    // Stamp first: an edit landing between the stamp and the read is seen again next check.
    let stamp = Stamp::of(path).map_err(io)?;
    let too_large = |len| KeyFileError::TooLarge {
        path: path.to_owned(),
        len,
        limit,
    };
    if stamp.len > limit {
        return Err(too_large(stamp.len));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(stamp.len).unwrap_or(0));
    std::fs::File::open(path)
        .map_err(io)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    if reload && Stamp::of(path).map_err(io)? != stamp {
        return Err(incomplete(
            "the file changed while it was read (it will be read again)",
        ));
    }
    let text = String::from_utf8(bytes).map_err(|_| KeyFileError::Parse {
        path: path.to_owned(),
        message: "the file is not valid UTF-8".into(),
    })?;
    let json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if reload && text.trim().is_empty() {
        return Err(incomplete(
            "the file is empty (half-written?); write `keys = []` to revoke every key",
        ));
    }
    let keys = parse_section(path, &text, json, section)?;
    // A cut that leaves valid TOML (right after `secret = "..."`, say) is still refused;
    // a cut anywhere else is a parse error above, with its line and column.
    if reload && !json && !text.ends_with('\n') {
        return Err(incomplete(
            "the file does not end with a newline (cut off mid-write?)",
        ));
    }
    Ok((keys, stamp))
}

impl FileKeyStore {
    /// The largest key file a store reads unless told otherwise
    /// ([`max_file_size`](Self::max_file_size)): 16 MiB.
    pub const DEFAULT_MAX_FILE_SIZE: u64 = 16 * 1024 * 1024;

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
        let (keys, stamp) = load(&path, section, Self::DEFAULT_MAX_FILE_SIZE, false)?;
        Ok(FileKeyStore {
            path,
            section,
            check_interval: FileKeyStore::DEFAULT_CHECK_INTERVAL,
            max_file_size: Self::DEFAULT_MAX_FILE_SIZE,
            state: RwLock::new(State {
                keys: Arc::new(keys),
                stamp: Some(stamp),
                last_error: None,
                reloads: 0,
                failures: 0,
            }),
            reload: Mutex::new(None),
            admin: Mutex::new(()),
            validator: None,
        })
    }

    /// Checks every key with `check` now and at every later load: a reload with a key that
    /// fails it is refused like an invalid file (the keys in force stay, see
    /// [`last_error`](Self::last_error)), and so is an admin change
    /// ([`KeyAdmin`](super::KeyAdmin)) that would write one. For the host's own rules about
    /// keys, such as the example proxy's: every guard a key lists in
    /// [`guards`](ApiKey::guards) must be configured.
    ///
    /// Returns the error for the first key loaded already that fails `check`.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = std::env::temp_dir().join(format!("tlp-doc-validate-{}", std::process::id()));
    /// # std::fs::create_dir_all(&dir)?;
    /// # let path = dir.join("keys.toml");
    /// # std::fs::write(&path, "[[keys]]\nname = \"app\"\nsecret = \"sk-app-0123456789abcdef0123\"\nguards = [\"pii\"]\n")?;
    /// use tower_llm_policy::keys::FileKeyStore;
    ///
    /// let known = ["pii", "injection"];
    /// let store = FileKeyStore::open(&path)?.validate_keys(move |key| {
    ///     match key.guards.iter().find(|g| !known.contains(&g.as_str())) {
    ///         Some(g) => Err(format!("no guard is named `{g}`")),
    ///         None => Ok(()),
    ///     }
    /// })?;
    /// assert_eq!(store.len(), 1);
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn validate_keys(
        mut self,
        check: impl Fn(&ApiKey) -> Result<(), String> + Send + Sync + 'static,
    ) -> Result<Self, KeyFileError> {
        let check: KeyValidator = Arc::new(check);
        validate(&self.path, &self.read().keys, &check)?;
        self.validator = Some(check);
        Ok(self)
    }

    /// The host's check of `keys`, if it set one.
    pub(super) fn validated(
        &self,
        keys: &HashMap<KeyDigest, Arc<ApiKey>>,
    ) -> Result<(), KeyFileError> {
        match &self.validator {
            Some(check) => validate(&self.path, keys, check),
            None => Ok(()),
        }
    }

    /// How often the file is checked for changes by default: once a second (a `stat` per
    /// request would cost as much as the rest of the key check).
    pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);

    /// Checks the file for changes at most this often (default
    /// [`DEFAULT_CHECK_INTERVAL`](Self::DEFAULT_CHECK_INTERVAL); zero: on every lookup).
    #[must_use]
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// Refuses files larger than this many bytes (default [`FileKeyStore::DEFAULT_MAX_FILE_SIZE`], 16 MiB):
    /// a larger file is a failed reload, and the keys in force stay. The file loaded by
    /// [`open`](Self::open) was checked against the default.
    #[must_use]
    pub fn max_file_size(mut self, bytes: u64) -> Self {
        self.max_file_size = bytes;
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

    /// How many reloads were refused (invalid, half-written, too large or missing file); the
    /// previous keys stayed in force each time.
    pub fn failed_reloads(&self) -> u64 {
        self.read().failures
    }

    /// The error of the last failed reload, cleared by a successful one.
    pub fn last_error(&self) -> Option<String> {
        self.read().last_error.clone()
    }

    /// Checks the file now and reloads it if it changed. Returns whether keys were replaced.
    pub fn refresh(&self) -> bool {
        let mut last = match self.reload.try_lock() {
            Ok(last) => last,
            // A reload that panicked: the lock guards a time only, take it over.
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Another caller is reloading right now: use the keys in force.
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        *last = Some(Instant::now());
        let current = Stamp::of(&self.path).ok();
        if current.is_some() && current == self.read().stamp {
            return false;
        }
        let outcome = load(&self.path, self.section, self.max_file_size, true)
            .and_then(|(keys, stamp)| self.validated(&keys).map(|()| (keys, stamp)));
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
                    let message = err.to_string();
                    #[cfg(feature = "tracing")]
                    tracing::warn!(
                        target: "tower_llm_policy::keys::file",
                        error = %message,
                        failed_reloads = state.failures,
                        "key file reload refused: the previous keys stay in force"
                    );
                    state.last_error = Some(message);
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
                Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned
                    .into_inner()
                    .is_none_or(|at| at.elapsed() >= self.check_interval),
                Err(std::sync::TryLockError::WouldBlock) => false,
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

    /// The keys in force.
    pub(super) fn snapshot(&self) -> Arc<HashMap<KeyDigest, Arc<ApiKey>>> {
        self.read().keys.clone()
    }

    /// Which part of the file holds the keys.
    pub(super) fn section(&self) -> Section {
        self.section
    }

    /// The size limit of the file.
    pub(super) fn max_size(&self) -> u64 {
        self.max_file_size
    }

    /// Puts `keys`, just written to the file, in force (an admin change), with the file's
    /// stamp now, whatever a reload running at the same time does.
    pub(super) fn install(&self, keys: HashMap<KeyDigest, Arc<ApiKey>>) {
        let stamp = Stamp::of(&self.path).ok();
        let mut state = self.write();
        state.keys = Arc::new(keys);
        state.stamp = stamp;
        state.last_error = None;
        state.reloads += 1;
    }

    /// Held while an admin change rewrites the file.
    pub(super) fn admin_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
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
            .field("max_file_size", &self.max_file_size)
            .field("validated", &self.validator.is_some())
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
