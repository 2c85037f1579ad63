//! Token counting: exact counts cross-checked against tiktoken-rs (feature `tokens`), and the
//! estimate used without the feature.

use tower_llm_policy::tokens::{chat_overhead, estimate, Count, Encoding, TokenCounter};

const ENCODINGS: [Encoding; 2] = [Encoding::O200kBase, Encoding::Cl100kBase];

/// Varied prompt texts: English, code, numbers, Unicode (accents, CJK, emoji, combining marks,
/// RTL), whitespace runs and special-token look-alikes.
fn samples() -> Vec<String> {
    let mut samples: Vec<String> = [
        "",
        "hello world",
        "Hello, world!",
        " ",
        "a",
        "The quick brown fox jumps over the lazy dog.",
        "You are a helpful assistant. Answer in one sentence.",
        "I'm sure they'll say it's what we've done; don't you think? THEY'RE RIGHT.",
        "fn main() {\n    println!(\"{}\", (1..=10).map(|x| x * x).sum::<u32>());\n}\n",
        "def f(x):\n\treturn {'a': [1, 2, 3], \"b\": None}  # comment\n",
        "SELECT id, name FROM users WHERE email LIKE '%@example.com' ORDER BY 2 DESC;",
        "<html><body><div class=\"x\">&nbsp;&amp;</div></body></html>",
        "1234567890 3.14159 -42 1e-9 0xDEADBEEF 2024-08-06T12:34:56Z",
        "naïve café résumé façade Ångström straße",
        "e\u{301}e\u{301} combining: a\u{308}o\u{308}",
        "日本語のテキストを数えます。中文文本。한국어 텍스트.",
        "Привет, мир! Γειά σου κόσμε! שלום עולם! مرحبا بالعالم",
        "emoji 😀👍🏽👨‍👩‍👧‍👦🇩🇪 and ❤️ ✨",
        "   leading and trailing spaces   ",
        "tabs\t\t\tand\n\n\nnewlines\r\n\r\nmixed \t \n \r\n end",
        "                                                                ",
        "\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n",
        "word\u{a0}non-breaking\u{2003}em-space\u{3000}ideographic",
        "<|endoftext|> <|im_start|>user\nhi<|im_end|>",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "https://example.com/path/to/resource?query=1&other=two#fragment",
        "\u{0}\u{1}\u{7f} control \u{feff} bom \u{200b} zwsp",
        "!!!???...,,,;;;:::---___===+++***&&&%%%$$$###@@@",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    // Long text: everything above, many times over (about 60 KB).
    samples.push(samples.concat().repeat(40));
    samples
}

/// Deterministic pseudo-random text without whitespace: ASCII letters, digits, punctuation,
/// accented letters, CJK and emoji, so that the pre-tokenizer splits it in many places.
fn random_no_whitespace(bytes: usize, seed: u64) -> String {
    const ALPHABET: &[char] = &[
        'a', 'b', 'e', 'k', 'q', 'z', 'A', 'M', 'Z', '0', '7', '9', '.', ',', '-', '_', '/', '(',
        ')', '\'', '"', '!', '?', 'é', 'ß', 'Ω', 'ж', '日', '本', '語', '中', '😀', '👍',
        '\u{301}',
    ];
    let mut state = seed;
    let mut text = String::with_capacity(bytes + 4);
    while text.len() < bytes {
        // Numerical Recipes LCG; the high bits are good enough to pick characters.
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let pick = (state >> 33) as usize % ALPHABET.len();
        text.push(ALPHABET[pick]);
    }
    text
}

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

// ---------------------------------------------------------------------------------------------
// Always: model → encoding, chat overhead.

#[test]
fn encoding_follows_model() {
    assert_eq!(Encoding::for_model("gpt-4o-mini"), Encoding::O200kBase);
    assert_eq!(Encoding::for_model("o3"), Encoding::O200kBase);
    assert_eq!(Encoding::for_model("gpt-4"), Encoding::Cl100kBase);
    assert_eq!(Encoding::for_model("gpt-3.5-turbo"), Encoding::Cl100kBase);
    assert_eq!(
        TokenCounter::for_model("gpt-5").encoding(),
        Encoding::O200kBase
    );
}

#[test]
fn unknown_model_falls_back_to_cl100k() {
    assert_eq!(
        Encoding::for_model("mistral-large-latest"),
        Encoding::Cl100kBase
    );
}

#[test]
fn chat_overhead_is_three_per_message_one_per_name_three_for_the_reply() {
    assert_eq!(chat_overhead(1, 0), 3 + 3);
    assert_eq!(chat_overhead(4, 1), 4 * 3 + 1 + 3);
}

#[test]
fn estimating_counter_is_not_exact() {
    for encoding in ENCODINGS {
        let counter = TokenCounter::estimating(encoding);
        assert!(!counter.is_exact());
        assert_eq!(counter.count("hello world"), 8);
        assert_eq!(
            counter.count_up_to("hello world", 8),
            Count::Within { tokens: 8 }
        );
        assert!(counter.count_up_to("hello world", 7).is_exceeded());
        for text in samples() {
            assert_eq!(counter.count(&text), estimate(&text));
        }
    }
}

#[test]
fn counter_debug_shows_encoding_and_exactness() {
    let debug = format!("{:?}", TokenCounter::estimating(Encoding::O200kBase));
    assert_eq!(debug, "TokenCounter { encoding: O200kBase, exact: false }");
}

// ---------------------------------------------------------------------------------------------
// Without the `tokens` feature: estimates.

#[cfg(not(feature = "tokens"))]
mod estimate_only {
    use super::*;

    #[test]
    fn default_counter_estimates() {
        for encoding in ENCODINGS {
            let counter = TokenCounter::new(encoding);
            assert!(!counter.is_exact());
            assert_eq!(counter.count(""), 0);
            assert_eq!(counter.count("hello world"), 8); // 2 exact tokens
            assert_eq!(counter.count("日本語"), 9); // its bytes
            assert_eq!(counter.count("😀😀😀😀😀"), 20);
        }
    }

    #[test]
    fn estimate_is_at_most_the_length_in_bytes() {
        for text in samples() {
            assert!(estimate(&text) <= text.len());
            assert_eq!(
                TokenCounter::new(Encoding::O200kBase).count(&text),
                estimate(&text)
            );
        }
    }

    #[test]
    fn estimate_up_to_agrees_with_estimate() {
        let counter = TokenCounter::new(Encoding::Cl100kBase);
        for text in samples() {
            let whole = counter.count(&text);
            assert_eq!(
                counter.count_up_to(&text, whole),
                Count::Within { tokens: whole }
            );
            if whole > 0 {
                assert_eq!(
                    counter.count_up_to(&text, whole - 1),
                    Count::Exceeded { counted: whole }
                );
            }
        }
    }

    #[test]
    fn estimate_up_to_stops_early() {
        let counter = TokenCounter::new(Encoding::O200kBase);
        for huge in ["a".repeat(MIB), random_no_whitespace(MIB, 3)] {
            let whole = counter.count(&huge);
            assert!(whole > MIB / 4, "{whole}");
            let Count::Exceeded { counted } = counter.count_up_to(&huge, 10) else {
                panic!("a MiB within 10 tokens");
            };
            // Stopped after the first block of 256 bytes (at most 31/16 tokens a byte).
            assert!((11..=496).contains(&counted), "{counted}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// With the `tokens` feature: exact counts.

#[cfg(feature = "tokens")]
mod exact {
    use super::*;
    use tiktoken_rs::CoreBPE;

    fn tiktoken(encoding: Encoding) -> &'static CoreBPE {
        match encoding {
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
            Encoding::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
            _ => unreachable!("no other encodings yet"),
        }
    }

    fn reference_count(encoding: Encoding, text: &str) -> usize {
        tiktoken(encoding).encode_ordinary(text).len()
    }

    #[test]
    fn counter_is_exact() {
        for encoding in ENCODINGS {
            assert!(TokenCounter::new(encoding).is_exact());
        }
    }

    #[test]
    fn known_counts() {
        let o200k = TokenCounter::new(Encoding::O200kBase);
        let cl100k = TokenCounter::new(Encoding::Cl100kBase);
        for (text, in_o200k, in_cl100k) in [
            ("", 0, 0),
            ("hello world", 2, 2),
            ("The quick brown fox jumps over the lazy dog.", 10, 10),
            ("日本語のテキストを数えます。", 11, 13),
            ("emoji 😀👍🏽", 5, 8),
        ] {
            assert_eq!(o200k.count(text), in_o200k, "o200k_base {text:?}");
            assert_eq!(cl100k.count(text), in_cl100k, "cl100k_base {text:?}");
        }
    }

    #[test]
    fn counts_match_tiktoken() {
        for encoding in ENCODINGS {
            let counter = TokenCounter::new(encoding);
            for text in samples() {
                assert_eq!(
                    counter.count(&text),
                    reference_count(encoding, &text),
                    "{encoding} {:?}",
                    text.get(..80).unwrap_or(&text)
                );
            }
        }
    }

    #[test]
    fn counts_match_tiktoken_on_text_without_whitespace() {
        for encoding in ENCODINGS {
            let counter = TokenCounter::new(encoding);
            for seed in 0..8 {
                let text = random_no_whitespace(4 * KIB, seed);
                assert_eq!(counter.count(&text), reference_count(encoding, &text));
            }
        }
    }

    #[test]
    fn count_up_to_equals_count_within_the_limit() {
        for encoding in ENCODINGS {
            let counter = TokenCounter::new(encoding);
            for text in samples() {
                let whole = counter.count(&text);
                for limit in [whole, whole + 1, whole.saturating_mul(2), usize::MAX] {
                    assert_eq!(
                        counter.count_up_to(&text, limit),
                        Count::Within { tokens: whole },
                        "{encoding} limit {limit}"
                    );
                }
            }
        }
    }

    #[test]
    fn count_up_to_reports_exceeded_just_over_the_limit() {
        for encoding in ENCODINGS {
            let counter = TokenCounter::new(encoding);
            for text in samples() {
                let whole = counter.count(&text);
                for limit in [0, whole / 2, whole.saturating_sub(1)] {
                    if limit >= whole {
                        continue;
                    }
                    match counter.count_up_to(&text, limit) {
                        Count::Exceeded { counted } => {
                            assert!(counted > limit, "{encoding}: {counted} <= {limit}");
                            assert!(counted <= whole, "{encoding}: {counted} > {whole}");
                        }
                        within => panic!("{encoding}: {within:?} for {whole} > {limit}"),
                    }
                }
            }
        }
    }

    #[test]
    fn count_up_to_stops_early() {
        // One token per word: if counting went on past the limit, `counted` would be larger.
        // (The limit is above the 1 MB text's length bound, so the words are really counted.)
        let text = " word".repeat(200_000);
        for encoding in ENCODINGS {
            let counter = TokenCounter::new(encoding);
            assert_eq!(counter.count(&text), 200_000);
            assert_eq!(
                counter.count_up_to(&text, 10_000),
                Count::Exceeded { counted: 10_001 }
            );
        }
    }

    #[test]
    fn count_up_to_stops_before_reading_text_too_long_for_the_limit() {
        // No token is longer than a few hundred bytes, so 1 MB is far over 100 tokens: that
        // is decided from the length alone, and `counted` is that length bound.
        let text = " word".repeat(200_000);
        for encoding in ENCODINGS {
            let counter = TokenCounter::new(encoding);
            let Count::Exceeded { counted } = counter.count_up_to(&text, 100) else {
                panic!("{encoding}: 200 000 tokens within 100");
            };
            assert!(
                (1_000..=200_000).contains(&counted),
                "{encoding}: {counted}"
            );
        }
    }

    #[test]
    fn long_word_counts_linearly() {
        for encoding in ENCODINGS {
            let counter = TokenCounter::new(encoding);
            let quarter = counter.count(&"a".repeat(256 * KIB));
            let whole = counter.count(&"a".repeat(MIB));
            assert!(quarter > 0);
            // Runs of 'a' encode as a repeated token: 4× the text is 4× the tokens, up to the
            // ends of the run.
            assert!(
                whole.abs_diff(4 * quarter) <= 4,
                "{encoding}: {whole} vs 4 × {quarter}"
            );
            assert_eq!(
                counter.count_up_to(&"a".repeat(MIB), usize::MAX),
                Count::Within { tokens: whole }
            );
        }
    }

    #[test]
    fn random_text_without_whitespace_counts_linearly() {
        for encoding in ENCODINGS {
            let counter = TokenCounter::new(encoding);
            let quarter = counter.count(&random_no_whitespace(256 * KIB, 1));
            let whole_text = random_no_whitespace(MIB, 2);
            let whole = counter.count(&whole_text);
            // Same distribution, four times the text: four times the tokens within 2 %.
            let expected = 4 * quarter;
            assert!(
                whole.abs_diff(expected) * 50 <= expected,
                "{encoding}: {whole} vs 4 × {quarter}"
            );
            assert_eq!(
                counter.count_up_to(&whole_text, usize::MAX),
                Count::Within { tokens: whole }
            );
        }
    }

    #[test]
    fn long_word_over_a_small_limit_is_exceeded() {
        let word = "a".repeat(MIB);
        for encoding in ENCODINGS {
            let counter = TokenCounter::new(encoding);
            let whole = counter.count(&word);
            for limit in [0, 10, 4_000, whole - 1] {
                let count = counter.count_up_to(&word, limit);
                assert!(count.is_exceeded(), "{encoding} limit {limit}");
                assert!(count.tokens() > limit && count.tokens() <= whole);
            }
        }
    }

    #[test]
    fn chat_prompt_total() {
        // system + user message, no names: the cookbook's per-message accounting.
        let counter = TokenCounter::for_model("gpt-4o");
        let contents = ["You are a helpful assistant.", "hello world"];
        let total: usize = contents.iter().map(|c| counter.count(c)).sum::<usize>()
            + chat_overhead(contents.len(), 0);
        let expected = contents
            .iter()
            .map(|c| reference_count(Encoding::O200kBase, c))
            .sum::<usize>()
            + 3 * 2
            + 3;
        assert_eq!(total, expected);
    }
}

// ---------------------------------------------------------------------------------------------
// With the `tokens` feature: the estimate against exact counts. It must never be below the
// exact count in either encoding, for any text of the multilingual corpus, any cut of it, and
// random text mixing scripts and character classes.

#[cfg(feature = "tokens")]
mod estimate_bound {
    use super::*;

    /// The corpus: `tests/data/multilingual/*.txt`, a few KB each, with its category (the file
    /// name).
    fn corpus() -> Vec<(String, String)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/multilingual");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "txt"))
            .collect();
        files.sort();
        assert!(files.len() >= 18, "{files:?}");
        files
            .into_iter()
            .map(|path| {
                let name = path.file_stem().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&path).unwrap())
            })
            .collect()
    }

    /// A small deterministic PRNG (SplitMix64).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn range(&mut self, lo: usize, hi: usize) -> usize {
            lo + self.below(hi - lo + 1)
        }
    }

    /// The largest char boundary of `text` at or below `at`.
    fn floor_boundary(text: &str, mut at: usize) -> usize {
        at = at.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        at
    }

    /// Cuts of a text: every prefix at steps of 61 bytes, every line, and 64 random
    /// substrings.
    fn cuts<'a>(text: &'a str, rng: &mut Rng) -> Vec<&'a str> {
        let mut cuts = vec![text];
        for end in (0..text.len()).step_by(61) {
            cuts.push(&text[..floor_boundary(text, end)]);
        }
        cuts.extend(text.lines());
        for _ in 0..64 {
            let start = floor_boundary(text, rng.below(text.len()));
            let end = floor_boundary(text, start + rng.range(1, 600));
            cuts.push(&text[start..end]);
        }
        cuts
    }

    fn assert_bound(counters: &[TokenCounter; 2], what: &str, text: &str) {
        let estimated = estimate(text);
        assert!(estimated <= text.len(), "{what}: more than its bytes");
        for counter in counters {
            let exact = counter.count(text);
            assert!(
                estimated >= exact,
                "{what}: estimate {estimated} < {exact} in {}: {:?}",
                counter.encoding(),
                text.get(..floor_boundary(text, 120)).unwrap_or(text)
            );
        }
    }

    fn counters() -> [TokenCounter; 2] {
        ENCODINGS.map(TokenCounter::new)
    }

    #[test]
    fn estimate_bounds_the_corpus_and_every_cut_of_it() {
        let counters = counters();
        let mut rng = Rng(1);
        for (name, text) in corpus() {
            for cut in cuts(&text, &mut rng) {
                assert_bound(&counters, &name, cut);
            }
        }
    }

    #[test]
    fn estimate_bounds_the_corpus_whole_as_tiktoken_counts_it() {
        for (name, text) in corpus() {
            for encoding in ENCODINGS {
                let exact = tiktoken_count(encoding, &text);
                assert!(estimate(&text) >= exact, "{name} {encoding}");
            }
        }
        let all: String = corpus().into_iter().map(|(_, text)| text).collect();
        for encoding in ENCODINGS {
            assert!(estimate(&all) >= tiktoken_count(encoding, &all));
        }
    }

    fn tiktoken_count(encoding: Encoding, text: &str) -> usize {
        let bpe = match encoding {
            Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
            _ => tiktoken_rs::cl100k_base_singleton(),
        };
        bpe.encode_ordinary(text).len()
    }

    /// Character sources for random text: ASCII classes and Unicode scripts, each a set of
    /// inclusive code point ranges.
    const SOURCES: &[&[(u32, u32)]] = &[
        &[(0x61, 0x7A)],                                           // a-z
        &[(0x41, 0x5A)],                                           // A-Z
        &[(0x41, 0x5A), (0x61, 0x7A)],                             // letters
        &[(0x30, 0x39)],                                           // digits
        &[(0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60)],               // punctuation
        &[(0x20, 0x7E)],                                           // printable ASCII
        &[(0x09, 0x0A), (0x0D, 0x0D), (0x20, 0x20)],               // whitespace
        &[(0x00, 0x1F), (0x7F, 0x7F)],                             // controls
        &[(0xC0, 0xFF), (0x100, 0x17F)],                           // Latin-1, Latin Extended-A
        &[(0x300, 0x36F)],                                         // combining marks
        &[(0x391, 0x3C9)],                                         // Greek
        &[(0x400, 0x4FF)],                                         // Cyrillic
        &[(0x5D0, 0x5EA)],                                         // Hebrew
        &[(0x600, 0x6FF)],                                         // Arabic
        &[(0x900, 0x97F)],                                         // Devanagari
        &[(0xE00, 0xE7F)],                                         // Thai
        &[(0x3040, 0x30FF)],                                       // kana
        &[(0x4E00, 0x9FFF)],                                       // CJK unified ideographs
        &[(0x3400, 0x4DBF), (0x20000, 0x2A6DF)],                   // CJK extensions A and B
        &[(0xAC00, 0xD7A3)],                                       // Hangul syllables
        &[(0xA000, 0xA48C)],                                       // Yi
        &[(0x2600, 0x27BF), (0x1F300, 0x1FAFF)],                   // symbols, emoji
        &[(0x1F1E6, 0x1F1FF)],                                     // regional indicators (flags)
        &[(0x200D, 0x200D), (0xFE0F, 0xFE0F), (0x1F3FB, 0x1F3FF)], // ZWJ, VS16, skin tones
        &[(0xE000, 0xF8FF)],                                       // private use
        &[(0x80, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)],  // anything
    ];

    fn random_text(rng: &mut Rng, segments: usize, max_len: usize) -> String {
        let mut text = String::new();
        for _ in 0..segments {
            let source = SOURCES[rng.below(SOURCES.len())];
            for _ in 0..rng.range(1, max_len) {
                let (lo, hi) = source[rng.below(source.len())];
                let c = char::from_u32(rng.range(lo as usize, hi as usize) as u32);
                text.extend(c); // surrogates (none in the ranges) would be skipped
            }
            if rng.below(3) == 0 {
                text.push(' ');
            }
        }
        text
    }

    #[test]
    fn estimate_bounds_random_text_mixing_scripts() {
        let counters = counters();
        let mut rng = Rng(0x5EED);
        for round in 0..3000 {
            let segments = rng.range(1, 12);
            let text = random_text(&mut rng, segments, 24);
            assert_bound(&counters, &format!("random #{round}"), &text);
        }
        // Long runs of one source.
        for round in 0..200 {
            let text = random_text(&mut rng, 1, 800);
            assert_bound(&counters, &format!("run #{round}"), &text);
        }
    }

    #[test]
    fn estimate_bounds_repetitions_and_whitespace_runs() {
        let counters = counters();
        let mut texts = Vec::new();
        for a in (b'a'..=b'z').chain(b'A'..=b'Z').chain(b'0'..=b'9') {
            let a = a as char;
            for n in [1, 2, 3, 5, 50, 500] {
                texts.push(a.to_string().repeat(n));
            }
            texts.push(format!(" {a}").repeat(200));
            texts.push(format!("  {a}").repeat(100));
            texts.push(format!("{a} ").repeat(200));
            texts.push(format!("{a}\n").repeat(200));
            texts.push(format!("{a},").repeat(200));
            // Pairs of letters are the crafted case below.
            for b in ['1', '.', ' ', '\n', 'é', '日', '😀'] {
                texts.push(format!("{a}{b}").repeat(60));
            }
        }
        for unit in [
            " ",
            "  ",
            "\t",
            "\n",
            "\r\n",
            "\n\n",
            " \n",
            "\u{3000}",
            "\u{a0}",
            "1 ",
            "\t ",
            "-",
            "=",
            "*",
            ".",
            "é",
            "日",
            "😀",
            "👍🏽",
            "👨‍👩‍👧‍👦",
            "🇩🇪",
        ] {
            for n in [1, 2, 3, 7, 16, 33, 64, 100, 256, 1000, 5000] {
                texts.push(unit.repeat(n));
                texts.push(format!("x{}x", unit.repeat(n)));
            }
        }
        for text in &texts {
            assert_bound(&counters, "repetition", text);
        }
    }

    /// Text crafted against the estimate can exceed it: the known worst cases are repeated
    /// pairs and triples of letters that BPE splits into single letters. They stay within
    /// 16/11 of the estimate (the weight of a letter within a word) and within their bytes.
    #[test]
    fn crafted_letter_runs_stay_within_sixteen_elevenths_of_the_estimate() {
        let counters = counters();
        let letters = "aeiouqxzjkhtnsgbmw";
        let mut worst = 0.0f64;
        for a in letters.chars() {
            for b in letters.chars() {
                for c in ["", "j", "q", "x"] {
                    for text in [
                        format!("{a}{b}{c}").repeat(40),
                        format!(" {a}{b}{c}").repeat(40),
                    ] {
                        for counter in &counters {
                            let exact = counter.count(&text);
                            assert!(exact <= text.len());
                            assert!(16 * estimate(&text) >= 11 * exact, "{text:?}");
                            worst = worst.max(exact as f64 / estimate(&text) as f64);
                        }
                    }
                }
            }
        }
        println!("crafted letter runs: at most {worst:.2} times the estimate");
    }

    /// The estimate over the exact count, per corpus category: the price of never
    /// undercounting. Printed with `--nocapture`; asserted loosely so that the estimate
    /// stays useful for English prose and code.
    #[test]
    fn estimate_overcounts_within_reason() {
        let mut rng = Rng(2);
        for (name, text) in corpus() {
            let mut line = format!("{name:14}");
            for counter in counters() {
                let mut ratios: Vec<f64> = cuts(&text, &mut rng)
                    .into_iter()
                    .filter(|cut| cut.len() >= 40)
                    .map(|cut| estimate(cut) as f64 / counter.count(cut) as f64)
                    .collect();
                ratios.sort_by(f64::total_cmp);
                let median = ratios[ratios.len() / 2];
                let max = ratios[ratios.len() - 1];
                let whole = estimate(&text) as f64 / counter.count(&text) as f64;
                line += &format!(
                    "  {}: whole {whole:.2} median {median:.2} max {max:.2}",
                    counter.encoding()
                );
                if name == "english" {
                    assert!(whole < 3.2, "{name}: {whole}");
                }
            }
            println!("{line}");
        }
    }
}
