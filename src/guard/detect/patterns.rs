//! [`Patterns`]: labelled regular expressions; and the scan that [`Secrets`](super::Secrets)
//! and [`Pii`](super::Pii) share.

use std::borrow::Cow;
use std::ops::Range;

use regex::{Regex, RegexBuilder};
use regex_syntax::hir::Look;

use super::{ConfigError, Detector, Found};

/// Bytes either side of a match that a [`Check`] may look at (two characters).
pub(crate) const CHECK_CONTEXT: usize = 8;

/// A validator run on a regex candidate: the whole text and the candidate's range. It may
/// look at most [`CHECK_CONTEXT`] bytes outside the range.
pub(crate) type Check = fn(&str, Range<usize>) -> bool;

/// One labelled regex (and its validator).
#[derive(Clone, Debug)]
pub(crate) struct Rule {
    pub(crate) label: Cow<'static, str>,
    pub(crate) regex: Regex,
    pub(crate) check: Option<Check>,
    /// The longest match, in bytes.
    pub(crate) max_len: usize,
}

impl Rule {
    /// Compiles `pattern`, refusing what cannot be scanned a window at a time.
    pub(crate) fn new(
        label: Cow<'static, str>,
        pattern: &str,
        case_insensitive: bool,
        check: Option<Check>,
    ) -> Result<Rule, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            label: label.to_string(),
            message,
        };
        let hir = regex_syntax::ParserBuilder::new()
            .case_insensitive(case_insensitive)
            .build()
            .parse(pattern)
            .map_err(|e| invalid(e.to_string()))?;
        let props = hir.properties();
        let looks = props.look_set();
        let max_len = match (props.minimum_len(), props.maximum_len()) {
            (None, _) => Err(ConfigError::NeverMatches {
                label: label.to_string(),
            }),
            (Some(0), _) => Err(ConfigError::EmptyMatch {
                label: label.to_string(),
            }),
            (_, None) => Err(ConfigError::Unbounded {
                label: label.to_string(),
            }),
            _ if looks.contains(Look::Start) || looks.contains(Look::End) => {
                Err(ConfigError::Anchored {
                    label: label.to_string(),
                })
            }
            (Some(_), Some(max_len)) => Ok(max_len),
        }?;
        let regex = RegexBuilder::new(pattern)
            .case_insensitive(case_insensitive)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Rule {
            label,
            regex,
            check,
            max_len,
        })
    }

    /// Appends the matches of this rule in `text`.
    ///
    /// Every start position is tried (the regex's leftmost-first match from there), not just
    /// the ones after the previous match: which matches a left-to-right scan finds depends on
    /// where it started, and a stream starts anywhere. A match inside an earlier accepted one
    /// (same or earlier end) is left out, so `john@example.com` is one match, not one per
    /// suffix. That looks back at most [`max_len`](Self::max_len) bytes: a detector's
    /// context is `max_len + CHECK_CONTEXT`.
    ///
    /// Linear in practice: a search resumes from the next start only after a match, and a
    /// match is at most `max_len` long.
    pub(crate) fn scan(&self, text: &str, found: &mut Vec<Found>) {
        let mut at = 0;
        let mut covered = 0;
        while let Some(m) = self.regex.find_at(text, at) {
            let range = m.range();
            if range.end > covered && self.check.is_none_or(|check| check(text, range.clone())) {
                covered = range.end;
                found.push(Found::new(range.clone(), self.label.clone()));
            }
            // The next start: one character on.
            let step = text[range.start..].chars().next().map_or(1, char::len_utf8);
            at = range.start + step;
            if at > text.len() {
                break;
            }
        }
    }
}

/// Finds labelled regular expressions (the [`regex`](https://docs.rs/regex) crate: linear
/// time, no backtracking), case-insensitive unless made [`case_sensitive`](Self::case_sensitive)
/// (or `(?-i)` in a pattern).
///
/// Texts are scanned a window at a time (streams), so a pattern must have a longest match:
/// unbounded repetition (`+`, `*`, `{n,}`) is refused with an error that says how to bound
/// it (`[a-z0-9]{1,64}`), and so are patterns that can match the empty string and anchors
/// at the start or end of the whole text (`^`, `$`, `\A`, `\z`; the line anchors `(?m)^`,
/// `(?m)$` and word boundaries `\b` are fine). Every start position is tried; a match that
/// lies inside an earlier match of the same pattern is left out.
///
/// Speed: patterns with a literal part (`TICKET-`, `.corp.example.com`) are found with
/// memchr-like prefilters at gigabytes per second. `\b` is Unicode-aware, and on text that is
/// not ASCII the regex crate runs it in a slower engine (about 20 MB/s instead of 500 in
/// release builds): write `(?-u:\b)` when the words around it are ASCII.
///
/// ```
/// use tower_llm_policy::guard::detect::{ConfigError, Detector, Patterns};
///
/// let patterns = Patterns::new([
///     ("ticket", r"\bTICKET-[0-9]{1,8}\b"),
///     ("internal_host", r"\b[a-z0-9-]{1,63}\.corp\.example\.com\b"),
/// ])?;
/// let text = "see ticket-4711 on build-7.corp.example.com";
/// let mut found = Vec::new();
/// patterns.find(text, &mut found);
/// let hits: Vec<(&str, &str)> =
///     found.iter().map(|f| (&*f.label, &text[f.range.clone()])).collect();
/// assert_eq!(hits, [("ticket", "ticket-4711"), ("internal_host", "build-7.corp.example.com")]);
///
/// let unbounded = Patterns::new([("id", r"ID-[0-9]+")]).unwrap_err();
/// assert!(matches!(unbounded, ConfigError::Unbounded { .. }));
/// assert!(unbounded.to_string().contains("{1,64}"));
/// # Ok::<(), ConfigError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Patterns {
    rules: Vec<Rule>,
    max_len: usize,
}

impl Patterns {
    /// Case-insensitive patterns, each with its label.
    ///
    /// # Errors
    ///
    /// [`ConfigError::NoPatterns`], [`ConfigError::BlankLabel`], and for a pattern:
    /// [`ConfigError::Invalid`] (does not compile), [`ConfigError::EmptyMatch`],
    /// [`ConfigError::NeverMatches`], [`ConfigError::Unbounded`], [`ConfigError::Anchored`].
    pub fn new<I, L, P>(patterns: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (L, P)>,
        L: Into<Cow<'static, str>>,
        P: AsRef<str>,
    {
        Patterns::build(patterns, true)
    }

    /// Case-sensitive patterns, each with its label (`(?i)` in a pattern still makes it
    /// case-insensitive).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn case_sensitive<I, L, P>(patterns: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (L, P)>,
        L: Into<Cow<'static, str>>,
        P: AsRef<str>,
    {
        Patterns::build(patterns, false)
    }

    fn build<I, L, P>(patterns: I, case_insensitive: bool) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (L, P)>,
        L: Into<Cow<'static, str>>,
        P: AsRef<str>,
    {
        let mut rules = Vec::new();
        for (index, (label, pattern)) in patterns.into_iter().enumerate() {
            let label = label.into();
            if label.trim().is_empty() {
                return Err(ConfigError::BlankLabel { index });
            }
            rules.push(Rule::new(label, pattern.as_ref(), case_insensitive, None)?);
        }
        if rules.is_empty() {
            return Err(ConfigError::NoPatterns);
        }
        Ok(Patterns::from_rules(rules))
    }

    pub(crate) fn from_rules(rules: Vec<Rule>) -> Self {
        let max_len = rules.iter().map(|r| r.max_len).max().unwrap_or(0);
        Patterns { rules, max_len }
    }

    /// The labels, in order (a label given to several patterns repeats).
    pub(crate) fn labels(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| &*r.label)
    }
}

impl Detector for Patterns {
    fn find(&self, text: &str, found: &mut Vec<Found>) {
        for rule in &self.rules {
            rule.scan(text, found);
        }
    }

    fn max_match_len(&self) -> usize {
        self.max_len
    }

    fn context(&self) -> usize {
        self.max_len + CHECK_CONTEXT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hits(p: &Patterns, text: &str) -> Vec<String> {
        let mut found = Vec::new();
        p.find(text, &mut found);
        found
            .iter()
            .map(|f| text[f.range.clone()].to_string())
            .collect()
    }

    #[test]
    fn refused_patterns_say_why() {
        let err = |re: &str| Patterns::new([("x", re)]).unwrap_err();
        assert!(matches!(err("a+"), ConfigError::Unbounded { .. }));
        assert!(matches!(err("a{2,}"), ConfigError::Unbounded { .. }));
        assert!(matches!(err("a*"), ConfigError::EmptyMatch { .. }));
        assert!(matches!(err(r"\b"), ConfigError::EmptyMatch { .. }));
        assert!(matches!(err("^abc"), ConfigError::Anchored { .. }));
        assert!(matches!(err(r"abc\z"), ConfigError::Anchored { .. }));
        assert!(matches!(err(r"[a&&b]"), ConfigError::NeverMatches { .. }));
        assert!(matches!(err("(abc"), ConfigError::Invalid { .. }));
        assert!(Patterns::new([("x", "(?m)^abc$")]).is_ok());
        assert_eq!(
            Patterns::new(Vec::<(&'static str, &str)>::new()).unwrap_err(),
            ConfigError::NoPatterns
        );
        assert_eq!(
            Patterns::new([(" ", "a")]).unwrap_err(),
            ConfigError::BlankLabel { index: 0 }
        );
    }

    #[test]
    fn case_insensitive_by_default() {
        let p = Patterns::new([("x", "abc")]).unwrap();
        assert_eq!(hits(&p, "ABC abc"), ["ABC", "abc"]);
        let p = Patterns::case_sensitive([("x", "abc")]).unwrap();
        assert_eq!(hits(&p, "ABC abc"), ["abc"]);
    }

    #[test]
    fn every_start_is_tried_and_inner_matches_left_out() {
        let p = Patterns::new([("a", "a{1,3}")]).unwrap();
        let mut found = Vec::new();
        p.find("aaaa", &mut found);
        let ranges: Vec<_> = found.iter().map(|f| f.range.clone()).collect();
        assert_eq!(ranges, [0..3, 1..4]);
        assert_eq!(p.max_match_len(), 3);
        assert_eq!(p.context(), 3 + CHECK_CONTEXT);
    }

    #[test]
    fn max_len_counts_bytes() {
        let p = Patterns::new([("x", r"\w{1,4}")]).unwrap();
        assert_eq!(p.max_match_len(), 16);
    }
}
