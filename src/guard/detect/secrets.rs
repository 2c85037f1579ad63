//! [`Secrets`]: API keys, tokens and private keys.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::OnceLock;

use super::patterns::{Check, Patterns, Rule};
use super::{ConfigError, Detector, Found};

/// The labels of [`Secrets`], as [`ConfigError::UnknownLabel`] lists them.
const KNOWN: &str = "openai_key, anthropic_key, aws_access_key_id, aws_secret_key, \
                     github_token, slack_token, slack_webhook, google_api_key, stripe_key, jwt, \
                     private_key";

/// The longest private key body between its `BEGIN` and `END` lines (an RSA 4096 key in
/// PKCS #8 is about 3.2 KiB).
const PRIVATE_KEY_BODY: &str = "4096";

/// (label, pattern, validator). Patterns are case-sensitive.
fn specs() -> [(&'static str, String, Check); 11] {
    [
        (
            "openai_key",
            r"sk-[A-Za-z0-9_-]{32,256}".into(),
            openai_key,
        ),
        (
            "anthropic_key",
            r"sk-ant-[a-z]{3,8}[0-9]{2}-[A-Za-z0-9_-]{32,256}".into(),
            token,
        ),
        (
            "aws_access_key_id",
            r"(?:AKIA|ASIA)[A-Z0-9]{16}".into(),
            token,
        ),
        (
            "aws_secret_key",
            r#"(?i:aws_?secret_?(?:access_?)?key)["']?[ \t]{0,4}(?:=|:|:=|=>)[ \t]{0,4}["']?[A-Za-z0-9/+]{40}"#
                .into(),
            aws_secret_key,
        ),
        (
            "github_token",
            r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82}".into(),
            token,
        ),
        (
            "slack_token",
            r"xox[abposr]-[A-Za-z0-9-]{10,250}".into(),
            slack_token,
        ),
        (
            "slack_webhook",
            r"https://hooks\.slack\.com/services/T[A-Z0-9]{8,12}/B[A-Z0-9]{8,12}/[A-Za-z0-9]{24}"
                .into(),
            token_end,
        ),
        ("google_api_key", r"AIza[0-9A-Za-z_-]{35}".into(), token),
        (
            "stripe_key",
            r"(?:sk|rk)_live_[0-9A-Za-z]{24,247}".into(),
            token,
        ),
        (
            "jwt",
            r"eyJ[A-Za-z0-9_-]{8,512}\.eyJ[A-Za-z0-9_-]{8,2048}\.[A-Za-z0-9_-]{16,512}".into(),
            token,
        ),
        (
            "private_key",
            format!(
                r"-----BEGIN (?:[A-Z0-9]{{1,16}} ){{0,3}}PRIVATE KEY-----(?:[A-Za-z0-9+/=:,. \t\r\n\\-]{{0,{PRIVATE_KEY_BODY}}}?-----END (?:[A-Z0-9]{{1,16}} ){{0,3}}PRIVATE KEY-----)?"
            ),
            always,
        ),
    ]
}

fn rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| {
        specs()
            .into_iter()
            .map(|(label, pattern, check)| {
                match Rule::new(Cow::Borrowed(label), &pattern, false, Some(check)) {
                    Ok(rule) => rule,
                    // Constant patterns; a unit test compiles each.
                    Err(e) => unreachable!("built-in secret pattern {label}: {e}"),
                }
            })
            .collect()
    })
}

/// Finds API keys, tokens and private keys, each with its label:
///
/// | label | what |
/// |---|---|
/// | `openai_key` | OpenAI API keys: `sk-` and 32 to 256 characters of `[A-Za-z0-9_-]` with upper and lower case letters and digits (`sk-proj-…`, `sk-svcacct-…`, `sk-admin-…`, legacy `sk-…`) |
/// | `anthropic_key` | Anthropic keys: `sk-ant-api03-…`, `sk-ant-admin01-…` |
/// | `aws_access_key_id` | `AKIA` or `ASIA` and 16 capitals or digits |
/// | `aws_secret_key` | 40 base64 characters, only as the value of an `aws_secret_access_key`-like name (`=`, `:`, quoted or not): the name and the value are the match |
/// | `github_token` | `ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_` and 36 characters; `github_pat_` and 82 |
/// | `slack_token` | `xoxa-`, `xoxb-`, `xoxp-`, `xoxo-`, `xoxr-`, `xoxs-` tokens (with a digit) |
/// | `slack_webhook` | `https://hooks.slack.com/services/T…/B…/…` |
/// | `google_api_key` | `AIza` and 35 characters |
/// | `stripe_key` | live secret and restricted keys: `sk_live_…`, `rk_live_…` |
/// | `jwt` | three base64url segments, the first two JSON objects (`eyJ…`): header up to 512, payload up to 2048, signature 16 to 512 characters |
/// | `private_key` | a PEM private key (`-----BEGIN [RSA/EC/OPENSSH/ENCRYPTED] PRIVATE KEY-----`): through its `END` line when that comes within 4 KiB, else the `BEGIN` line alone |
///
/// Tokens must stand alone: a letter, digit, `+`, `/`, `_` or `-` right before or after one
/// means it is part of something longer (a base64 blob that happens to contain `AKIA…`), and
/// it is not reported. Patterns are case-sensitive. Low false positives come first: a bare
/// 40-character string is not reported as an AWS secret key.
///
/// [`max_match_len`](Detector::max_match_len) is about 4.2 KiB with `private_key` (the
/// key's body), 3.1 KiB with `jwt`, under 300 bytes for the others: a stream guard holds
/// back that much text; leave out what you do not need with [`only`](Self::only).
///
/// ```
/// use tower_llm_policy::guard::detect::{Detector, Secrets};
///
/// let secrets = Secrets::only(["aws_access_key_id", "github_token"])?;
/// let text = "export AWS_ACCESS_KEY_ID=AKIAQ3EGRC7XTNWZ5K2P # and ghp_none";
/// let mut found = Vec::new();
/// secrets.find(text, &mut found);
/// assert_eq!(found.len(), 1);
/// assert_eq!(found[0].label, "aws_access_key_id");
/// assert_eq!(&text[found[0].range.clone()], "AKIAQ3EGRC7XTNWZ5K2P");
/// # Ok::<(), tower_llm_policy::guard::detect::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Secrets {
    patterns: Patterns,
}

impl Secrets {
    /// Every built-in secret (see the table).
    pub fn all() -> Self {
        Secrets {
            patterns: Patterns::from_rules(rules().to_vec()),
        }
    }

    /// The built-in secrets with these labels.
    ///
    /// # Errors
    ///
    /// [`ConfigError::UnknownLabel`] (listing the known labels) for a label not in the
    /// table, [`ConfigError::NoPatterns`] for no labels.
    pub fn only<I>(labels: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Ok(Secrets {
            patterns: select(rules(), labels, KNOWN)?,
        })
    }

    /// The labels this detector reports.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.patterns.labels()
    }
}

/// The rules with these labels.
pub(crate) fn select<I>(
    rules: &[Rule],
    labels: I,
    known: &'static str,
) -> Result<Patterns, ConfigError>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let mut chosen: Vec<Rule> = Vec::new();
    for label in labels {
        let label = label.as_ref();
        let mut any = false;
        for rule in rules.iter().filter(|r| r.label == label) {
            any = true;
            if !chosen
                .iter()
                .any(|c| c.regex.as_str() == rule.regex.as_str())
            {
                chosen.push(rule.clone());
            }
        }
        if !any {
            return Err(ConfigError::UnknownLabel {
                label: label.to_string(),
                known,
            });
        }
    }
    if chosen.is_empty() {
        return Err(ConfigError::NoPatterns);
    }
    Ok(Patterns::from_rules(chosen))
}

impl Detector for Secrets {
    fn find(&self, text: &str, found: &mut Vec<Found>) {
        self.patterns.find(text, found);
    }

    fn max_match_len(&self) -> usize {
        self.patterns.max_match_len()
    }

    fn context(&self) -> usize {
        self.patterns.context()
    }
}

/// A character that continues a token (base64, base64url, hex, ids).
pub(crate) fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '_' | '-')
}

/// No token character right before `range`.
pub(crate) fn token_start(text: &str, range: &Range<usize>) -> bool {
    !text[..range.start]
        .chars()
        .next_back()
        .is_some_and(token_char)
}

/// No token character right after `range`.
fn token_end(text: &str, range: Range<usize>) -> bool {
    !text[range.end..].chars().next().is_some_and(token_char)
}

/// Stands alone: no token character right before or after.
fn token(text: &str, range: Range<usize>) -> bool {
    token_start(text, &range) && token_end(text, range)
}

fn always(_: &str, _: Range<usize>) -> bool {
    true
}

/// Upper and lower case letters and digits: a random key, not a word.
fn mixed(s: &str) -> bool {
    s.bytes().any(|b| b.is_ascii_uppercase())
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && s.bytes().any(|b| b.is_ascii_digit())
}

fn openai_key(text: &str, range: Range<usize>) -> bool {
    let key = &text[range.clone()];
    !key.starts_with("sk-ant-") && mixed(key) && token(text, range)
}

fn aws_secret_key(text: &str, range: Range<usize>) -> bool {
    // The name may follow `_` (`MY_AWS_SECRET_ACCESS_KEY`), not a letter or digit.
    let before = text[..range.start].chars().next_back();
    let value = &text[range.end.saturating_sub(40)..range.end];
    !before.is_some_and(|c| c.is_ascii_alphanumeric()) && mixed(value) && token_end(text, range)
}

fn slack_token(text: &str, range: Range<usize>) -> bool {
    text[range.clone()]
        .bytes()
        .skip(5)
        .any(|b| b.is_ascii_digit())
        && token(text, range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pattern_compiles() {
        assert_eq!(rules().len(), 11);
        let secrets = Secrets::all();
        assert!(
            secrets.max_match_len() < 4400,
            "{}",
            secrets.max_match_len()
        );
        assert_eq!(secrets.labels().collect::<Vec<_>>().join(", "), KNOWN);
    }

    #[test]
    fn only_refuses_unknown_labels() {
        let err = Secrets::only(["jwt", "password"]).unwrap_err();
        assert_eq!(
            err,
            ConfigError::UnknownLabel {
                label: "password".into(),
                known: KNOWN
            }
        );
        assert!(err.to_string().contains("openai_key"));
        assert_eq!(
            Secrets::only(Vec::<String>::new()).unwrap_err(),
            ConfigError::NoPatterns
        );
        let small = Secrets::only(["aws_access_key_id"]).unwrap();
        assert_eq!(small.max_match_len(), 20);
    }

    #[test]
    fn validators() {
        assert!(mixed("aB3"));
        assert!(!mixed("ab3"));
        assert!(!mixed("AB3"));
        assert!(!mixed("aBc"));
        assert!(token("x AKIA y", 2..6));
        assert!(!token("xAKIA y", 1..5));
        assert!(!token("x AKIA+", 2..6));
        assert!(!token("/AKIA ", 1..5));
        assert!(token_end("AKIA.", 0..4));
    }
}
