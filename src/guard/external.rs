//! Guards that ask another service: the [`Moderator`] trait, OpenAI-compatible moderation and
//! a webhook.

use std::fmt;

use crate::keys::BoxFuture;

/// What a [`Moderator`] is asked about: the request's text, part by part.
#[derive(Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ModerationInput {
    /// The text parts the guard reads, in body order (decoded).
    pub texts: Vec<String>,
    /// The key's name, when a key was authenticated.
    pub key: Option<String>,
    /// The model the request runs (canonical name), when known.
    pub model: Option<String>,
}

impl fmt::Debug for ModerationInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // User content: sizes, never the text.
        f.debug_struct("ModerationInput")
            .field("texts", &self.texts.len())
            .field("chars", &self.texts.iter().map(|t| t.len()).sum::<usize>())
            .field("key", &self.key)
            .field("model", &self.model)
            .finish()
    }
}

/// A [`Moderator`]'s answer.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Nothing to object to.
    Allow,
    /// Flagged, in these categories (`harassment`, `violence`, ...): blocked or flagged as
    /// the guard's mode says.
    Flag {
        /// The categories flagged (may be empty).
        categories: Vec<String>,
    },
    /// The text, rewritten: one text per text given, in the same order. Applied when the
    /// guard's mode is [`Redact`](super::Mode::Redact); otherwise taken as a flag.
    Redact {
        /// The rewritten texts.
        texts: Vec<String>,
    },
}

impl fmt::Debug for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Allow => f.write_str("Allow"),
            Verdict::Flag { categories } => f
                .debug_struct("Flag")
                .field("categories", categories)
                .finish(),
            Verdict::Redact { texts } => f
                .debug_struct("Redact")
                .field("texts", &texts.len())
                .finish(),
        }
    }
}

/// Why a [`Moderator`] gave no verdict (unreachable, an error status, an answer it could not
/// read, too slow). The guard then fails open or closed, as configured.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ModerationError(pub String);

/// A guard that asks another service about the request's text before it is forwarded.
pub trait Moderator: Send + Sync + 'static {
    /// Decides on `input`.
    fn moderate(
        &self,
        input: ModerationInput,
    ) -> BoxFuture<'static, Result<Verdict, ModerationError>>;
}
