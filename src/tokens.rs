//! Prompt token counting for the prompt limit.
//!
//! A [`TokenCounter`] counts the tokens of a piece of prompt text with one of OpenAI's
//! byte-pair encodings ([`Encoding`]). How exact the count is depends on the `tokens` cargo
//! feature:
//!
//! | feature `tokens` | counts                                                          | [`TokenCounter::is_exact`] |
//! |------------------|-----------------------------------------------------------------|----------------------------|
//! | on               | exact, with the vocabularies embedded in `bpe-openai` (no network) | `true`                  |
//! | off              | an estimate, [`estimate`]: ⌈characters / 4⌉                      | `false`                    |
//!
//! Callers that show a count (in an error body, an audit record) should use
//! [`TokenCounter::is_exact`] to label an estimate as one.
//!
//! # What is counted
//!
//! - **Text**: [`TokenCounter::count`] and [`TokenCounter::count_up_to`]. Text is counted as
//!   *ordinary* text: a special-token string such as `<|endoftext|>` inside a prompt is counted
//!   by its characters, as OpenAI's API treats it in user content.
//! - **Chat messages** add a fixed overhead for the message framing: see [`chat_overhead`].
//! - **Token-array prompts** (`"prompt": [1734, 995]`, as the completions and embeddings
//!   endpoints accept) are already tokens: their count is the array's length, and nothing here
//!   is needed for them.
//!
//! # Example
//!
//! ```
//! use tower_llm_policy::tokens::{chat_overhead, Count, Encoding, TokenCounter};
//!
//! let counter = TokenCounter::for_model("gpt-4o-mini");
//! assert_eq!(counter.encoding(), Encoding::O200kBase);
//!
//! // Two messages, no `name` fields.
//! let total = counter.count("You are terse.") + counter.count("hello world") + chat_overhead(2, 0);
//! # #[cfg(feature = "tokens")]
//! assert_eq!(total, 4 + 2 + 9);
//!
//! // A prompt limit stops counting once the limit is crossed.
//! let huge = "word ".repeat(1_000_000);
//! assert!(counter.count_up_to(&huge, 1_000).is_exceeded());
//! ```

use std::fmt;

/// A byte-pair encoding (vocabulary and pre-tokenization rules) used by OpenAI models.
///
/// Pick one for a model with [`Encoding::for_model`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Encoding {
    /// `o200k_base`, the encoding of GPT-4o and later models (GPT-4.1, GPT-4.5, GPT-5, the
    /// o-series reasoning models, `omni-moderation`, `computer-use`, `codex`).
    O200kBase,
    /// `cl100k_base`, the encoding of GPT-4 (not 4o), GPT-3.5 and the embedding models
    /// `text-embedding-3-*` and `text-embedding-ada-002`; also the fallback for unknown models.
    Cl100kBase,
}

/// Model-name prefixes whose models use `o200k_base`. Checked before everything else, since
/// `gpt-4o` and `gpt-4.1` also start with `gpt-4`.
const O200K_PREFIXES: &[&str] = &[
    "gpt-4o",
    "gpt-4.1",
    "gpt-4.5",
    "gpt-5",
    "o1",
    "o3",
    "o4",
    "chatgpt-4o",
    "omni-moderation",
    "computer-use",
    "codex",
];

impl Encoding {
    /// The encoding of a model, given its canonical name (lower case, without a provider
    /// prefix, e.g. `gpt-4o-2024-08-06`). A fine-tune's `ft:` prefix is ignored, so
    /// `ft:gpt-4o-mini:org::id` is counted like `gpt-4o-mini`.
    ///
    /// - [`O200kBase`](Encoding::O200kBase) for `gpt-4o*`, `gpt-4.1*`, `gpt-4.5*`, `gpt-5*`,
    ///   `o1*`, `o3*`, `o4*`, `chatgpt-4o*`, `omni-moderation*`, `computer-use*`, `codex*`.
    /// - [`Cl100kBase`](Encoding::Cl100kBase) for `gpt-4` and its dated and `-turbo`/`-32k`
    ///   variants, `gpt-3.5*`, `text-embedding-3*`, `text-embedding-ada-002`, and **every
    ///   model not listed above**.
    ///
    /// Why `cl100k_base` is the fallback: its vocabulary is half the size of `o200k_base`'s, so
    /// the same text tends to come out as *more* tokens with it (markedly so for non-English
    /// text). When the model is unknown — a new release, or a non-OpenAI model behind an
    /// OpenAI-compatible API, whose vocabulary is usually no larger — erring towards a higher
    /// count is the safe side for a limit or a cost cap. It is a tendency, not a bound: a
    /// model with its own tokenizer can still produce more tokens than either encoding.
    pub fn for_model(canonical_model: &str) -> Encoding {
        let model = canonical_model
            .strip_prefix("ft:")
            .unwrap_or(canonical_model);
        if O200K_PREFIXES
            .iter()
            .any(|prefix| model.starts_with(prefix))
        {
            Encoding::O200kBase
        } else {
            // gpt-4 (non-o), gpt-3.5*, text-embedding-3*, text-embedding-ada-002, unknown.
            Encoding::Cl100kBase
        }
    }

    /// The encoding's name as OpenAI and tiktoken spell it: `"o200k_base"` or `"cl100k_base"`.
    pub const fn name(self) -> &'static str {
        match self {
            Encoding::O200kBase => "o200k_base",
            Encoding::Cl100kBase => "cl100k_base",
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Tokens added for every chat message's framing (`<|start|>{role}<|message|>…<|end|>`), as
/// OpenAI's cookbook "How to count tokens with tiktoken" documents for current chat models.
pub const TOKENS_PER_MESSAGE: usize = 3;

/// Tokens added for a message that has a `name` field, on top of counting the name's text.
pub const TOKENS_PER_NAME: usize = 1;

/// Tokens added once per request: every reply is primed with `<|start|>assistant<|message|>`.
pub const REPLY_PRIMING_TOKENS: usize = 3;

/// The framing tokens of a chat request with `messages` messages, `names` of which carry a
/// `name` field: `3 × messages + 1 × names + 3`.
///
/// Add the counts of the messages' texts (contents, and the names themselves) to get the
/// prompt's tokens. The figures are those of OpenAI's cookbook "How to count tokens with
/// tiktoken" for current chat models; the cookbook notes they may change with new models, and
/// tool definitions and images are counted differently (not covered here). Saturates instead
/// of overflowing.
///
/// ```
/// use tower_llm_policy::tokens::chat_overhead;
///
/// // A system message and a user message, neither with a name.
/// assert_eq!(chat_overhead(2, 0), 9);
/// assert_eq!(chat_overhead(2, 1), 10);
/// ```
pub const fn chat_overhead(messages: usize, names: usize) -> usize {
    messages
        .saturating_mul(TOKENS_PER_MESSAGE)
        .saturating_add(names.saturating_mul(TOKENS_PER_NAME))
        .saturating_add(REPLY_PRIMING_TOKENS)
}

/// The estimate used without the `tokens` feature: ⌈characters / 4⌉, counting Unicode scalar
/// values.
///
/// Four characters per token is OpenAI's rule of thumb for English text. It is only an
/// estimate, in both directions: code, numbers and non-Latin scripts usually take more tokens
/// than this, long common words fewer.
///
/// ```
/// use tower_llm_policy::tokens::estimate;
///
/// assert_eq!(estimate(""), 0);
/// assert_eq!(estimate("hello world"), 3);
/// ```
pub fn estimate(text: &str) -> usize {
    text.chars().count().div_ceil(4)
}

/// The result of [`TokenCounter::count_up_to`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[must_use]
pub enum Count {
    /// The whole text was counted and has `tokens` tokens, at most the limit. With an exact
    /// counter this equals [`TokenCounter::count`].
    Within {
        /// The text's token count.
        tokens: usize,
    },
    /// The text has more tokens than the limit; counting stopped early.
    Exceeded {
        /// The tokens counted before stopping: more than the limit, and at most the text's
        /// whole count (a lower bound of it).
        counted: usize,
    },
}

impl Count {
    /// The tokens counted: the whole count if within the limit, otherwise the lower bound
    /// reached before stopping.
    pub const fn tokens(self) -> usize {
        match self {
            Count::Within { tokens } => tokens,
            Count::Exceeded { counted } => counted,
        }
    }

    /// Whether the text has more tokens than the limit.
    pub const fn is_exceeded(self) -> bool {
        matches!(self, Count::Exceeded { .. })
    }
}

/// Counts the tokens of prompt text with one [`Encoding`].
///
/// Cheap to clone and copy: the vocabularies are process-wide statics, loaded once, on the
/// first [`TokenCounter::new`] for an encoding (so construct counters when building the
/// service, not per request). See the [module docs](self) for exact versus estimated counts.
#[derive(Clone, Copy)]
pub struct TokenCounter {
    encoding: Encoding,
    mode: Mode,
}

#[derive(Clone, Copy)]
enum Mode {
    Estimate,
    #[cfg(feature = "tokens")]
    Exact(exact::Vocabulary),
}

impl TokenCounter {
    /// A counter for `encoding`: exact with the `tokens` feature, an [`estimate`] without it.
    ///
    /// With the feature, the first call for an encoding loads its vocabulary, a one-time cost
    /// (about 60–90 ms in a release build on a 2-core machine); later calls are free.
    pub fn new(encoding: Encoding) -> Self {
        #[cfg(feature = "tokens")]
        let mode = Mode::Exact(exact::Vocabulary::get(encoding));
        #[cfg(not(feature = "tokens"))]
        let mode = Mode::Estimate;
        TokenCounter { encoding, mode }
    }

    /// A counter for the encoding of `canonical_model`; see [`Encoding::for_model`].
    pub fn for_model(canonical_model: &str) -> Self {
        Self::new(Encoding::for_model(canonical_model))
    }

    /// A counter that always [estimates](estimate), even when the `tokens` feature is on:
    /// for callers that prefer cheap, rough counts.
    pub const fn estimating(encoding: Encoding) -> Self {
        TokenCounter {
            encoding,
            mode: Mode::Estimate,
        }
    }

    /// The encoding this counter counts with.
    pub const fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Whether counts are exact (`true`) or the [`estimate`] (`false`). Label estimated counts
    /// as such wherever they are shown.
    pub const fn is_exact(&self) -> bool {
        match self.mode {
            Mode::Estimate => false,
            #[cfg(feature = "tokens")]
            Mode::Exact(_) => true,
        }
    }

    /// The number of tokens of `text`.
    ///
    /// Exact counts take time linear in the text's length, including for a long run of text
    /// without whitespace. To enforce a limit on untrusted text, prefer
    /// [`count_up_to`](Self::count_up_to), which stops early.
    pub fn count(&self, text: &str) -> usize {
        match self.mode {
            Mode::Estimate => estimate(text),
            #[cfg(feature = "tokens")]
            Mode::Exact(vocabulary) => vocabulary.count(text),
        }
    }

    /// Counts the tokens of `text`, stopping as soon as there are more than `limit`.
    ///
    /// Returns [`Count::Within`] with the same number [`count`](Self::count) gives if the text
    /// has at most `limit` tokens, and [`Count::Exceeded`] otherwise. The decision is exact
    /// (for an exact counter): no text within the limit is reported as exceeding it, and none
    /// over the limit as within.
    ///
    /// How it stops early: the text is split into pieces by the encoding's own pre-tokenizer
    /// (a token never spans two pieces, so the sum of the pieces' counts *is* the text's
    /// count), and the pieces are counted one after another until the running total passes
    /// `limit`. No token is ever counted across an arbitrary chunk border, so nothing is
    /// approximated. Two length checks make hostile input cheap as well: a text or a piece of
    /// `n` bytes has at least ⌈n / longest token⌉ tokens, so one that long is over the limit
    /// without being encoded. The work is thus bounded by the text up to the piece that crosses
    /// the limit; that piece itself (a long word without whitespace) is scanned once to find
    /// its end.
    pub fn count_up_to(&self, text: &str, limit: usize) -> Count {
        match self.mode {
            Mode::Estimate => estimate_up_to(text, limit),
            #[cfg(feature = "tokens")]
            Mode::Exact(vocabulary) => vocabulary.count_up_to(text, limit),
        }
    }
}

impl fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCounter")
            .field("encoding", &self.encoding)
            .field("exact", &self.is_exact())
            .finish()
    }
}

/// [`estimate`] with an early stop: reads at most `4 × limit + 1` characters.
fn estimate_up_to(text: &str, limit: usize) -> Count {
    // ⌈chars / 4⌉ > limit  ⇔  chars > 4 × limit.
    let max_chars = limit.saturating_mul(4);
    // A character takes at least one byte: a text of at most 4 × limit bytes is within.
    if text.len() <= max_chars {
        return Count::Within {
            tokens: estimate(text),
        };
    }
    match text.chars().nth(max_chars) {
        // The text has more than 4 × limit characters: (4 × limit + 1) / 4, rounded up.
        Some(_) => Count::Exceeded {
            counted: (max_chars + 1).div_ceil(4),
        },
        None => Count::Within {
            tokens: estimate(text),
        },
    }
}

#[cfg(feature = "tokens")]
mod exact {
    //! Exact counts with `bpe-openai`.

    use std::sync::OnceLock;

    use bpe_openai::Tokenizer;

    use super::{Count, Encoding};

    /// A static tokenizer and the length in bytes of its longest token.
    #[derive(Clone, Copy)]
    pub(super) struct Vocabulary {
        tokenizer: &'static Tokenizer,
        /// No token is longer than this, so `n` bytes take at least `⌈n / longest⌉` tokens.
        pub(super) longest_token: usize,
    }

    impl Vocabulary {
        /// The vocabulary of `encoding`, loaded on first use.
        pub(super) fn get(encoding: Encoding) -> Self {
            static O200K: OnceLock<Vocabulary> = OnceLock::new();
            static CL100K: OnceLock<Vocabulary> = OnceLock::new();
            let (cell, load): (_, fn() -> &'static Tokenizer) = match encoding {
                Encoding::O200kBase => (&O200K, bpe_openai::o200k_base),
                Encoding::Cl100kBase => (&CL100K, bpe_openai::cl100k_base),
            };
            *cell.get_or_init(|| {
                let tokenizer = load();
                let bpe = &tokenizer.bpe;
                let longest_token = (0..bpe.num_tokens())
                    .filter_map(|id| u32::try_from(id).ok())
                    .map(|id| bpe.token_len(id))
                    .max()
                    .unwrap_or(1)
                    .max(1);
                Vocabulary {
                    tokenizer,
                    longest_token,
                }
            })
        }

        /// The fewest tokens `bytes` bytes can be encoded into.
        pub(super) fn min_tokens(&self, bytes: usize) -> usize {
            bytes.div_ceil(self.longest_token)
        }

        pub(super) fn count(&self, text: &str) -> usize {
            // Both encodings are used without Unicode normalization, so `text` is counted as is.
            self.tokenizer.count(text)
        }

        pub(super) fn count_up_to(&self, text: &str, limit: usize) -> Count {
            let at_least = self.min_tokens(text.len());
            if at_least > limit {
                return Count::Exceeded { counted: at_least };
            }
            let mut counted = 0usize;
            for piece in self.tokenizer.split(text) {
                let at_least = self.min_tokens(piece.len());
                if counted.saturating_add(at_least) > limit {
                    return Count::Exceeded {
                        counted: counted.saturating_add(at_least),
                    };
                }
                // Exact for the piece: the same per-piece count `Tokenizer::count` sums up.
                // (`BytePairEncoding::count_till_limit` is not used: it may stop on a partial
                // encoding, which its authors bound only heuristically.)
                counted = counted.saturating_add(self.tokenizer.bpe.count(piece.as_bytes()));
                if counted > limit {
                    return Count::Exceeded { counted };
                }
            }
            Count::Within { tokens: counted }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn o200k_models() {
        for model in [
            "gpt-4o",
            "gpt-4o-mini-2024-07-18",
            "gpt-4.1-nano",
            "gpt-4.5-preview",
            "gpt-5",
            "gpt-5-mini",
            "o1",
            "o1-preview",
            "o3-mini",
            "o4-mini",
            "chatgpt-4o-latest",
            "omni-moderation-latest",
            "computer-use-preview",
            "codex-mini-latest",
            "ft:gpt-4o-mini:acme::abc123",
        ] {
            assert_eq!(Encoding::for_model(model), Encoding::O200kBase, "{model}");
        }
    }

    #[test]
    fn cl100k_models_and_fallback() {
        for model in [
            "gpt-4",
            "gpt-4-0613",
            "gpt-4-turbo",
            "gpt-4-32k",
            "gpt-3.5-turbo",
            "gpt-3.5-turbo-instruct",
            "text-embedding-3-small",
            "text-embedding-3-large",
            "text-embedding-ada-002",
            "ft:gpt-3.5-turbo:acme::abc123",
            "llama-3.1-70b",
            "",
        ] {
            assert_eq!(Encoding::for_model(model), Encoding::Cl100kBase, "{model}");
        }
    }

    #[test]
    fn encoding_names() {
        assert_eq!(Encoding::O200kBase.to_string(), "o200k_base");
        assert_eq!(Encoding::Cl100kBase.name(), "cl100k_base");
    }

    #[test]
    fn chat_overhead_follows_cookbook() {
        assert_eq!(chat_overhead(0, 0), REPLY_PRIMING_TOKENS);
        assert_eq!(chat_overhead(1, 0), 6);
        assert_eq!(chat_overhead(3, 2), 3 * 3 + 2 + 3);
        assert_eq!(chat_overhead(usize::MAX, usize::MAX), usize::MAX);
    }

    #[test]
    fn estimate_up_to_matches_estimate() {
        for text in [
            "",
            "a",
            "abcd",
            "abcde",
            "héllo wörld",
            "日本語のテキスト",
            "😀😀😀😀😀",
        ] {
            for limit in 0..6 {
                let whole = estimate(text);
                let expected = if whole <= limit {
                    Count::Within { tokens: whole }
                } else {
                    Count::Exceeded { counted: limit + 1 }
                };
                assert_eq!(estimate_up_to(text, limit), expected, "{text:?} {limit}");
            }
        }
        assert_eq!(
            estimate_up_to("abc", usize::MAX),
            Count::Within { tokens: 1 }
        );
    }

    #[cfg(feature = "tokens")]
    #[test]
    fn length_bound_never_exceeds_the_count() {
        for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
            let vocabulary = exact::Vocabulary::get(encoding);
            assert!(
                (16..=1024).contains(&vocabulary.longest_token),
                "{encoding}"
            );
            for text in [
                " ".repeat(10_000),
                "a".repeat(10_000),
                "\n".repeat(10_000),
                "=".repeat(10_000),
                "0".repeat(10_000),
            ] {
                assert!(vocabulary.min_tokens(text.len()) <= vocabulary.count(&text));
            }
        }
    }
}
