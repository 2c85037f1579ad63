//! Content guards: word lists, patterns, secrets and PII, prompt injection, moderation and
//! webhooks, a tool-call firewall, end-user checks; on requests and on responses, streamed
//! ones included (feature `guards`).
//!
//! A [`Guard`] is a named check with a [`Mode`]:
//!
//! | mode | on a request | on a response |
//! |---|---|---|
//! | [`Mode::Audit`] | flagged `guard:<name>` in the audit record, forwarded as sent | flagged, passed on as sent |
//! | [`Mode::Block`] | 400 `content_blocked` naming the guard; nothing is forwarded | the client gets the error instead of the content (a stream ends with an error event) |
//! | [`Mode::Redact`] | each match replaced by the guard's mask in the body that is forwarded | each match replaced in the content the client gets, streams included |
//!
//! A guard looks at the side(s) it is [`on`](Guard::on), at the prompt fields
//! ([`sources`](Guard::sources)) and message [`roles`](Guard::roles) it is given (all by
//! default), always at decoded text: a JSON escape such as `\u0069gnore` is read as
//! `ignore`.
//!
//! # The layer
//!
//! [`GuardLayer`] holds the guards. Those added with [`GuardLayer::guard`] apply to every
//! request (the workspace's); those added with [`GuardLayer::optional_guard`] apply to the
//! requests of keys that list them in [`ApiKey::guards`](crate::ApiKey::guards), and to
//! requests that ask for them in the [`GUARDS_HEADER`]. A key or a header can add guards,
//! never remove or weaken one; a key bound to a name the layer does not know is refused with
//! 503 `policy_unavailable` (a configuration error fails closed). Put it after
//! `PromptLimit` and before `Quota`: a request any guard refuses reserves nothing.
//!
//! On a request, in the order they were added:
//!
//! - detector guards ([`Guard::new`]) read the prompt's text parts (see
//!   [`LlmRequest::prompt_parts`](crate::LlmRequest::prompt_parts)); tool and schema
//!   definitions are read for their strings, decoded. A redaction rewrites each string of
//!   the prompt fields that holds a match (nothing else in the body changes: other members are
//!   copied byte for byte), the request is read again from the new body, and the same guards
//!   check it once more: a match the rewrite could not reach refuses the request instead of
//!   passing it. Every later layer, the price and the audit record see the redacted text.
//!   A multipart body (an image edit's `prompt`) is not rewritten: `redact` refuses it.
//! - firewall guards ([`Guard::firewall`]) check the tools a request offers;
//! - then, once every other layer decided, external guards ([`Guard::external`]) ask their
//!   [`Moderator`] about the text, in turn; a moderator that gives no verdict refuses the
//!   request with 503 `policy_unavailable`, or lets it through flagged
//!   `guard:<name>:unavailable` when the guard [fails open](Guard::fail_open).
//!
//! With [`GuardLayer::hash_end_users`], `user` and `safety_identifier` go upstream (and into the
//! record) as a salted SHA-256 of their value.
//!
//! Every guard that matched flags the audit record `guard:<name>`; a block leaves a
//! [`Rejection`](crate::Rejection) from [`LayerName::Guard`](crate::LayerName::Guard) and is
//! announced to the layer's [`AlertSink`](crate::alert::AlertSink).
//!
//! ```
//! use tower_llm_policy::guard::{Detector, Found, Guard, GuardLayer, Mode};
//!
//! /// Card-like runs of 16 digits (the built-in `Pii` detector validates them properly).
//! struct Digits16;
//!
//! impl Detector for Digits16 {
//!     fn find(&self, text: &str, found: &mut Vec<Found>) {
//!         let bytes = text.as_bytes();
//!         let mut run = 0;
//!         for (i, b) in bytes.iter().enumerate() {
//!             run = if b.is_ascii_digit() { run + 1 } else { 0 };
//!             if run == 16 && bytes.get(i + 1).is_none_or(|b| !b.is_ascii_digit()) {
//!                 found.push(Found::new(i + 1 - 16..i + 1, "card"));
//!             }
//!         }
//!     }
//!
//!     fn max_match_len(&self) -> usize {
//!         16
//!     }
//! }
//!
//! let layer = GuardLayer::new()
//!     .guard(Guard::new("cards", Digits16).mode(Mode::Redact))
//!     .hash_end_users(b"a salt of your own");
//! # let _ = layer;
//! ```

pub mod detect;
pub mod external;
mod firewall;
mod layer;
pub(crate) mod response;

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

pub use detect::{Detector, Found};
pub use external::{ModerationError, ModerationInput, Moderator, Verdict};
pub use firewall::ToolFirewall;
pub use layer::{GuardLayer, Guarded, ResponseFuture, GUARDS_HEADER};
pub use response::GuardBody;

use crate::request::{PromptPart, PromptSource, Role};

/// What a guard does with a match.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// Flag the request in the audit record and let it through unchanged.
    Audit,
    /// Refuse the request (400 `content_blocked`), or withhold the response.
    #[default]
    Block,
    /// Replace each match with the guard's mask and let the rewritten content through.
    Redact,
}

impl Mode {
    /// `"audit"`, `"block"` or `"redact"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Audit => "audit",
            Mode::Block => "block",
            Mode::Redact => "redact",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "audit" => Ok(Mode::Audit),
            "block" => Ok(Mode::Block),
            "redact" => Ok(Mode::Redact),
            other => Err(format!(
                "unknown guard mode `{other}` (audit, block or redact)"
            )),
        }
    }
}

/// Which side of an exchange a guard looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sides {
    /// The request (the prompt).
    pub request: bool,
    /// The response (the model's output).
    pub response: bool,
}

impl Sides {
    /// The request only.
    pub const REQUEST: Sides = Sides {
        request: true,
        response: false,
    };
    /// The response only.
    pub const RESPONSE: Sides = Sides {
        request: false,
        response: true,
    };
    /// Both.
    pub const BOTH: Sides = Sides {
        request: true,
        response: true,
    };
}

/// The default mask: `[REDACTED:<label>]`.
pub const DEFAULT_MASK: &str = "[REDACTED:{label}]";

/// A named content guard: a [`Detector`], a [`Mode`] and where it looks.
///
/// ```
/// use tower_llm_policy::guard::{Guard, Mode, Sides};
/// use tower_llm_policy::guard::detect::Found;
/// # struct Digits;
/// # impl tower_llm_policy::guard::Detector for Digits {
/// #     fn find(&self, text: &str, found: &mut Vec<Found>) {
/// #         for (i, c) in text.char_indices() {
/// #             if c.is_ascii_digit() { found.push(Found::new(i..i + 1, "digit")); }
/// #         }
/// #     }
/// #     fn max_match_len(&self) -> usize { 1 }
/// # }
/// let guard = Guard::new("digits", Digits).mode(Mode::Redact).on(Sides::BOTH).mask("#");
/// assert_eq!(guard.redact("call 555"), "call ###");
/// ```
#[derive(Clone)]
pub struct Guard {
    name: Arc<str>,
    kind: Kind,
    mode: Mode,
    on: Sides,
    sources: Option<Arc<[PromptSource]>>,
    roles: Option<Arc<[Role]>>,
    mask: Arc<str>,
    fail_open: bool,
}

/// What a guard checks.
#[derive(Clone)]
pub(crate) enum Kind {
    /// Matches of a detector in the text.
    Detect(Arc<dyn Detector>),
    /// Another service's verdict on the request's text.
    External(Arc<dyn Moderator>),
    /// The names of the tools a request offers and a response calls.
    Firewall(Arc<ToolFirewall>),
    /// A response that repeats this many characters (or more) of the request's system
    /// prompt in a row.
    Reflection(usize),
}

impl Kind {
    fn as_str(&self) -> &'static str {
        match self {
            Kind::Detect(_) => "detect",
            Kind::External(_) => "external",
            Kind::Firewall(_) => "firewall",
            Kind::Reflection(_) => "reflection",
        }
    }
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("name", &self.name)
            .field("kind", &self.kind.as_str())
            .field("mode", &self.mode)
            .field("on", &self.on)
            .field("sources", &self.sources)
            .field("roles", &self.roles)
            .field("mask", &self.mask)
            .finish_non_exhaustive()
    }
}

impl Guard {
    /// A guard named `name` (shown as `guard:<name>` in audit records and in block messages)
    /// that blocks requests matched by `detector`: [`Mode::Block`], on requests, every field
    /// and role, masked with [`DEFAULT_MASK`].
    pub fn new(name: impl Into<Arc<str>>, detector: impl Detector) -> Self {
        Guard::of_kind(
            name.into(),
            Kind::Detect(Arc::new(detector)),
            Sides::REQUEST,
        )
    }

    /// A guard that asks `moderator` about a request's text before it is forwarded
    /// ([`Mode::Block`] by default; [`Mode::Redact`] applies a [`Verdict::Redact`]). On
    /// requests only. Fails closed unless [`fail_open`](Self::fail_open).
    pub fn external(name: impl Into<Arc<str>>, moderator: impl Moderator) -> Self {
        Guard::of_kind(
            name.into(),
            Kind::External(Arc::new(moderator)),
            Sides::REQUEST,
        )
    }

    /// A tool-call firewall: the tools a request offers (`tools`, `functions`) and the tool
    /// calls of its response, streamed ones included, must be allowed by `firewall`. On both
    /// sides by default; [`Mode::Redact`] acts as [`Mode::Block`].
    pub fn firewall(name: impl Into<Arc<str>>, firewall: ToolFirewall) -> Self {
        Guard::of_kind(name.into(), Kind::Firewall(Arc::new(firewall)), Sides::BOTH)
    }

    /// Prompt reflection: a response that repeats `min_chars` characters or more of the
    /// request's system prompt (`system` and `developer` messages, `instructions`) in a row
    /// is flagged ([`Mode::Audit`]) or withheld ([`Mode::Block`], the default). On responses.
    pub fn reflection(name: impl Into<Arc<str>>, min_chars: usize) -> Self {
        Guard::of_kind(
            name.into(),
            Kind::Reflection(min_chars.max(1)),
            Sides::RESPONSE,
        )
    }

    fn of_kind(name: Arc<str>, kind: Kind, on: Sides) -> Self {
        Guard {
            name,
            kind,
            mode: Mode::Block,
            on,
            sources: None,
            roles: None,
            mask: Arc::from(DEFAULT_MASK),
            fail_open: false,
        }
    }

    /// For a guard that asks another service ([`Guard::external`]): let the request through
    /// (flagged `guard:<name>:unavailable`) when the service gives no verdict, instead of
    /// refusing it with 503 `policy_unavailable`.
    #[must_use]
    pub fn fail_open(mut self, open: bool) -> Self {
        self.fail_open = open;
        self
    }

    /// Sets the mode.
    #[must_use]
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the sides looked at.
    #[must_use]
    pub fn on(mut self, on: Sides) -> Self {
        self.on = on;
        self
    }

    /// Looks only at these prompt fields of a request (responses have one text: the model's).
    #[must_use]
    pub fn sources(mut self, sources: impl IntoIterator<Item = PromptSource>) -> Self {
        self.sources = Some(sources.into_iter().collect());
        self
    }

    /// Looks only at the text of messages with these roles. Text outside any message (a
    /// completions `prompt`, a string `input`) is the user's; `instructions` and tool or
    /// schema definitions are the developer's.
    #[must_use]
    pub fn roles(mut self, roles: impl IntoIterator<Item = Role>) -> Self {
        self.roles = Some(roles.into_iter().collect());
        self
    }

    /// Sets the mask that replaces each match in [`Mode::Redact`]; `{label}` in it is
    /// replaced by what was found (`email`, ...).
    #[must_use]
    pub fn mask(mut self, mask: impl Into<Arc<str>>) -> Self {
        self.mask = mask.into();
        self
    }

    /// The guard's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guard's mode.
    pub fn get_mode(&self) -> Mode {
        self.mode
    }

    /// The sides the guard looks at.
    pub fn get_on(&self) -> Sides {
        self.on
    }

    /// Whether a guard that asks another service lets requests through when it gets no
    /// verdict.
    pub fn is_fail_open(&self) -> bool {
        self.fail_open
    }

    /// The detector, for a guard made with [`Guard::new`].
    pub fn detector(&self) -> Option<&dyn Detector> {
        match &self.kind {
            Kind::Detect(d) => Some(&**d),
            _ => None,
        }
    }

    pub(crate) fn kind(&self) -> &Kind {
        &self.kind
    }

    /// Whether this guard reads `part` of a request.
    pub fn reads(&self, part: &PromptPart<'_>) -> bool {
        let source_ok = self
            .sources
            .as_deref()
            .is_none_or(|s| s.contains(&part.source));
        // A role the API does not define (`User`, `user `) is read by every role filter: a
        // lenient upstream may take it for any of them.
        source_ok
            && self.roles.as_deref().is_none_or(|roles| {
                let role = role_of(part);
                role == Role::Other || roles.contains(&role)
            })
    }

    /// Whether this guard reads a request field from `source` in a message of `role`.
    pub(crate) fn reads_field(&self, source: PromptSource, role: Option<Role>) -> bool {
        self.reads(&PromptPart {
            source,
            role,
            text: "",
        })
    }

    /// The mask for a match labelled `label`.
    pub fn mask_for(&self, label: &str) -> String {
        self.mask.replace("{label}", label)
    }

    /// `text` with every match of this guard replaced by its mask (overlapping matches are
    /// merged and masked once).
    /// Text is returned as it is by a guard without a detector.
    pub fn redact(&self, text: &str) -> String {
        let mut hits = Vec::new();
        self.hits(0, text, &mut hits);
        redact_hits(text, &mut hits, std::slice::from_ref(self))
    }

    /// Adds this guard's matches in `text` to `hits`, as the guard at `index` of a set.
    pub(crate) fn hits(&self, index: usize, text: &str, hits: &mut Vec<Hit>) {
        let Some(detector) = self.detector() else {
            return;
        };
        let mut found = Vec::new();
        detector.find(text, &mut found);
        hits.extend(found.into_iter().map(|f| Hit {
            range: f.range,
            label: f.label,
            guard: index,
        }));
    }
}

/// The role a guard's [`roles`](Guard::roles) filter sees for a part: its message's, else
/// the user's for prompt text outside messages, the developer's for instructions and
/// definitions.
pub(crate) fn role_of(part: &PromptPart<'_>) -> Role {
    part.role.unwrap_or(match part.source {
        PromptSource::Instructions | PromptSource::Tools | PromptSource::Schema => Role::Developer,
        _ => Role::User,
    })
}

/// One match of one guard of a set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Hit {
    pub(crate) range: Range<usize>,
    pub(crate) label: Cow<'static, str>,
    /// The index of the guard in the set it was found with.
    pub(crate) guard: usize,
}

/// `text` with every hit masked by its guard's mask: hits are sorted, overlapping ones merge
/// into one range masked with the mask of the one that starts first (the longest, among
/// those starting together).
pub(crate) fn redact_hits(text: &str, hits: &mut [Hit], guards: &[Guard]) -> String {
    hits.sort_by(|a, b| {
        a.range
            .start
            .cmp(&b.range.start)
            .then(b.range.end.cmp(&a.range.end))
    });
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    let mut i = 0;
    while i < hits.len() {
        let first = &hits[i];
        let mut end = first.range.end;
        let mut j = i + 1;
        while j < hits.len() && hits[j].range.start < end {
            end = end.max(hits[j].range.end);
            j += 1;
        }
        let start = first.range.start.max(at);
        out.push_str(&text[at..start]);
        out.push_str(&guards[first.guard].mask_for(&first.label));
        at = end.max(start);
        i = j;
    }
    out.push_str(&text[at..]);
    out
}
