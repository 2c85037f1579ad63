//! What a content guard looks for: the [`Detector`] trait and the built-in detectors.
//!
//! A detector reads *decoded* text (JSON escapes already resolved: `\u0069gnore` reaches it as
//! `ignore`) and reports the byte ranges it matches. Every built-in detector runs in time
//! linear in the text (aho-corasick automata and the `regex` crate, which has no
//! backtracking), downloads nothing and allocates only for what it finds.

pub mod injection;

use std::borrow::Cow;
use std::ops::Range;

// Word lists, patterns, secrets and PII (one group, to ease merging).
mod normalize;
mod patterns;
mod pii;
mod secrets;
mod words;
pub use injection::{Injection, InjectionFamily, InjectionLanguage};
pub use patterns::Patterns;
pub use pii::Pii;
pub use secrets::Secrets;
pub use words::WordList;

/// One match of a [`Detector`] in a text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Where the match is, in bytes of the text given to [`Detector::find`] (always on
    /// character boundaries).
    pub range: Range<usize>,
    /// What was found (`email`, `openai_key`, `profanity`, ...): shown in audit flags, block
    /// messages and `{label}` in masks. Never the matched text itself.
    pub label: Cow<'static, str>,
}

impl Found {
    /// A match of `range` labelled `label`.
    pub fn new(range: Range<usize>, label: impl Into<Cow<'static, str>>) -> Self {
        Found {
            range,
            label: label.into(),
        }
    }
}

/// Finds what a guard looks for in a text.
///
/// # Locality
///
/// Response streams are scanned as they arrive, a window at a time, and must give the same
/// result as a scan of the whole text. So a detector must be *local*: whether a range
/// `[s, e)` matches may depend on the text in it and on at most [`context`](Self::context)
/// bytes on either side, and no match is longer than [`max_match_len`](Self::max_match_len)
/// bytes. Matches may overlap; guards merge them.
pub trait Detector: Send + Sync + 'static {
    /// Appends every match in `text` to `found`.
    fn find(&self, text: &str, found: &mut Vec<Found>);

    /// The longest match, in bytes. A stream holds back less than this many bytes of text it
    /// has not yet passed on.
    fn max_match_len(&self) -> usize;

    /// How many bytes around a match can decide whether it is one (word boundaries,
    /// validators that look at neighbours). 4 by default: one character either side.
    fn context(&self) -> usize {
        4
    }
}

impl<D: Detector + ?Sized> Detector for std::sync::Arc<D> {
    fn find(&self, text: &str, found: &mut Vec<Found>) {
        (**self).find(text, found)
    }

    fn max_match_len(&self) -> usize {
        (**self).max_match_len()
    }

    fn context(&self) -> usize {
        (**self).context()
    }
}

/// Why a built-in detector refused its configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A word list with no entries.
    #[error("a word list needs at least one entry")]
    NoWords,
    /// A word list entry that is empty or only white space (it would match everywhere).
    #[error("word list entry {index} is empty or blank")]
    BlankWord {
        /// Its position in the list, from 0.
        index: usize,
    },
    /// A pattern list with no patterns.
    #[error("a pattern list needs at least one pattern")]
    NoPatterns,
    /// A pattern with an empty label.
    #[error("pattern {index} has an empty label")]
    BlankLabel {
        /// Its position in the list, from 0.
        index: usize,
    },
    /// A pattern that does not compile.
    #[error("pattern `{label}` does not compile: {message}")]
    Invalid {
        /// The pattern's label.
        label: String,
        /// What the regex parser said.
        message: String,
    },
    /// A pattern that can match the empty string (it would match everywhere).
    #[error("pattern `{label}` can match the empty string: require at least one character")]
    EmptyMatch {
        /// The pattern's label.
        label: String,
    },
    /// A pattern that can never match anything.
    #[error("pattern `{label}` can never match")]
    NeverMatches {
        /// The pattern's label.
        label: String,
    },
    /// A pattern with no longest match (`+`, `*` or `{n,}`): streams are scanned a window at
    /// a time, so every match must have a bounded length.
    #[error(
        "pattern `{label}` has unbounded repetition (`+`, `*` or `{{n,}}`): \
         bound it, e.g. `[a-z0-9]{{1,64}}` instead of `[a-z0-9]+`"
    )]
    Unbounded {
        /// The pattern's label.
        label: String,
    },
    /// A pattern anchored at the start or end of the whole text (`^`, `$`, `\A`, `\z`
    /// without `(?m)`): streams are scanned a window at a time, so use line anchors
    /// (`(?m)^`, `(?m)$`) or word boundaries (`\b`).
    #[error(
        "pattern `{label}` is anchored at the start or end of the text (`^`, `$`, `\\A`, \
         `\\z`): texts are scanned in windows; use `(?m)^`/`(?m)$` or `\\b`"
    )]
    Anchored {
        /// The pattern's label.
        label: String,
    },
    /// A label that a built-in detector does not have.
    #[error("unknown label `{label}` (known: {known})")]
    UnknownLabel {
        /// The label asked for.
        label: String,
        /// The labels there are, comma-separated.
        known: &'static str,
    },
}
