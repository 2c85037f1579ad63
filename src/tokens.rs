//! Prompt token counting for the prompt limit.
//!
//! A [`TokenCounter`] counts the tokens of a piece of prompt text with one of OpenAI's
//! byte-pair encodings ([`Encoding`]). How exact the count is depends on the `tokens` cargo
//! feature:
//!
//! | feature `tokens` | counts                                                          | [`TokenCounter::is_exact`] |
//! |------------------|-----------------------------------------------------------------|----------------------------|
//! | on               | exact, with the vocabularies embedded in `bpe-openai` (no network) | `true`                  |
//! | off              | an estimate, [`estimate`]: an upper bound, from the bytes' classes | `false`                  |
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

/// The estimate used without the `tokens` feature: an upper bound of the token count of `text`
/// in both encodings, for the kinds of text OpenAI prompts hold, from one pass over its bytes.
///
/// It must not undercount: a prompt limit that counted 770 Chinese characters as 193 tokens
/// (the old ⌈characters / 4⌉) let through twice the tokens it was set to. So every byte adds a
/// fixed cost in sixteenths of a token, looked up from its class and the classes of the two
/// bytes before it, and the sum is rounded up:
///
/// | byte | costs (tokens) | why |
/// |------|----------------|-----|
/// | non-ASCII (any byte of a multi-byte character) | 1, and 15/16 more where a run of non-ASCII starts | rare characters of every script (CJK, Hangul, Devanagari, emoji…) fall back to one token per byte |
/// | lower-case letter | 1 at the start of a run of letters, 11/16 within one | random letters take up to about 0.7 tokens each |
/// | upper-case letter | 11/16, plus 5/16 at the start of a run of letters, or 12/16 after a lower-case letter | `o200k_base` splits words before an upper-case letter |
/// | digit | 6/16, plus 25/16 at the start of a run of digits | digits go in groups of three, and a space before a number is a token of its own |
/// | other ASCII (punctuation, symbols) | 13/16, plus 15/16 at the start of a run | |
/// | other ASCII controls | 1 | |
/// | space | 1/16; 1 for the second of a run, or for the first after a line break or tab | a word takes the space before it; runs of spaces merge |
/// | `\n`, `\r` | 22/16 for the first, 13/16 for the second, 2/16 for the next ones | |
/// | tab, vertical tab, form feed | 1/16, plus 18/16 at the start of a run | |
///
/// and the result is at most the text's length in **bytes**, since every token of both
/// encodings is at least one byte: that bound is exact in the worst case, and the estimate
/// never exceeds it.
///
/// The weights are fitted to, and tested against, exact counts in `o200k_base` and
/// `cl100k_base` over a multilingual corpus (English, code, JSON, numbers, URLs, Chinese,
/// Japanese, Korean, Thai, Arabic, Hindi, Cyrillic, emoji, base64, random ASCII, whitespace
/// runs) and random strings mixing scripts and character classes (`tests/tokens.rs`). The
/// price of never undercounting is overcounting: English prose comes out at about 3 times its
/// exact count, code at 2.5–3, CJK at 2.4–3.6, Cyrillic, Thai and Devanagari at up to 7.5
/// (their UTF-8 bytes). For tight limits, enable the `tokens` feature for exact counts.
///
/// It is a bound for the text of prompts, not a proof for every string: it is fitted, not
/// derived from the vocabularies. Text crafted against it can have more tokens than estimated
/// (a repeated rare letter pair such as `gjgjgj…` is one token per letter in both encodings,
/// about 1.45 times the estimate), never more than its length in bytes.
///
/// ```
/// use tower_llm_policy::tokens::estimate;
///
/// assert_eq!(estimate(""), 0);
/// assert_eq!(estimate("hello world"), 8); // exactly 2 tokens in both encodings
/// assert_eq!(estimate("日本語"), 9); // ≤ 9 bytes
/// ```
pub fn estimate(text: &str) -> usize {
    let mut scan = Scan::new();
    scan.feed(text.as_bytes());
    scan.tokens(text.len())
}

/// Sixteenths of a token: the unit of the estimate's costs.
const SIXTEENTHS: u64 = 16;

/// The estimate's byte classes, which are also its states (the class of the byte before).
mod class {
    pub(super) const START: u8 = 0;
    pub(super) const LOWER: u8 = 1;
    pub(super) const UPPER: u8 = 2;
    pub(super) const DIGIT: u8 = 3;
    pub(super) const PUNCT: u8 = 4;
    /// A space after anything but a space.
    pub(super) const SPACE: u8 = 5;
    /// The second space of a run.
    pub(super) const SPACE_2: u8 = 6;
    /// The third and later spaces of a run.
    pub(super) const SPACE_3: u8 = 7;
    /// `\n` or `\r` after anything but those.
    pub(super) const NEWLINE: u8 = 8;
    pub(super) const NEWLINE_2: u8 = 9;
    pub(super) const NEWLINE_3: u8 = 10;
    /// Tab, vertical tab, form feed.
    pub(super) const BLANK: u8 = 11;
    /// Any byte of a non-ASCII character.
    pub(super) const NON_ASCII: u8 = 12;
}

/// The cost in sixteenths of a token of byte `byte` after a byte of class `state`, and the
/// class of `byte`. The table in [`estimate`]'s docs, as code.
const fn cost(state: u8, byte: u8) -> (u8, u8) {
    use class::*;
    match byte {
        0x80..=0xFF => (16 + starts(state == NON_ASCII, 15), NON_ASCII),
        b'a'..=b'z' => (
            if state == LOWER || state == UPPER {
                11
            } else {
                16
            },
            LOWER,
        ),
        b'A'..=b'Z' => (
            11 + match state {
                UPPER => 0,
                LOWER => 12,
                _ => 5,
            },
            UPPER,
        ),
        b'0'..=b'9' => (6 + starts(state == DIGIT, 25), DIGIT),
        b' ' => match state {
            SPACE => (16, SPACE_2),
            SPACE_2 | SPACE_3 => (1, SPACE_3),
            // After a line break or a tab, a space is rarely joined to a word: a full token.
            NEWLINE | NEWLINE_2 | NEWLINE_3 | BLANK => (16, SPACE_3),
            _ => (1, SPACE),
        },
        b'\n' | b'\r' => match state {
            NEWLINE => (13, NEWLINE_2),
            NEWLINE_2 | NEWLINE_3 => (2, NEWLINE_3),
            _ => (22, NEWLINE),
        },
        b'\t' | 0x0B | 0x0C => (1 + starts(state == BLANK, 18), BLANK),
        // Other control characters are tokens of their own.
        0x00..=0x1F | 0x7F => (16, PUNCT),
        _ => (13 + starts(state == PUNCT, 15), PUNCT),
    }
}

/// `start` sixteenths where a run of a class starts (`same` is false), none within one.
const fn starts(same: bool, start: u8) -> u8 {
    if same {
        0
    } else {
        start
    }
}

/// The kinds of bytes [`cost`] tells apart, as 4-bit numbers: [`KIND`] maps bytes to them.
mod kind {
    /// No byte: before the start of the text.
    pub(super) const NONE: u8 = 0;
    /// Representative bytes of kinds 1 to 9 (every byte of a kind costs the same).
    pub(super) const BYTES: [u8; 10] = [0, b'a', b'A', b'0', b'!', 0x01, b' ', b'\n', b'\t', 0x80];

    /// The kind of `byte`: the index of the representative byte that [`cost`](super::cost)
    /// treats the same.
    pub(super) const fn of(byte: u8) -> u8 {
        match byte {
            b'a'..=b'z' => 1,
            b'A'..=b'Z' => 2,
            b'0'..=b'9' => 3,
            b' ' => 6,
            b'\n' | b'\r' => 7,
            b'\t' | 0x0B | 0x0C => 8,
            0x00..=0x1F | 0x7F => 5,
            0x80..=0xFF => 9,
            _ => 4,
        }
    }
}

/// The kind of every byte.
static KIND: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = kind::of(byte as u8);
        byte += 1;
    }
    table
};

/// The cost of a byte of kind `k2` after bytes of kinds `k0` and `k1`, at index
/// `k0 << 8 | k1 << 4 | k2`. Two bytes back are enough to know [`cost`]'s state (which run of
/// spaces or line breaks a byte is in matters only up to its third byte), so the scan needs no
/// state but the last two kinds: its loads do not wait for one another.
static COST: [u8; 4096] = {
    let mut table = [0u8; 4096];
    let mut index = 0;
    while index < 4096 {
        let (k0, k1, k2) = (index >> 8, index >> 4 & 0xF, index & 0xF);
        if k2 != 0 && k2 < kind::BYTES.len() && k1 < kind::BYTES.len() && k0 < kind::BYTES.len() {
            let mut state = class::START;
            if k0 != kind::NONE as usize {
                state = cost(state, kind::BYTES[k0]).1;
            }
            if k1 != kind::NONE as usize {
                state = cost(state, kind::BYTES[k1]).1;
            }
            table[index] = cost(state, kind::BYTES[k2]).0;
        }
        index += 1;
    }
    table
};

/// The running state of an estimate: the sum of costs so far and the kinds of the last two
/// bytes.
struct Scan {
    sixteenths: u64,
    before_last: usize,
    last: usize,
}

impl Scan {
    const fn new() -> Self {
        Scan {
            sixteenths: 0,
            before_last: kind::NONE as usize,
            last: kind::NONE as usize,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        let (mut sum, mut k0, mut k1) = (self.sixteenths, self.before_last, self.last);
        for &byte in bytes {
            let k2 = usize::from(KIND[usize::from(byte)]);
            // The mask keeps the index provably in bounds: no check in the loop.
            sum += u64::from(COST[(k0 << 8 | k1 << 4 | k2) & 0xFFF]);
            (k0, k1) = (k1, k2);
        }
        (self.sixteenths, self.before_last, self.last) = (sum, k0, k1);
    }

    /// The estimate so far, rounded up, for a text of `len` bytes in all.
    fn tokens(&self, len: usize) -> usize {
        usize::try_from(self.sixteenths.div_ceil(SIXTEENTHS))
            .unwrap_or(usize::MAX)
            .min(len)
    }
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
    /// With the feature, the first call for an encoding loads its vocabulary and builds a hash
    /// table of its tokens (8 MiB for `o200k_base`, 4 MiB for `cl100k_base`), a one-time cost:
    /// in a release build on a busy 2-core machine, about 70–170 ms for `o200k_base` and
    /// 30–75 ms for `cl100k_base`, of which the table is a few tens of ms. Later calls are
    /// free.
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
    /// for callers that prefer cheap counts that err high.
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

/// [`estimate`] with an early stop: reads the text in blocks of [`BLOCK`] bytes and stops
/// after the block where the running estimate passes `limit`.
///
/// Within the limit, the count is [`estimate`]'s. Over it, `counted` is more than `limit` and
/// at most [`estimate`]'s count (the costs only add up), so a text's estimate exceeds a
/// limit exactly when this says so.
fn estimate_up_to(text: &str, limit: usize) -> Count {
    let bytes = text.as_bytes();
    // The estimate is at most the length in bytes.
    if bytes.len() <= limit {
        return Count::Within {
            tokens: estimate(text),
        };
    }
    // More than `limit` tokens ⇔ more than `limit × 16` sixteenths (the length is above it).
    let threshold = u64::try_from(limit)
        .unwrap_or(u64::MAX)
        .saturating_mul(SIXTEENTHS);
    let mut scan = Scan::new();
    for block in bytes.chunks(BLOCK) {
        scan.feed(block);
        if scan.sixteenths > threshold {
            return Count::Exceeded {
                counted: scan.tokens(bytes.len()),
            };
        }
    }
    Count::Within {
        tokens: scan.tokens(bytes.len()),
    }
}

/// Bytes [`estimate_up_to`] scans between two checks of the limit.
const BLOCK: usize = 256;

#[cfg(feature = "tokens")]
mod exact {
    //! Exact counts with `bpe-openai`.
    //!
    //! The text is split by the encoding's pre-tokenizer (`bpe-openai`'s regex), and each piece
    //! is counted on its own. Most pieces of ordinary text (a word with the space before it, a
    //! run of punctuation) are one token of the vocabulary: those are looked up in a hash table
    //! built once, as tiktoken does, instead of running the byte-pair encoder on them, which
    //! allocates for every piece. Only the other pieces go through `BytePairEncoding::count`.

    use std::sync::OnceLock;

    use bpe_openai::Tokenizer;

    use super::{Count, Encoding};

    /// A static tokenizer, the length in bytes of its longest token, and a table of its tokens.
    #[derive(Clone, Copy)]
    pub(super) struct Vocabulary {
        tokenizer: &'static Tokenizer,
        /// No token is longer than this, so `n` bytes take at least `⌈n / longest⌉` tokens.
        pub(super) longest_token: usize,
        tokens: &'static TokenTable,
        /// Which pre-tokenizer [`ascii`] follows for ASCII text: `o200k_base`'s or
        /// `cl100k_base`'s.
        o200k: bool,
    }

    /// An open-addressing hash table of a vocabulary's tokens: which byte strings are one
    /// token. A slot holds a token's length, its first 8 bytes and its id (the rest of its
    /// bytes are the vocabulary's), so that a short piece is matched without leaving the slot.
    struct TokenTable {
        slots: Box<[Slot]>,
        /// `64 - log2(slots.len())`: a hash's top bits pick the first slot.
        shift: u32,
    }

    #[derive(Clone, Copy)]
    struct Slot {
        /// The token's first 8 bytes, little-endian, zero-padded.
        head: u64,
        len: u32,
        /// [`EMPTY`] for a free slot.
        id: u32,
    }

    const EMPTY: u32 = u32::MAX;

    /// The first 8 bytes of `bytes` as a little-endian word, zero-padded.
    #[inline]
    fn head(bytes: &[u8]) -> u64 {
        let mut word = [0u8; 8];
        let n = bytes.len().min(8);
        word[..n].copy_from_slice(&bytes[..n]);
        u64::from_le_bytes(word)
    }

    /// A fast hash of a short byte string (FxHash's multiply-rotate over 8-byte words), from
    /// its [`head`] already read.
    #[inline]
    fn hash(head: u64, bytes: &[u8]) -> u64 {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut h = ((bytes.len() as u64).wrapping_mul(K).rotate_left(5) ^ head).wrapping_mul(K);
        if let Some(rest) = bytes.get(8..) {
            for chunk in rest.chunks(8) {
                h = (h.rotate_left(5) ^ self::head(chunk)).wrapping_mul(K);
            }
        }
        h
    }

    impl TokenTable {
        fn new(tokenizer: &Tokenizer) -> Self {
            let bpe = &tokenizer.bpe;
            let count = bpe.num_tokens();
            // At most half full.
            let size = (count * 2).next_power_of_two().max(2);
            let free = Slot {
                head: 0,
                len: 0,
                id: EMPTY,
            };
            let mut table = TokenTable {
                slots: vec![free; size].into_boxed_slice(),
                shift: 64 - size.trailing_zeros(),
            };
            let mask = size - 1;
            for id in (0..count).filter_map(|id| u32::try_from(id).ok()) {
                let bytes = bpe.token_bytes(id);
                let (head, Ok(len)) = (head(bytes), u32::try_from(bytes.len())) else {
                    continue;
                };
                let mut slot = table.first_slot(head, bytes);
                while table.slots[slot].id != EMPTY {
                    slot = (slot + 1) & mask;
                }
                table.slots[slot] = Slot { head, len, id };
            }
            table
        }

        #[inline]
        fn first_slot(&self, head: u64, bytes: &[u8]) -> usize {
            // The shift leaves fewer bits than the table's size needs, which fits a usize.
            (hash(head, bytes) >> self.shift) as usize
        }

        /// Whether `bytes` is one token of `tokenizer`'s vocabulary.
        #[inline]
        fn contains(&self, tokenizer: &Tokenizer, bytes: &[u8]) -> bool {
            let mask = self.slots.len() - 1;
            let head = head(bytes);
            let mut slot = self.first_slot(head, bytes);
            loop {
                let Slot { head: h, len, id } = self.slots[slot];
                if id == EMPTY {
                    return false;
                }
                if h == head
                    && len as usize == bytes.len()
                    && (bytes.len() <= 8 || tokenizer.bpe.token_bytes(id) == bytes)
                {
                    return true;
                }
                slot = (slot + 1) & mask;
            }
        }
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
                    tokens: Box::leak(Box::new(TokenTable::new(tokenizer))),
                    o200k: encoding == Encoding::O200kBase,
                }
            })
        }

        /// The fewest tokens `bytes` bytes can be encoded into.
        pub(super) fn min_tokens(&self, bytes: usize) -> usize {
            bytes.div_ceil(self.longest_token)
        }

        /// The exact count of one piece of the pre-tokenizer's split.
        #[inline]
        fn count_piece(&self, piece: &str) -> usize {
            let bytes = piece.as_bytes();
            // A piece that is one token is encoded as that token: byte-pair merges of its
            // bytes end in it (as tiktoken assumes too, with the same lookup).
            if bytes.len() <= self.longest_token && self.tokens.contains(self.tokenizer, bytes) {
                1
            } else {
                self.tokenizer.bpe.count(bytes)
            }
        }

        pub(super) fn count(&self, text: &str) -> usize {
            // Both encodings are used without Unicode normalization, so `text` is counted as is:
            // the sum over the pieces that `Tokenizer::count` adds up, piece by piece.
            self.split(text).map(|piece| self.count_piece(piece)).sum()
        }

        /// The pieces of `text` by the encoding's pre-tokenizer: `bpe-openai`'s regex, or for
        /// ASCII text the same split by hand ([`ascii`]), which is several times faster.
        pub(super) fn split<'a>(&'a self, text: &'a str) -> impl Iterator<Item = &'a str> + 'a {
            if text.is_ascii() {
                Either::Ascii(ascii::Splits::new(text, self.o200k))
            } else {
                Either::Regex(self.tokenizer.split(text))
            }
        }

        pub(super) fn count_up_to(&self, text: &str, limit: usize) -> Count {
            let at_least = self.min_tokens(text.len());
            if at_least > limit {
                return Count::Exceeded { counted: at_least };
            }
            let mut counted = 0usize;
            for piece in self.split(text) {
                let at_least = self.min_tokens(piece.len());
                if counted.saturating_add(at_least) > limit {
                    return Count::Exceeded {
                        counted: counted.saturating_add(at_least),
                    };
                }
                // Exact for the piece: the same per-piece count `count` sums up.
                // (`BytePairEncoding::count_till_limit` is not used: it may stop on a partial
                // encoding, which its authors bound only heuristically.)
                counted = counted.saturating_add(self.count_piece(piece));
                if counted > limit {
                    return Count::Exceeded { counted };
                }
            }
            Count::Within { tokens: counted }
        }
    }

    /// One of two iterators over the same item.
    enum Either<A, B> {
        Ascii(A),
        Regex(B),
    }

    impl<'a, A, B> Iterator for Either<A, B>
    where
        A: Iterator<Item = &'a str>,
        B: Iterator<Item = &'a str>,
    {
        type Item = &'a str;

        #[inline]
        fn next(&mut self) -> Option<&'a str> {
            match self {
                Either::Ascii(a) => a.next(),
                Either::Regex(b) => b.next(),
            }
        }
    }

    pub(super) mod ascii {
        //! The pre-tokenizers of `o200k_base` and `cl100k_base` for ASCII text, by hand.
        //!
        //! `bpe-openai` splits text with one anchored regex search per piece, with these
        //! patterns, tried in order (the first that matches wins; `\s+\s` stands for
        //! tiktoken's `\s+(?!\S)` and drops its last character):
        //!
        //! - a: `cl100k_base`: a contraction, `(?i:'s|'t|'re|'ve|'m|'ll|'d)`;
        //!   `o200k_base`: `[^\r\n\p{L}\p{N}]?[\p{Lu}…]*[\p{Ll}…]+` and a contraction, optional.
        //! - b: `cl100k_base`: `[^\r\n\p{L}\p{N}]?\p{L}+`;
        //!   `o200k_base`: `[^\r\n\p{L}\p{N}]?[\p{Lu}…]+[\p{Ll}…]*` and a contraction, optional.
        //! - c: `\p{N}{1,3}`.
        //! - d: ` ?[^\s\p{L}\p{N}]+[\r\n]*` (`[\r\n/]*` at the end for `o200k_base`).
        //! - e: `\s*[\r\n]+`, `\s+$`, `\s+\s`, `\s+`.
        //!
        //! In ASCII, letters are `A-Z` (upper case) and `a-z` (lower case), numbers `0-9`, and
        //! `\s` is tab, line feed, vertical tab, form feed, carriage return and space. A unit
        //! test checks these splits against the regex's on random ASCII text.

        fn is_letter(c: u8) -> bool {
            c.is_ascii_alphabetic()
        }

        fn is_space(c: u8) -> bool {
            matches!(c, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ')
        }

        fn is_newline(c: u8) -> bool {
            c == b'\r' || c == b'\n'
        }

        /// `[^\r\n\p{L}\p{N}]`: the optional character before a word.
        fn is_prefix(c: u8) -> bool {
            !is_letter(c) && !c.is_ascii_digit() && !is_newline(c)
        }

        /// `[^\s\p{L}\p{N}]`.
        fn is_punct(c: u8) -> bool {
            !is_space(c) && !is_letter(c) && !c.is_ascii_digit()
        }

        /// The end of the run of bytes matching `class` from `from`.
        #[inline]
        fn run(bytes: &[u8], from: usize, class: impl Fn(u8) -> bool) -> usize {
            bytes[from..]
                .iter()
                .position(|&c| !class(c))
                .map_or(bytes.len(), |n| from + n)
        }

        /// The end of a contraction (`(?i:'s|'t|'re|'ve|'m|'ll|'d)`) at `at`, if there is one.
        fn contraction(bytes: &[u8], at: usize) -> Option<usize> {
            if bytes.get(at) != Some(&b'\'') {
                return None;
            }
            let lower = |i: usize| bytes.get(i).map(u8::to_ascii_lowercase);
            match (lower(at + 1)?, lower(at + 2)) {
                (b's' | b't' | b'm' | b'd', _) => Some(at + 2),
                (b'r' | b'v', Some(b'e')) | (b'l', Some(b'l')) => Some(at + 3),
                _ => None,
            }
        }

        /// The end of the piece that starts at `start` (before the end of `bytes`).
        #[inline]
        fn piece_end(bytes: &[u8], start: usize, o200k: bool) -> usize {
            let first = bytes[start];
            // a, b: words. A prefix not followed by a letter matches neither (without it, the
            // piece would have to start with a letter, and it does not).
            let word = if is_prefix(first) { start + 1 } else { start };
            if o200k {
                let upper = run(bytes, word, |c| c.is_ascii_uppercase());
                let lower = run(bytes, upper, |c| c.is_ascii_lowercase());
                if lower > word {
                    return contraction(bytes, lower).unwrap_or(lower);
                }
            } else {
                if let Some(end) = contraction(bytes, start) {
                    return end;
                }
                let end = run(bytes, word, is_letter);
                if end > word {
                    return end;
                }
            }
            // c: numbers, three digits at most.
            if first.is_ascii_digit() {
                return run(bytes, start, |c| c.is_ascii_digit()).min(start + 3);
            }
            // d: punctuation, with the space before it and the line breaks after it.
            let punct = if first == b' ' && bytes.get(start + 1).is_some_and(|&c| is_punct(c)) {
                start + 1
            } else {
                start
            };
            if is_punct(bytes[punct]) {
                let end = run(bytes, punct, is_punct);
                return run(bytes, end, |c| is_newline(c) || (o200k && c == b'/'));
            }
            // e: whitespace (the only class left).
            let end = run(bytes, start, is_space);
            if let Some(newline) = bytes[start..end].iter().rposition(|&c| is_newline(c)) {
                // `\s*[\r\n]+`: up to the last line break of the run.
                start + newline + 1
            } else if end == bytes.len() || end - start == 1 {
                // `\s+$`, or a lone `\s+`.
                end
            } else {
                // `\s+\s`: all but the last, which goes with what follows.
                end - 1
            }
        }

        /// The pieces of an ASCII text.
        pub(in super::super) struct Splits<'a> {
            text: &'a str,
            at: usize,
            o200k: bool,
        }

        impl<'a> Splits<'a> {
            pub(in super::super) fn new(text: &'a str, o200k: bool) -> Self {
                debug_assert!(text.is_ascii());
                Splits { text, at: 0, o200k }
            }
        }

        impl<'a> Iterator for Splits<'a> {
            type Item = &'a str;

            #[inline]
            fn next(&mut self) -> Option<&'a str> {
                let bytes = self.text.as_bytes();
                if self.at >= bytes.len() {
                    return None;
                }
                let start = self.at;
                self.at = piece_end(bytes, start, self.o200k);
                // ASCII: every index is a character boundary.
                self.text.get(start..self.at)
            }
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
        let long = "word ".repeat(1000);
        for text in [
            "",
            "a",
            "abcd",
            "abcde",
            "héllo wörld",
            "日本語のテキスト",
            "😀😀😀😀😀",
            &long,
        ] {
            let whole = estimate(text);
            for limit in (0..40).chain([whole.saturating_sub(1), whole, whole + 1]) {
                match estimate_up_to(text, limit) {
                    Count::Within { tokens } => {
                        assert!(whole <= limit, "{text:?} {limit}");
                        assert_eq!(tokens, whole, "{text:?} {limit}");
                    }
                    Count::Exceeded { counted } => {
                        assert!(whole > limit, "{text:?} {limit}");
                        assert!(counted > limit && counted <= whole, "{text:?} {limit}");
                    }
                }
            }
        }
        assert_eq!(
            estimate_up_to("abc", usize::MAX),
            Count::Within {
                tokens: estimate("abc")
            }
        );
    }

    #[test]
    fn estimate_costs_follow_the_table_in_the_docs() {
        assert_eq!(estimate("a"), 1);
        // 16 + 4 × 11 sixteenths: one word of five letters is 4 tokens at most.
        assert_eq!(estimate("hello"), 4);
        // A space and a one-letter word: 1 + 16 sixteenths, rounded up.
        assert_eq!(estimate(" a"), 2);
        // Non-ASCII: one token per byte, and the text's length in bytes bounds the estimate.
        assert_eq!(estimate("é"), 2);
        assert_eq!(estimate("日本語"), 9);
        assert_eq!(estimate("😀"), 4);
        // Digits: 31 sixteenths for the first, 6 for each next one.
        assert_eq!(estimate("1"), 1);
        assert_eq!(estimate("1234567"), 5);
        // Long runs of spaces are cheap: 1 + 16 + 998 × 1 sixteenths.
        assert_eq!(estimate(&" ".repeat(1000)), 64);
        assert!(COST.iter().all(|&cost| cost <= 31));
    }

    /// The scan over the last two kinds gives the same sums as [`cost`]'s state machine.
    #[test]
    fn scan_follows_the_state_machine() {
        fn reference(bytes: &[u8]) -> u64 {
            let mut state = class::START;
            let mut sum = 0;
            for &byte in bytes {
                let (cost, next) = cost(state, byte);
                sum += u64::from(cost);
                state = next;
            }
            sum
        }
        for byte in 0..=255u8 {
            assert_eq!(
                cost(class::START, byte),
                cost(
                    class::START,
                    kind::BYTES[usize::from(KIND[usize::from(byte)])]
                ),
                "{byte}"
            );
        }
        // Every sequence of up to four bytes from a set that covers each kind twice, then
        // pseudo-random bytes.
        let alphabet = b"azAZ09!~\x01\x7f \n\r\t\x0c\x80\xff";
        let mut sequences: Vec<Vec<u8>> = vec![vec![]];
        for _ in 0..4 {
            let longer: Vec<Vec<u8>> = sequences
                .iter()
                .filter(|s| s.len() == sequences.last().map_or(0, Vec::len))
                .flat_map(|s| alphabet.iter().map(move |&b| [s.as_slice(), &[b]].concat()))
                .collect();
            sequences.extend(longer);
        }
        let mut seed = 1u64;
        for _ in 0..200 {
            let bytes = (0..300)
                .map(|_| {
                    seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    alphabet[(seed >> 33) as usize % alphabet.len()]
                })
                .collect();
            sequences.push(bytes);
        }
        for bytes in &sequences {
            let mut scan = Scan::new();
            // In two parts, as `estimate_up_to` feeds blocks.
            let (head, tail) = bytes.split_at(bytes.len() / 2);
            scan.feed(head);
            scan.feed(tail);
            assert_eq!(scan.sixteenths, reference(bytes), "{bytes:?}");
        }
    }

    /// The hand-written ASCII pre-tokenizer splits as `bpe-openai`'s regex does.
    #[cfg(feature = "tokens")]
    #[test]
    fn ascii_splits_follow_the_regex() {
        let alphabet: &[u8] = b"aZsStTdDmMlLrReEvV9 0''''\t\n\r\x0b\x0c\x1f\x00\x7f/.,!?-_`\"(";
        let mut texts: Vec<String> = [
            "Hello world, it's 2024-08-06!  I've got 12345 apples\n\n  and THEY'RE HERE'S.",
            "fn main() {\n    println!(\"{}\", x);\n}\n\n\n   ",
            "  leading and trailing  \t ",
            "a'LL b'Ve c're'd 's 't 'm 'x ' '",
            "CamelCaseWordsAndALLCAPSThenLower http://example.com/a/b//\r\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut seed = 7u64;
        for len in [1, 2, 3, 5, 8, 13, 40, 200] {
            for _ in 0..300 {
                let text = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        char::from(alphabet[(seed >> 33) as usize % alphabet.len()])
                    })
                    .collect();
                texts.push(text);
            }
        }
        for encoding in [Encoding::O200kBase, Encoding::Cl100kBase] {
            let tokenizer = match encoding {
                Encoding::O200kBase => bpe_openai::o200k_base(),
                _ => bpe_openai::cl100k_base(),
            };
            for text in &texts {
                let ours: Vec<&str> =
                    exact::ascii::Splits::new(text, encoding == Encoding::O200kBase).collect();
                let regex: Vec<&str> = tokenizer.split(text).collect();
                assert_eq!(ours, regex, "{encoding} {text:?}");
            }
        }
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
