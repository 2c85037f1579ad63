//! What a content guard looks for: the [`Detector`] trait and the built-in detectors.
//!
//! A detector reads *decoded* text (JSON escapes already resolved: `\u0069gnore` reaches it as
//! `ignore`) and reports the byte ranges it matches. Every built-in detector runs in time
//! linear in the text (aho-corasick automata and the `regex` crate, which has no
//! backtracking), downloads nothing and allocates only for what it finds.

pub mod injection;

use std::borrow::Cow;
use std::ops::Range;

pub use injection::{Injection, InjectionFamily, InjectionLanguage};

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
