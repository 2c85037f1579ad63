//! What the console reads besides the keys: the audit records (from `[audit] jsonl` or
//! `[audit] postgres_url`), spend summed from them, and the upstream's model list.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use http::Request;
use http_body_util::{BodyExt, Limited};
use serde_json::Value;
use tower::ServiceExt;
use tower_llm_policy::model::{ModelAliases, ModelList};
use tower_llm_policy::PolicyBody;

use crate::upstream::Upstream;

/// The most of a JSON Lines audit log the console reads: its last 64 MiB (the newest
/// records). Older records are in the file, not on the console's pages.
pub const MAX_JSONL_SCAN: u64 = 64 * 1024 * 1024;

/// Rows per audit page.
pub(crate) const PAGE_ROWS: usize = 50;

/// Where the console reads audit records from.
#[derive(Clone)]
pub enum AuditSource {
    /// Neither `[audit] jsonl` nor `[audit] postgres_url`: no audit or spend pages.
    None,
    /// `[audit] jsonl`: the file, its newest [`MAX_JSONL_SCAN`] bytes.
    Jsonl(PathBuf),
    /// `[audit] postgres_url`: the `tlp_audit` table.
    Postgres(deadpool_postgres::Pool),
}

impl std::fmt::Debug for AuditSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuditSource::None => f.write_str("None"),
            AuditSource::Jsonl(path) => f.debug_tuple("Jsonl").field(path).finish(),
            AuditSource::Postgres(_) => f.write_str("Postgres"),
        }
    }
}

/// The audit page's filters.
#[derive(Clone, Debug, Default)]
pub(crate) struct AuditQuery {
    pub(crate) key: Option<String>,
    /// Part of the model's name (case-insensitive).
    pub(crate) model: Option<String>,
    pub(crate) status: Option<u16>,
    pub(crate) user: Option<String>,
    /// Only requests a layer refused.
    pub(crate) blocked: bool,
    /// Only requests with flags (besides `blocked`, see [`has_flags`]).
    pub(crate) flagged: bool,
    /// 0-based.
    pub(crate) page: usize,
}

impl AuditQuery {
    fn matches(&self, record: &Value) -> bool {
        let text = |field: &str| record.get(field).and_then(Value::as_str);
        if let Some(key) = &self.key {
            if text("key") != Some(key.as_str()) {
                return false;
            }
        }
        if let Some(model) = &self.model {
            let wanted = model.to_lowercase();
            if !text("model").is_some_and(|m| m.to_lowercase().contains(&wanted)) {
                return false;
            }
        }
        if let Some(status) = self.status {
            if record.get("status").and_then(Value::as_u64) != Some(u64::from(status)) {
                return false;
            }
        }
        if let Some(user) = &self.user {
            if text("user") != Some(user.as_str()) {
                return false;
            }
        }
        if self.blocked && text("blocked_by").is_none() {
            return false;
        }
        if self.flagged && !has_flags(record) {
            return false;
        }
        true
    }
}

/// Whether the record has flags besides `blocked` (which every refused request has, and
/// which the pages show as "blocked" already): `unknown_price`, `usage_missing`, a guard's
/// audit-mode finding, ...
pub(crate) fn has_flags(record: &Value) -> bool {
    record
        .get("flags")
        .and_then(Value::as_array)
        .is_some_and(|flags| {
            flags
                .iter()
                .any(|f| f.as_str() != Some(tower_llm_policy::audit::flag::BLOCKED))
        })
}

/// A page of records, newest first.
#[derive(Debug, Default)]
pub(crate) struct AuditPage {
    pub(crate) rows: Vec<Value>,
    pub(crate) has_more: bool,
}

/// One model's totals.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct ModelTotal {
    pub(crate) model: String,
    pub(crate) requests: u64,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) cost_usd: f64,
}

/// Spend over a range of days.
#[derive(Clone, Debug, Default)]
pub(crate) struct Spend {
    /// (day `YYYY-MM-DD`, key) to dollars.
    pub(crate) per_day_key: BTreeMap<(String, String), f64>,
    /// Per model, most expensive first.
    pub(crate) models: Vec<ModelTotal>,
}

/// One key's spend today, this month and in all, and its newest request, from the audit log.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyUsage {
    pub(crate) today: f64,
    pub(crate) month: f64,
    pub(crate) total: f64,
    /// RFC 3339.
    pub(crate) last: Option<String>,
}

/// The name the pages give requests refused before a key was found.
pub(crate) const NO_KEY: &str = "(no key)";

/// `at` in RFC 3339 (UTC, seconds); a time past 9999-12-31T23:59:59Z, which RFC 3339 cannot
/// write (a database may hold one), is written as that.
pub(crate) fn rfc3339(at: SystemTime) -> String {
    let latest = std::time::UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    humantime::format_rfc3339_seconds(at.min(latest)).to_string()
}

/// `YYYY-MM-DD` of `at`, in UTC.
pub(crate) fn day_of(at: SystemTime) -> String {
    rfc3339(at)[..10].to_owned()
}

fn text_of(record: &Value, field: &str) -> Option<String> {
    record.get(field).and_then(Value::as_str).map(str::to_owned)
}

/// The model a record is priced by (its canonical name), or the model as sent.
fn model_of(record: &Value) -> String {
    text_of(record, "canonical_model")
        .or_else(|| text_of(record, "model"))
        .unwrap_or_else(|| "(none)".to_owned())
}

fn cost_of(record: &Value) -> f64 {
    record
        .get("cost_usd")
        .and_then(Value::as_f64)
        .filter(|c| c.is_finite())
        .unwrap_or(0.0)
}

/// The newest [`MAX_JSONL_SCAN`] bytes of the log, whole lines only (a cut first line is
/// skipped). A missing file is empty.
fn read_jsonl(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(MAX_JSONL_SCAN);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::with_capacity((len - start) as usize);
    file.take(MAX_JSONL_SCAN).read_to_end(&mut bytes)?;
    if start > 0 {
        // The first line is cut: skip it.
        match bytes.iter().position(|b| *b == b'\n') {
            Some(i) => {
                bytes.drain(..=i);
            }
            None => bytes.clear(),
        }
    }
    Ok(bytes)
}

/// The records of `bytes` (JSON Lines), one parsed at a time, oldest first (or newest first,
/// reversed): lines that are not JSON objects are skipped. Parsed one by one, never all at
/// once: the log's records, in memory as JSON values, take ten times its bytes.
fn records(bytes: &[u8]) -> impl DoubleEndedIterator<Item = Value> + '_ {
    bytes
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
        .filter(Value::is_object)
}

/// JSON Lines logs read at once: each holds up to [`MAX_JSONL_SCAN`] bytes in memory.
static JSONL_SCANS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// `scan` of the log's newest [`MAX_JSONL_SCAN`] bytes, on a blocking thread.
async fn jsonl<T: Send + 'static>(
    path: &std::path::Path,
    scan: impl FnOnce(&[u8]) -> T + Send + 'static,
) -> Result<T, String> {
    let _permit = JSONL_SCANS
        .acquire()
        .await
        .map_err(|e| format!("the audit log reader failed: {e}"))?;
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || read_jsonl(&path).map(|bytes| scan(&bytes)))
        .await
        .map_err(|e| format!("the audit log reader failed: {e}"))?
        .map_err(|e| format!("the audit log cannot be read: {e}"))
}

fn pg_error(e: impl std::fmt::Display) -> String {
    format!("the audit database could not answer: {e}")
}

const PG_PAGE: &str = "\
SELECT record::text FROM tlp_audit
WHERE ($1::text IS NULL OR key = $1)
  AND ($2::text IS NULL OR strpos(lower(coalesce(record->>'model', '')), lower($2)) > 0)
  AND ($3::integer IS NULL OR status = $3)
  AND ($4::text IS NULL OR record->>'user' = $4)
  AND (NOT $5::boolean OR blocked_by IS NOT NULL)
  AND (NOT $6::boolean OR EXISTS (
      SELECT 1 FROM jsonb_array_elements_text(
          CASE jsonb_typeof(record->'flags') WHEN 'array' THEN record->'flags' ELSE '[]'::jsonb END
      ) AS f(flag) WHERE flag <> 'blocked'))
ORDER BY ts DESC, id DESC
LIMIT $7 OFFSET $8";

const PG_RECORD: &str =
    "SELECT record::text FROM tlp_audit WHERE request_id = $1 ORDER BY ts DESC LIMIT 1";

const PG_MODELS: &str = "\
SELECT coalesce(model, '(none)'), count(*), coalesce(sum(prompt_tokens), 0)::bigint,
       coalesce(sum(completion_tokens), 0)::bigint,
       coalesce(sum(cost_usd), 0)::double precision
FROM tlp_audit WHERE ts >= $1 AND ts < $2
GROUP BY 1 ORDER BY 5 DESC, 1 LIMIT 200";

/// The most models the spend page lists (`LIMIT` of [`PG_MODELS`]).
const MAX_MODEL_ROWS: usize = 200;

const PG_KEY_USAGE: &str = "\
SELECT key,
       coalesce(sum(cost_usd) FILTER (WHERE ts >= $2), 0)::double precision,
       coalesce(sum(cost_usd) FILTER (WHERE ts >= $3), 0)::double precision,
       coalesce(sum(cost_usd), 0)::double precision,
       max(ts)
FROM tlp_audit WHERE key = ANY($1) GROUP BY key";

impl AuditSource {
    /// Whether there is an audit log to read.
    pub(crate) fn is_some(&self) -> bool {
        !matches!(self, AuditSource::None)
    }

    /// Where the records come from, for the pages.
    pub(crate) fn describe(&self) -> String {
        match self {
            AuditSource::None => "no audit log".to_owned(),
            AuditSource::Jsonl(path) => format!(
                "the JSON Lines audit log {} (its newest {} MiB)",
                path.display(),
                MAX_JSONL_SCAN / (1024 * 1024)
            ),
            AuditSource::Postgres(_) => "the audit database (tlp_audit)".to_owned(),
        }
    }

    /// The page `query` asks for, newest first.
    pub(crate) async fn page(&self, query: &AuditQuery) -> Result<AuditPage, String> {
        match self {
            AuditSource::None => Ok(AuditPage::default()),
            AuditSource::Jsonl(path) => {
                let query = query.clone();
                jsonl(path, move |bytes| {
                    let mut matching = records(bytes).rev().filter(|r| query.matches(r));
                    let rows: Vec<Value> = matching
                        .by_ref()
                        .skip(query.page * PAGE_ROWS)
                        .take(PAGE_ROWS)
                        .collect();
                    let has_more = matching.next().is_some();
                    AuditPage { rows, has_more }
                })
                .await
            }
            AuditSource::Postgres(pool) => {
                let client = pool.get().await.map_err(pg_error)?;
                let status = query.status.map(i32::from);
                let limit = (PAGE_ROWS + 1) as i64;
                let offset = (query.page * PAGE_ROWS) as i64;
                let rows = client
                    .query(
                        PG_PAGE,
                        &[
                            &query.key,
                            &query.model,
                            &status,
                            &query.user,
                            &query.blocked,
                            &query.flagged,
                            &limit,
                            &offset,
                        ],
                    )
                    .await
                    .map_err(pg_error)?;
                let mut rows: Vec<Value> = rows
                    .iter()
                    .filter_map(|row| serde_json::from_str(row.get::<_, &str>(0)).ok())
                    .collect();
                let has_more = rows.len() > PAGE_ROWS;
                rows.truncate(PAGE_ROWS);
                Ok(AuditPage { rows, has_more })
            }
        }
    }

    /// The record of the request `id` (its newest, should a trusted client id repeat).
    pub(crate) async fn record(&self, id: &str) -> Result<Option<Value>, String> {
        match self {
            AuditSource::None => Ok(None),
            AuditSource::Jsonl(path) => {
                let id = id.to_owned();
                jsonl(path, move |bytes| {
                    records(bytes)
                        .rev()
                        .find(|r| r.get("request_id").and_then(Value::as_str) == Some(&id))
                })
                .await
            }
            AuditSource::Postgres(pool) => {
                let client = pool.get().await.map_err(pg_error)?;
                let row = client
                    .query_opt(PG_RECORD, &[&id])
                    .await
                    .map_err(pg_error)?;
                Ok(row.and_then(|row| serde_json::from_str(row.get::<_, &str>(0)).ok()))
            }
        }
    }

    /// Spend per key per day and per model, from `from` (included) to `to` (excluded).
    pub(crate) async fn spend(&self, from: SystemTime, to: SystemTime) -> Result<Spend, String> {
        match self {
            AuditSource::None => Ok(Spend::default()),
            AuditSource::Jsonl(path) => {
                let (first, last) = (day_of(from), day_of(to));
                jsonl(path, move |bytes| {
                    let mut spend = Spend::default();
                    let mut models: HashMap<String, ModelTotal> = HashMap::new();
                    for record in records(bytes) {
                        let Some(ts) = record.get("timestamp").and_then(Value::as_str) else {
                            continue;
                        };
                        let day = ts.get(..10).unwrap_or_default();
                        if day < first.as_str() || day >= last.as_str() {
                            continue;
                        }
                        let key = text_of(&record, "key").unwrap_or_else(|| NO_KEY.to_owned());
                        let cost = cost_of(&record);
                        *spend.per_day_key.entry((day.to_owned(), key)).or_default() += cost;
                        let model = model_of(&record);
                        let total = models.entry(model.clone()).or_insert_with(|| ModelTotal {
                            model,
                            ..ModelTotal::default()
                        });
                        total.requests += 1;
                        let tokens = |f: &str| record.get(f).and_then(Value::as_u64).unwrap_or(0);
                        total.prompt_tokens += tokens("prompt_tokens");
                        total.completion_tokens += tokens("completion_tokens");
                        total.cost_usd += cost;
                    }
                    spend.models = models.into_values().collect();
                    spend.models.sort_by(|a, b| {
                        b.cost_usd
                            .total_cmp(&a.cost_usd)
                            .then_with(|| a.model.cmp(&b.model))
                    });
                    // As many as the database's query gives: the model names come from clients.
                    spend.models.truncate(MAX_MODEL_ROWS);
                    spend
                })
                .await
            }
            AuditSource::Postgres(pool) => {
                let days = tower_llm_policy::postgres::spend_per_day(pool, from, to, None)
                    .await
                    .map_err(pg_error)?;
                let mut spend = Spend::default();
                for day in days {
                    let key = day.key.unwrap_or_else(|| NO_KEY.to_owned());
                    *spend.per_day_key.entry((day.day, key)).or_default() += day.cost_usd;
                }
                let client = pool.get().await.map_err(pg_error)?;
                let rows = client
                    .query(PG_MODELS, &[&from, &to])
                    .await
                    .map_err(pg_error)?;
                spend.models = rows
                    .iter()
                    .map(|row| ModelTotal {
                        model: row.get(0),
                        requests: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                        prompt_tokens: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
                        completion_tokens: u64::try_from(row.get::<_, i64>(3)).unwrap_or(0),
                        cost_usd: row.get(4),
                    })
                    .collect();
                Ok(spend)
            }
        }
    }

    /// Each of `names`' spend today, this month and in all, and its newest request.
    pub(crate) async fn key_usage(
        &self,
        names: &[String],
        now: SystemTime,
    ) -> Result<HashMap<String, KeyUsage>, String> {
        let today = day_of(now);
        let month = format!("{}-01", &today[..7]);
        match self {
            AuditSource::None => Ok(HashMap::new()),
            AuditSource::Jsonl(path) => {
                let names = names.to_vec();
                jsonl(path, move |bytes| {
                    let wanted: BTreeSet<&str> = names.iter().map(String::as_str).collect();
                    let mut usage: HashMap<String, KeyUsage> = HashMap::new();
                    for record in records(bytes) {
                        let Some(key) = record.get("key").and_then(Value::as_str) else {
                            continue;
                        };
                        if !wanted.contains(key) {
                            continue;
                        }
                        let ts = record
                            .get("timestamp")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        let cost = cost_of(&record);
                        let entry = usage.entry(key.to_owned()).or_default();
                        entry.total += cost;
                        let day = ts.get(..10).unwrap_or_default();
                        if day >= month.as_str() {
                            entry.month += cost;
                        }
                        if day == today {
                            entry.today += cost;
                        }
                        if entry.last.as_deref().is_none_or(|last| last < ts) {
                            entry.last = Some(ts.to_owned());
                        }
                    }
                    usage
                })
                .await
            }
            AuditSource::Postgres(pool) => {
                let day_start = humantime::parse_rfc3339(&format!("{today}T00:00:00Z"))
                    .map_err(|e| e.to_string())?;
                let month_start = humantime::parse_rfc3339(&format!("{month}T00:00:00Z"))
                    .map_err(|e| e.to_string())?;
                let client = pool.get().await.map_err(pg_error)?;
                let rows = client
                    .query(PG_KEY_USAGE, &[&names, &day_start, &month_start])
                    .await
                    .map_err(pg_error)?;
                Ok(rows
                    .iter()
                    .map(|row| {
                        let last: Option<SystemTime> = row.get(4);
                        (
                            row.get::<_, String>(0),
                            KeyUsage {
                                today: row.get(1),
                                month: row.get(2),
                                total: row.get(3),
                                last: last.map(rfc3339),
                            },
                        )
                    })
                    .collect())
            }
        }
    }
}

/// How long the upstream's model list is kept.
const MODELS_TTL: Duration = Duration::from_secs(60);
/// How long the console waits for the upstream's model list.
const MODELS_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest model list read: 4 MiB.
const MODELS_LIMIT: usize = 4 * 1024 * 1024;
/// The most models the picker lists (the upstream decides how many it gives).
const MAX_MODEL_CHOICES: usize = 2000;

/// The model picker's choices: the upstream's `GET /v1/models`, narrowed by `[workspace]
/// models`, kept for a minute.
pub struct Models {
    upstream: Option<Upstream>,
    workspace: Option<ModelList>,
    aliases: ModelAliases,
    cache: Mutex<Option<(Instant, Vec<String>)>>,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models")
            .field("workspace", &self.workspace)
            .finish_non_exhaustive()
    }
}

impl Models {
    /// The choices of `upstream`'s list (none: only the workspace's names), narrowed by
    /// `workspace` (resolved with `aliases`).
    pub fn new(
        upstream: Option<Upstream>,
        workspace: Option<ModelList>,
        aliases: ModelAliases,
    ) -> Self {
        Models {
            upstream,
            workspace,
            aliases,
            cache: Mutex::new(None),
        }
    }

    /// The choices, sorted; an error says why the upstream's list could not be read.
    pub(crate) async fn choices(&self) -> Result<Vec<String>, String> {
        if let Some((at, models)) = &*self.cache.lock().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < MODELS_TTL {
                return Ok(models.clone());
            }
        }
        let Some(upstream) = &self.upstream else {
            // No upstream to ask: the workspace's exact names.
            return Ok(self
                .workspace
                .iter()
                .flat_map(|list| list.entries())
                .filter(|entry| !entry.ends_with('*'))
                .cloned()
                .collect());
        };
        let request = Request::get("/v1/models")
            .body(PolicyBody::empty())
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(MODELS_TIMEOUT, upstream.clone().oneshot(request))
            .await
            .map_err(|_| "the upstream did not answer GET /v1/models in time".to_owned())?
            .unwrap_or_else(|never| match never {});
        let status = response.status();
        if !status.is_success() {
            return Err(format!(
                "the upstream answered GET /v1/models with {status}"
            ));
        }
        let bytes = tokio::time::timeout(
            MODELS_TIMEOUT,
            Limited::new(response.into_body(), MODELS_LIMIT).collect(),
        )
        .await
        .map_err(|_| "the upstream's model list did not arrive in time".to_owned())?
        .map_err(|e| format!("the upstream's model list cannot be read: {e}"))?
        .to_bytes();
        let list: Value = serde_json::from_slice(&bytes)
            .map_err(|_| "the upstream's model list is not JSON".to_owned())?;
        let mut models: Vec<String> = list
            .get("data")
            .and_then(Value::as_array)
            .map(|data| {
                data.iter()
                    .filter_map(|m| m.get("id").and_then(Value::as_str))
                    .filter(|id| !id.is_empty() && id.len() <= 200)
                    .filter(|id| {
                        self.workspace
                            .as_ref()
                            .is_none_or(|list| list.contains(&self.aliases.resolve(id)))
                    })
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        models.sort();
        models.dedup();
        // The picker's first choices only (a key's own models are listed whatever this cut).
        models.truncate(MAX_MODEL_CHOICES);
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), models.clone()));
        Ok(models)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filters_select_records() {
        let record = json!({"key": "app", "model": "gpt-4o-mini", "status": 403,
            "blocked_by": "model_allow_list", "flags": [], "user": "u1"});
        let all = AuditQuery::default();
        assert!(all.matches(&record));
        let by = |q: AuditQuery| q.matches(&record);
        assert!(by(AuditQuery {
            model: Some("4O-MI".into()),
            ..AuditQuery::default()
        }));
        assert!(!by(AuditQuery {
            key: Some("other".into()),
            ..AuditQuery::default()
        }));
        assert!(by(AuditQuery {
            status: Some(403),
            blocked: true,
            user: Some("u1".into()),
            ..AuditQuery::default()
        }));
        assert!(!by(AuditQuery {
            flagged: true,
            ..AuditQuery::default()
        }));
    }

    #[test]
    fn times_past_the_year_9999_are_written_as_its_end() {
        let far = std::time::UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59Z");
        assert_eq!(day_of(std::time::UNIX_EPOCH), "1970-01-01");
    }

    #[test]
    fn a_jsonl_log_is_read_whole_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, "{\"a\":1}\nnot json\n[1]\n{\"b\":2}\n").unwrap();
        let bytes = read_jsonl(&path).unwrap();
        let all: Vec<Value> = records(&bytes).collect();
        assert_eq!(all, vec![json!({"a": 1}), json!({"b": 2})]);
        let newest: Vec<Value> = records(&bytes).rev().collect();
        assert_eq!(newest, vec![json!({"b": 2}), json!({"a": 1})]);
        assert!(read_jsonl(&dir.path().join("missing")).unwrap().is_empty());
    }
}
