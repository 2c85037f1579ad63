//! Exact token counting against tiktoken-rs on the same texts: a typical prompt, a long
//! document, multilingual text, and hostile input (one word without whitespace: 64 KiB for
//! both, 1 MiB for ours alone); the early stop of `count_up_to`; and the estimate used without
//! the `tokens` feature, against the old ⌈characters / 4⌉.
//!
//! `cargo bench --features tokens --bench tokens`

use std::sync::LazyLock;

use divan::{black_box, counter::BytesCount, Bencher};
use tower_llm_policy::tokens::{estimate, Encoding, TokenCounter};

fn main() {
    divan::main();
}

const ENCODINGS: [Encoding; 2] = [Encoding::O200kBase, Encoding::Cl100kBase];

const PARAGRAPH: &str = "You are a careful assistant. Summarise the following support ticket \
    in two sentences, then list the customer's open questions as bullet points. The customer \
    writes: \"Since the update on 2024-08-06 the export to CSV fails with error 0x80070057; \
    I've tried re-installing twice, it didn't help.\" ";

const CODE: &str = "fn parse(input: &str) -> Result<Vec<u32>, ParseIntError> {\n    \
    input.split(',').map(|s| s.trim().parse::<u32>()).collect()\n}\n\n";

const UNICODE: &str = "Grüße aus München — 日本語のテキスト、中文文本 😀👍🏽 naïve café. ";

/// A chat prompt of about 2 KB: instructions and a ticket in English.
static CHAT_2KB: LazyLock<String> = LazyLock::new(|| fill(&[PARAGRAPH], 2 * 1024));

/// A document of about 100 KB: English, code and some non-Latin text.
static DOCUMENT_100KB: LazyLock<String> =
    LazyLock::new(|| fill(&[PARAGRAPH, CODE, PARAGRAPH, UNICODE], 100 * 1024));

/// One word of 1 MiB with no whitespace.
static WORD_1MB: LazyLock<String> = LazyLock::new(|| "a".repeat(1024 * 1024));

fn fill(parts: &[&str], bytes: usize) -> String {
    let mut text = String::with_capacity(bytes + 512);
    while text.len() < bytes {
        for part in parts {
            text.push_str(part);
        }
    }
    text
}

/// Texts in eight scripts from the test corpus, one after another (about 24 KB): Chinese,
/// Japanese, Korean, Russian, Arabic, Hindi, Thai and emoji.
static MULTILINGUAL: LazyLock<String> = LazyLock::new(|| {
    [
        include_str!("../tests/data/multilingual/chinese.txt"),
        include_str!("../tests/data/multilingual/japanese.txt"),
        include_str!("../tests/data/multilingual/korean.txt"),
        include_str!("../tests/data/multilingual/russian.txt"),
        include_str!("../tests/data/multilingual/arabic.txt"),
        include_str!("../tests/data/multilingual/hindi.txt"),
        include_str!("../tests/data/multilingual/thai.txt"),
        include_str!("../tests/data/multilingual/emoji.txt"),
    ]
    .concat()
});

/// One word of 64 KiB with no whitespace: the hostile input at a size tiktoken-rs is
/// benchmarked on too.
static WORD_64KB: LazyLock<String> = LazyLock::new(|| "a".repeat(64 * 1024));

fn text(name: &str) -> &'static str {
    match name {
        "chat_2kb" => &CHAT_2KB,
        "document_100kb" => &DOCUMENT_100KB,
        "multilingual_24kb" => &MULTILINGUAL,
        "word_64kb" => &WORD_64KB,
        _ => unreachable!("unknown text {name}"),
    }
}

fn tiktoken(encoding: Encoding) -> &'static tiktoken_rs::CoreBPE {
    match encoding {
        Encoding::O200kBase => tiktoken_rs::o200k_base_singleton(),
        _ => tiktoken_rs::cl100k_base_singleton(),
    }
}

/// Exact counts, this crate against tiktoken-rs, on the same texts: `ours` and `tiktoken` in
/// each group, so one run gives the ratio. Both count the text as ordinary text (a special
/// token's string is counted by its characters): tiktoken-rs with `encode_ordinary`, which
/// also builds the token vector, since it has no count of its own.
mod count {
    use super::*;

    fn bench_ours(bencher: Bencher<'_, '_>, encoding: Encoding, text: &str) {
        let counter = TokenCounter::new(encoding);
        assert_eq!(
            counter.count(text),
            tiktoken(encoding).encode_ordinary(text).len()
        );
        bencher
            .counter(BytesCount::of_str(text))
            .bench(|| counter.count(black_box(text)));
    }

    fn bench_tiktoken(bencher: Bencher<'_, '_>, encoding: Encoding, text: &str) {
        let bpe = tiktoken(encoding);
        bencher
            .counter(BytesCount::of_str(text))
            .bench(|| bpe.encode_ordinary(black_box(text)).len());
    }

    macro_rules! text_group {
        ($name:ident) => {
            mod $name {
                use super::*;

                #[divan::bench(args = ENCODINGS)]
                fn ours(bencher: Bencher<'_, '_>, encoding: Encoding) {
                    bench_ours(bencher, encoding, text(stringify!($name)));
                }

                #[divan::bench(args = ENCODINGS)]
                fn tiktoken(bencher: Bencher<'_, '_>, encoding: Encoding) {
                    bench_tiktoken(bencher, encoding, text(stringify!($name)));
                }
            }
        };
    }

    text_group!(chat_2kb);
    text_group!(document_100kb);
    text_group!(multilingual_24kb);
    text_group!(word_64kb);

    /// The 1 MiB word, ours only: tiktoken-rs is benchmarked on the 64 KiB word instead, to
    /// keep its run bounded.
    #[divan::bench(args = ENCODINGS, sample_count = 20)]
    fn word_1mb_ours(bencher: Bencher<'_, '_>, encoding: Encoding) {
        let counter = TokenCounter::new(encoding);
        let text: &str = &WORD_1MB;
        bencher
            .counter(BytesCount::of_str(text))
            .bench(|| counter.count(black_box(text)));
    }
}

/// A limit far below what 1 MB can hold: decided from the length, nothing is encoded.
#[divan::bench(args = ENCODINGS)]
fn count_up_to_1k_word_1mb(bencher: Bencher<'_, '_>, encoding: Encoding) {
    let counter = TokenCounter::new(encoding);
    let text: &str = &WORD_1MB;
    bencher.bench(|| counter.count_up_to(black_box(text), black_box(1_000)));
}

/// A limit above the length bound (1 MiB / longest token ≈ 8 k), below the real count: the
/// worst case, where the one long piece is scanned and encoded.
#[divan::bench(args = ENCODINGS, sample_count = 20)]
fn count_up_to_10k_word_1mb(bencher: Bencher<'_, '_>, encoding: Encoding) {
    let counter = TokenCounter::new(encoding);
    let text: &str = &WORD_1MB;
    bencher
        .counter(BytesCount::of_str(text))
        .bench(|| counter.count_up_to(black_box(text), black_box(10_000)));
}

/// Many short pieces: counting stops after the first 10 001 of 200 000 tokens (1 MB of text).
#[divan::bench(args = ENCODINGS)]
fn count_up_to_10k_words_1mb(bencher: Bencher<'_, '_>, encoding: Encoding) {
    static WORDS: LazyLock<String> = LazyLock::new(|| " word".repeat(200_000));
    let counter = TokenCounter::new(encoding);
    let text: &str = &WORDS;
    bencher.bench(|| counter.count_up_to(black_box(text), black_box(10_000)));
}

/// English prose and Chinese prose from the test corpus (about 3 KB each), as is and
/// repeated to 1 MiB.
fn estimate_text(text: &str) -> &'static str {
    static ENGLISH: &str = include_str!("../tests/data/multilingual/english.txt");
    static CHINESE: &str = include_str!("../tests/data/multilingual/chinese.txt");
    static ENGLISH_1MB: LazyLock<String> = LazyLock::new(|| fill(&[ENGLISH], 1024 * 1024));
    static CHINESE_1MB: LazyLock<String> = LazyLock::new(|| fill(&[CHINESE], 1024 * 1024));
    match text {
        "english_3kb" => ENGLISH,
        "chinese_3kb" => CHINESE,
        "english_1mb" => &ENGLISH_1MB,
        _ => &CHINESE_1MB,
    }
}

const ESTIMATE_TEXTS: [&str; 4] = ["english_3kb", "chinese_3kb", "english_1mb", "chinese_1mb"];

/// The estimate: one table lookup per byte.
#[divan::bench(args = ESTIMATE_TEXTS)]
fn estimate_bytes(bencher: Bencher<'_, '_>, text: &str) {
    let text = estimate_text(text);
    bencher
        .counter(BytesCount::of_str(text))
        .bench(|| estimate(black_box(text)));
}

/// The old estimate, ⌈characters / 4⌉, for comparison (it undercounts CJK about 2×).
#[divan::bench(args = ESTIMATE_TEXTS)]
fn estimate_old_chars_div_4(bencher: Bencher<'_, '_>, text: &str) {
    let text = estimate_text(text);
    bencher
        .counter(BytesCount::of_str(text))
        .bench(|| black_box(text).chars().count().div_ceil(4));
}
