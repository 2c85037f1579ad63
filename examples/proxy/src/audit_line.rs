//! The audit records on the console: one compact line per request, so that the embedded
//! default shows the `LogSink` half of the crate next to the policy half.
//!
//! ```text
//! audit key=demo model=gpt-4o-mini status=200 blocked_by=- tokens=1+8 cost_usd=0.00000495
//! audit key=demo model=o3-mini status=403 blocked_by=model_allow_list:model_not_allowed tokens=- cost_usd=-
//! audit key=demo model=- status=422 blocked_by=feature_block:feature_blocked tokens=- cost_usd=-
//! audit key=- model=- status=401 blocked_by=key_auth:invalid_api_key tokens=- cost_usd=-
//! ```
//!
//! The sink is the crate's own [`FnSink`] around [`AuditLine`]: the audit layer hands it each
//! [`AuditRecord`] when the response ends (streams included), and it writes the line. A
//! configuration file sends the records to `[audit] jsonl` instead, one JSON object a line with
//! every field.

use std::fmt;
use std::io::Write;
use std::sync::Arc;

use tower_llm_policy::audit::FnSink;
use tower_llm_policy::AuditRecord;

/// Where the lines go: standard output for the binary, a buffer in tests.
pub type LineWriter = Arc<dyn Fn(&str) + Send + Sync>;

/// Writes each line to standard output. Errors (a closed pipe) are ignored: the audit trail
/// on the console must never fail a request.
pub fn stdout() -> LineWriter {
    Arc::new(|line: &str| {
        let _ = writeln!(std::io::stdout().lock(), "{line}");
    })
}

/// The sink that formats every record as an [`AuditLine`] and hands it to `out`.
pub fn sink(out: LineWriter) -> FnSink<impl Fn(&AuditRecord) + Send + Sync + 'static> {
    FnSink::new(move |record: &AuditRecord| out(&AuditLine::of(record).to_string()))
}

/// The fields of an audit record the console line shows. `Display` writes the line:
/// `audit key=.. model=.. status=.. blocked_by=.. tokens=<prompt>+<completion> cost_usd=..`,
/// every field always present, `-` for what the record does not know.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditLine<'a> {
    /// The key's name (never the key); `None` when no key was recognised.
    pub key: Option<&'a str>,
    /// The model the client asked for.
    pub model: Option<&'a str>,
    /// The response status.
    pub status: Option<u16>,
    /// The policy layer that rejected the request.
    pub blocked_by: Option<&'a str>,
    /// The rejection's error code.
    pub code: Option<&'a str>,
    /// Prompt tokens, as the upstream reported them.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens, as the upstream reported them.
    pub completion_tokens: Option<u64>,
    /// The request's cost in USD (`None` without usage or without a price).
    pub cost_usd: Option<f64>,
}

impl<'a> AuditLine<'a> {
    /// The line's fields of `record`.
    pub fn of(record: &'a AuditRecord) -> Self {
        AuditLine {
            key: record.key.as_deref(),
            model: record.model.as_deref(),
            status: record.status,
            blocked_by: record.blocked_by.as_deref(),
            code: record.code.as_deref(),
            prompt_tokens: record.prompt_tokens,
            completion_tokens: record.completion_tokens,
            cost_usd: record.cost_usd,
        }
    }
}

impl fmt::Display for AuditLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("audit key=")?;
        text(f, self.key)?;
        f.write_str(" model=")?;
        text(f, self.model)?;
        match self.status {
            Some(status) => write!(f, " status={status}")?,
            None => f.write_str(" status=-")?,
        }
        f.write_str(" blocked_by=")?;
        match (self.blocked_by, self.code) {
            (Some(layer), Some(code)) => {
                text(f, Some(layer))?;
                f.write_str(":")?;
                text(f, Some(code))?;
            }
            (layer, _) => text(f, layer)?,
        }
        f.write_str(" tokens=")?;
        match (self.prompt_tokens, self.completion_tokens) {
            (None, None) => f.write_str("-")?,
            (prompt, completion) => {
                count(f, prompt)?;
                f.write_str("+")?;
                count(f, completion)?;
            }
        }
        f.write_str(" cost_usd=")?;
        match self.cost_usd {
            Some(cost) if cost.is_finite() => {
                // Eight decimals (a hundredth of a micro-dollar), trailing zeros dropped.
                let fixed = format!("{cost:.8}");
                let trimmed = fixed.trim_end_matches('0').trim_end_matches('.');
                f.write_str(if trimmed.is_empty() { "0" } else { trimmed })
            }
            _ => f.write_str("-"),
        }
    }
}

/// A client-supplied text (a model name can be anything): as is when it is a plain word,
/// quoted and escaped otherwise, so that one record stays one line of `name=value` pairs.
fn text(f: &mut fmt::Formatter<'_>, value: Option<&str>) -> fmt::Result {
    match value {
        None => f.write_str("-"),
        Some(v)
            if !v.is_empty()
                && v != "-"
                && v.chars()
                    .all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '=' | '\\')) =>
        {
            f.write_str(v)
        }
        Some(v) => write!(f, "{v:?}"),
    }
}

fn count(f: &mut fmt::Formatter<'_>, value: Option<u64>) -> fmt::Result {
    match value {
        Some(n) => write!(f, "{n}"),
        None => f.write_str("?"),
    }
}

#[cfg(test)]
mod tests {
    use super::AuditLine;

    #[test]
    fn a_completed_request_shows_its_tokens_and_cost() {
        let line = AuditLine {
            key: Some("demo"),
            model: Some("gpt-4o-mini"),
            status: Some(200),
            prompt_tokens: Some(3),
            completion_tokens: Some(8),
            cost_usd: Some(0.000_005_25),
            ..AuditLine::default()
        };
        assert_eq!(
            line.to_string(),
            "audit key=demo model=gpt-4o-mini status=200 blocked_by=- tokens=3+8 \
             cost_usd=0.00000525"
        );
    }

    #[test]
    fn a_rejected_request_names_the_layer_and_the_code() {
        let line = AuditLine {
            key: Some("demo"),
            model: Some("dall-e-3"),
            status: Some(403),
            blocked_by: Some("model_allow_list"),
            code: Some("model_not_allowed"),
            ..AuditLine::default()
        };
        assert_eq!(
            line.to_string(),
            "audit key=demo model=dall-e-3 status=403 \
             blocked_by=model_allow_list:model_not_allowed tokens=- cost_usd=-"
        );
    }

    #[test]
    fn unknown_fields_are_dashes_and_odd_texts_are_quoted() {
        assert_eq!(
            AuditLine::default().to_string(),
            "audit key=- model=- status=- blocked_by=- tokens=- cost_usd=-"
        );
        let line = AuditLine {
            model: Some("gpt 4o\nstatus=200"),
            prompt_tokens: Some(12),
            cost_usd: Some(1.5),
            ..AuditLine::default()
        };
        let text = line.to_string();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert_eq!(
            text,
            "audit key=- model=\"gpt 4o\\nstatus=200\" status=- blocked_by=- tokens=12+? \
             cost_usd=1.5"
        );
        let zero = AuditLine {
            cost_usd: Some(0.0),
            ..AuditLine::default()
        };
        assert!(zero.to_string().ends_with(" cost_usd=0"), "{zero}");
    }
}
