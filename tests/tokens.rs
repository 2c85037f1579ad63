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
        assert_eq!(counter.count("hello world"), 3);
        assert_eq!(
            counter.count_up_to("hello world", 3),
            Count::Within { tokens: 3 }
        );
        assert!(counter.count_up_to("hello world", 2).is_exceeded());
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
            assert_eq!(counter.count("hello world"), 3); // 11 characters
            assert_eq!(counter.count("日本語"), 1); // characters, not bytes
            assert_eq!(counter.count("😀😀😀😀😀"), 2);
        }
    }

    #[test]
    fn estimate_is_ceil_of_chars_over_four() {
        for text in samples() {
            let chars = text.chars().count();
            assert_eq!(estimate(&text), chars.div_ceil(4));
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
        let huge = "a".repeat(MIB);
        assert_eq!(
            counter.count_up_to(&huge, 10),
            Count::Exceeded { counted: 11 }
        );
        assert_eq!(counter.count(&huge), MIB / 4);
        let multibyte = random_no_whitespace(MIB, 3);
        assert_eq!(
            counter.count_up_to(&multibyte, 10),
            Count::Exceeded { counted: 11 }
        );
        assert_eq!(
            counter.count(&multibyte),
            multibyte.chars().count().div_ceil(4)
        );
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
