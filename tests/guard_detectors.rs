//! The built-in detectors: word lists, patterns, secrets and PII, through the public API.
#![cfg(feature = "guards")]

use std::collections::BTreeSet;

use proptest::prelude::*;
use tower_llm_policy::guard::detect::{ConfigError, Detector, Patterns, Pii, Secrets, WordList};

/// (label, matched text) of every match, in the order found.
fn hits(d: &dyn Detector, text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    d.find(text, &mut found);
    found
        .iter()
        .map(|f| (f.label.to_string(), text[f.range.clone()].to_string()))
        .collect()
}

/// The matched texts.
fn texts(d: &dyn Detector, text: &str) -> Vec<String> {
    hits(d, text).into_iter().map(|(_, t)| t).collect()
}

/// A small deterministic generator (xorshift64*), so keys look random but tests repeat.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn from(&mut self, alphabet: &str, len: usize) -> String {
        let a = alphabet.as_bytes();
        (0..len).map(|_| a[self.below(a.len())] as char).collect()
    }
}

const UPPER: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
const ALNUM: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const URLSAFE: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
const BASE64: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const UPPER_DIGITS: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const DIGITS: &str = "0123456789";

/// Random characters from `alphabet` with an upper, a lower case letter and a digit (as real
/// keys have; the detectors ask for that mix).
fn key_body(rng: &mut Rng, alphabet: &str, len: usize) -> String {
    loop {
        let s = rng.from(alphabet, len);
        if s.bytes().any(|b| b.is_ascii_uppercase())
            && s.bytes().any(|b| b.is_ascii_lowercase())
            && s.bytes().any(|b| b.is_ascii_digit())
        {
            return s;
        }
    }
}

/// One realistic key per label.
fn sample_secrets(seed: u64) -> Vec<(&'static str, String)> {
    let mut rng = Rng(seed | 1);
    let r = &mut rng;
    let pem_body: String = (0..20)
        .map(|_| format!("{}\n", r.from(BASE64, 64)))
        .collect();
    vec![
        ("openai_key", format!("sk-{}", key_body(r, ALNUM, 48))),
        (
            "openai_key",
            format!("sk-proj-{}", key_body(r, URLSAFE, 156)),
        ),
        (
            "openai_key",
            format!("sk-svcacct-{}", key_body(r, URLSAFE, 120)),
        ),
        (
            "openai_key",
            format!("sk-admin-{}", key_body(r, URLSAFE, 100)),
        ),
        (
            "anthropic_key",
            format!("sk-ant-api03-{}AA", key_body(r, URLSAFE, 93)),
        ),
        (
            "aws_access_key_id",
            format!("AKIA{}", r.from(UPPER_DIGITS, 16)),
        ),
        (
            "aws_access_key_id",
            format!("ASIA{}", r.from(UPPER_DIGITS, 16)),
        ),
        (
            "aws_secret_key",
            format!("aws_secret_access_key = {}", key_body(r, BASE64, 40)),
        ),
        ("github_token", format!("ghp_{}", key_body(r, ALNUM, 36))),
        ("github_token", format!("gho_{}", key_body(r, ALNUM, 36))),
        (
            "github_token",
            format!(
                "github_pat_{}_{}",
                key_body(r, ALNUM, 22),
                key_body(r, ALNUM, 59)
            ),
        ),
        (
            "slack_token",
            format!(
                "xoxb-{}-{}-{}",
                r.from(DIGITS, 13),
                r.from(DIGITS, 13),
                key_body(r, ALNUM, 24)
            ),
        ),
        (
            "slack_webhook",
            format!(
                "https://hooks.slack.com/services/T{}/B{}/{}",
                r.from(UPPER_DIGITS, 8),
                r.from(UPPER_DIGITS, 10),
                key_body(r, ALNUM, 24)
            ),
        ),
        (
            "google_api_key",
            format!("AIza{}", key_body(r, URLSAFE, 35)),
        ),
        ("stripe_key", format!("sk_live_{}", key_body(r, ALNUM, 24))),
        ("stripe_key", format!("rk_live_{}", key_body(r, ALNUM, 99))),
        (
            "jwt",
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
             eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.\
             SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
                .to_string(),
        ),
        (
            "private_key",
            format!("-----BEGIN RSA PRIVATE KEY-----\n{pem_body}-----END RSA PRIVATE KEY-----"),
        ),
        (
            "private_key",
            format!(
                "-----BEGIN OPENSSH PRIVATE KEY-----\n{pem_body}-----END OPENSSH PRIVATE KEY-----"
            ),
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// Secrets

#[test]
fn each_secret_is_found_with_its_label_in_realistic_text() {
    let secrets = Secrets::all();
    for seed in 1..=20 {
        for (label, secret) in sample_secrets(seed) {
            for text in [
                format!("here is my key: {secret}\nplease keep it safe"),
                format!("export X=\"{secret}\""),
                format!("{{\"key\": \"{secret}\"}}"),
                secret.clone(),
            ] {
                assert_eq!(
                    hits(&secrets, &text),
                    [(label.to_string(), secret.clone())],
                    "{label} in {text:?}"
                );
            }
        }
    }
}

#[test]
fn aws_secret_key_needs_its_name() {
    let secrets = Secrets::all();
    let mut rng = Rng(7);
    let value = key_body(&mut rng, BASE64, 40);
    for text in [
        format!("AWS_SECRET_ACCESS_KEY={value}"),
        format!("\"aws_secret_access_key\": \"{value}\""),
        format!("aws_secret_key: '{value}'"),
        format!("MY_AWS_SECRET_ACCESS_KEY={value}"),
    ] {
        let found = hits(&secrets, &text);
        assert_eq!(found.len(), 1, "{text}");
        assert_eq!(found[0].0, "aws_secret_key");
        assert!(found[0].1.ends_with(&value));
    }
    // The bare value is a 40-character string like any other.
    assert!(hits(&secrets, &format!("value {value} here")).is_empty());
    // Too long for the name's value.
    assert!(hits(&secrets, &format!("aws_secret_access_key={value}x")).is_empty());
}

#[test]
fn private_key_without_end_is_its_begin_line() {
    let secrets = Secrets::only(["private_key"]).unwrap();
    let text = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBK (truncated)";
    assert_eq!(texts(&secrets, text), ["-----BEGIN EC PRIVATE KEY-----"]);
    // A body longer than 4 KiB: the BEGIN line only.
    let long = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----",
        "A".repeat(5000)
    );
    assert_eq!(texts(&secrets, &long), ["-----BEGIN PRIVATE KEY-----"]);
    // Public keys are not secrets.
    let public = "-----BEGIN PUBLIC KEY-----\nMFkwEwYH\n-----END PUBLIC KEY-----";
    assert!(texts(&secrets, public).is_empty());
}

#[test]
fn secret_near_misses_are_not_found() {
    let secrets = Secrets::all();
    for text in [
        // A git commit id, a UUID, a timestamp, a version.
        "commit 3f786850e387550fdab836ed7e6dc881de23001b",
        "id 123e4567-e89b-12d3-a456-426614174000",
        "at 2026-12-03 19:00:22 running 1.2.3.4",
        // AKIA inside a longer base64 blob.
        "data:QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVoAKIAQ3EGRC7XTNWZ5K2P0123abcd==",
        "blob+AKIAQ3EGRC7XTNWZ5K2P/xyz",
        // Too short, too long, wrong alphabet.
        "AKIAQ3EGRC7XTNWZ5K2",
        "AKIAQ3EGRC7XTNWZ5K2PQ",
        "akiaq3egrc7xtnwz5k2p",
        // A slug that starts with sk-.
        "see sk-this-is-not-a-real-key-but-a-long-slug-name-ok",
        "ghp_tooShort123",
        "github_pat_short",
        // Test keys are not live keys.
        "sk_test_4eC39HqLyjWDarjtT1zdp7dc",
        // Only a JWT header.
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9",
    ] {
        assert!(
            hits(&secrets, text).is_empty(),
            "{text:?}: {:?}",
            hits(&secrets, text)
        );
    }
}

#[test]
fn tokens_glued_to_other_token_characters_are_not_found() {
    let secrets = Secrets::all();
    for (label, secret) in sample_secrets(99) {
        if secret.starts_with("-----") || secret.starts_with("aws_") {
            continue;
        }
        let mut glued = vec![format!("{secret}+"), format!("{secret}/")];
        // A URL stays a URL after anything.
        if label != "slack_webhook" {
            glued.extend([
                format!("x{secret}"),
                format!("+{secret}"),
                format!("/{secret}"),
            ]);
        }
        // Fixed-length tokens: one more letter makes them something else.
        if matches!(
            label,
            "aws_access_key_id" | "github_token" | "google_api_key" | "slack_webhook"
        ) {
            glued.push(format!("{secret}x"));
        }
        for glued in glued {
            assert!(hits(&secrets, &glued).is_empty(), "{glued}");
        }
    }
}

#[test]
fn only_picks_labels_and_refuses_unknown_ones() {
    let secrets = Secrets::only(["jwt"]).unwrap();
    let mut rng = Rng(3);
    let text = format!(
        "AKIA{} eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.{}",
        rng.from(UPPER, 16),
        rng.from(URLSAFE, 43)
    );
    assert_eq!(
        hits(&secrets, &text)
            .iter()
            .map(|h| h.0.as_str())
            .collect::<Vec<_>>(),
        ["jwt"]
    );
    let err = Secrets::only(["jwt", "passwords"]).unwrap_err();
    assert!(matches!(err, ConfigError::UnknownLabel { ref label, .. } if label == "passwords"));
    assert!(err.to_string().contains("github_token"), "{err}");
    let err = Pii::only(["ssn"]).unwrap_err();
    assert!(err.to_string().contains("us_ssn"), "{err}");
}

// ---------------------------------------------------------------------------------------
// PII

/// A Luhn-valid card number with this prefix and length.
fn card(rng: &mut Rng, prefix: &str, len: usize) -> String {
    let mut digits: Vec<u8> = prefix.bytes().map(|b| b - b'0').collect();
    while digits.len() < len - 1 {
        digits.push(rng.below(10) as u8);
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    digits.push(((10 - sum % 10) % 10) as u8);
    digits.iter().map(|d| char::from(b'0' + d)).collect()
}

fn group(number: &str, sizes: &[usize], sep: char) -> String {
    let mut out = String::new();
    let mut at = 0;
    for (i, &n) in sizes.iter().enumerate() {
        if i > 0 {
            out.push(sep);
        }
        out.push_str(&number[at..at + n]);
        at += n;
    }
    out
}

/// An IBAN with valid check digits for a country and BBAN.
fn iban(country: &str, bban: &str) -> String {
    let rearranged = format!("{bban}{country}00");
    let mut rem: u64 = 0;
    for c in rearranged.chars() {
        let v = c.to_digit(36).unwrap() as u64;
        rem = if v < 10 {
            (rem * 10 + v) % 97
        } else {
            (rem * 100 + v) % 97
        };
    }
    format!("{country}{:02}{bban}", 98 - rem)
}

fn spaced(compact: &str) -> String {
    compact
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn valid_cards_of_each_brand_are_found() {
    let pii = Pii::only(["credit_card"]).unwrap();
    let mut rng = Rng(11);
    let brands: &[(&str, usize, &[usize])] = &[
        ("4", 16, &[4, 4, 4, 4]),     // Visa
        ("4", 13, &[4, 4, 4, 1]),     // Visa, 13 digits
        ("4", 19, &[4, 4, 4, 4, 3]),  // Visa, 19 digits
        ("51", 16, &[4, 4, 4, 4]),    // Mastercard
        ("55", 16, &[4, 4, 4, 4]),    // Mastercard
        ("2221", 16, &[4, 4, 4, 4]),  // Mastercard 2-series
        ("2720", 16, &[4, 4, 4, 4]),  // Mastercard 2-series
        ("34", 15, &[4, 6, 5]),       // American Express
        ("37", 15, &[4, 6, 5]),       // American Express
        ("6011", 16, &[4, 4, 4, 4]),  // Discover
        ("65", 16, &[4, 4, 4, 4]),    // Discover
        ("644", 16, &[4, 4, 4, 4]),   // Discover
        ("3528", 16, &[4, 4, 4, 4]),  // JCB
        ("3589", 16, &[4, 4, 4, 4]),  // JCB
        ("36", 14, &[4, 6, 4]),       // Diners Club
        ("300", 14, &[4, 6, 4]),      // Diners Club
        ("62", 16, &[4, 4, 4, 4]),    // UnionPay
        ("62", 19, &[4, 4, 4, 4, 3]), // UnionPay
    ];
    for &(prefix, len, sizes) in brands {
        for _ in 0..5 {
            let number = card(&mut rng, prefix, len);
            for form in [
                number.clone(),
                group(&number, sizes, ' '),
                group(&number, sizes, '-'),
            ] {
                let text = format!("Card: {form}, exp 12/29.");
                assert_eq!(
                    texts(&pii, &text),
                    [form.as_str()],
                    "{prefix} {len}: {text}"
                );
            }
        }
    }
}

#[test]
fn card_near_misses_are_not_found() {
    let pii = Pii::only(["credit_card"]).unwrap();
    let mut rng = Rng(12);
    for _ in 0..50 {
        let valid = card(&mut rng, "4", 16);
        // The last digit changed: the Luhn check fails.
        let last = valid.as_bytes()[15] - b'0';
        let invalid = format!("{}{}", &valid[..15], (last + 1) % 10);
        assert!(
            texts(&pii, &format!("card {invalid}")).is_empty(),
            "{invalid}"
        );
        // A valid number in a longer run of digits or groups.
        assert!(texts(&pii, &format!("id 9{valid}")).is_empty());
        assert!(texts(&pii, &format!("{} 1234", group(&valid, &[4, 4, 4, 4], ' '))).is_empty());
        assert!(texts(&pii, &format!("v1.{valid}")).is_empty());
        // Mixed separators or odd groups.
        let odd = format!("{} {}-{}", &valid[..4], &valid[4..8], &valid[8..]);
        assert!(texts(&pii, &odd).is_empty(), "{odd}");
        let odd = format!("{} {}", &valid[..3], &valid[3..]);
        assert!(texts(&pii, &odd).is_empty(), "{odd}");
    }
    // Luhn-valid, but no brand starts so (and the wrong length for Visa).
    let unknown = card(&mut rng, "1", 16);
    assert!(texts(&pii, &unknown).is_empty());
    let visa15 = card(&mut rng, "4", 15);
    assert!(texts(&pii, &visa15).is_empty());
}

#[test]
fn valid_ibans_of_several_countries_are_found() {
    let pii = Pii::only(["iban"]).unwrap();
    let mut rng = Rng(21);
    let cases: Vec<(&str, String)> = vec![
        ("DE", rng.from(DIGITS, 18)),
        (
            "FR",
            format!(
                "{}{}{}",
                rng.from(DIGITS, 10),
                rng.from(ALNUM, 11).to_uppercase(),
                rng.from(DIGITS, 2)
            ),
        ),
        ("GB", format!("WEST{}", rng.from(DIGITS, 14))),
        ("NL", format!("ABNA{}", rng.from(DIGITS, 10))),
        ("ES", rng.from(DIGITS, 20)),
        ("IT", format!("X{}", rng.from(DIGITS, 22))),
        ("BE", rng.from(DIGITS, 12)),
        ("CH", rng.from(DIGITS, 17)),
        ("AT", rng.from(DIGITS, 16)),
        ("PL", rng.from(DIGITS, 24)),
        ("NO", rng.from(DIGITS, 11)),
        ("MT", format!("MALT{}", rng.from(DIGITS, 23))),
    ];
    for (country, bban) in cases {
        let compact = iban(country, &bban);
        for form in [compact.clone(), spaced(&compact)] {
            let text = format!("Please pay to {form}. Thanks");
            assert_eq!(texts(&pii, &text), [form.as_str()], "{text}");
        }
        // Wrong check digits.
        let check: u32 = compact[2..4].parse().unwrap();
        let wrong = format!("{country}{:02}{bban}", (check + 1) % 100);
        assert!(texts(&pii, &wrong).is_empty(), "{wrong}");
        // A character changed.
        let mut changed = compact.clone().into_bytes();
        let at = 6;
        changed[at] = if changed[at] == b'1' { b'2' } else { b'1' };
        let changed = String::from_utf8(changed).unwrap();
        assert!(texts(&pii, &changed).is_empty(), "{changed}");
    }
    // The documented example; too short and too long for Germany.
    assert_eq!(
        texts(&pii, "DE89 3704 0044 0532 0130 00"),
        ["DE89 3704 0044 0532 0130 00"]
    );
    assert!(texts(&pii, "DE89 3704 0044 0532 0130 0").is_empty());
    assert!(texts(&pii, "XX89 3704 0044 0532 0130 00").is_empty());
    assert!(texts(&pii, "DE89 37040044 0532013000").is_empty());
}

#[test]
fn emails_are_found() {
    let pii = Pii::only(["email"]).unwrap();
    for email in [
        "jane.doe+newsletter@mail.example.co.uk",
        "a_b-c@sub.domain.io",
        "X@example.museum",
        "first.last%dept@corp-mail.example.com",
    ] {
        let text = format!("Write to <{email}>, or ({email}).");
        assert_eq!(texts(&pii, &text), [email, email], "{text}");
    }
    for not in [
        "user@localhost",
        "@example.com",
        "john@",
        "a@b.c",
        "x@-bad.com",
    ] {
        assert!(texts(&pii, not).is_empty(), "{not}");
    }
}

#[test]
fn phones_in_several_formats_are_found() {
    let pii = Pii::only(["phone"]).unwrap();
    for phone in [
        "+1 (415) 555-2671",
        "+14155552671",
        "+44 20 7946 0958",
        "+44 (0)20 7946 0958",
        "+49 30 12345678",
        "+33 1 23 45 67 89",
        "+31 6 12345678",
        "(415) 555-2671",
        "415-555-2671",
        "415.555.2671",
        "415 555 2671",
        "030 12345678",
        "020 7946 0958",
        "01 23 45 67 89",
        "06-12345678",
    ] {
        let text = format!("Call me at {phone} tomorrow.");
        let found = texts(&pii, &text);
        assert!(found.contains(&phone.to_string()), "{phone}: {found:?}");
        // Overlapping matches (a national number inside an international one) are fine;
        // nothing reaches outside the number.
        for f in &found {
            assert!(phone.contains(f.as_str()), "{phone}: {found:?}");
        }
    }
}

#[test]
fn numbers_that_are_not_phones_are_not_found() {
    let pii = Pii::all();
    for text in [
        "order 4155552671 shipped",
        "order #20261203190022",
        "at 2026-12-03 19:00:22 UTC",
        "on 03.12.2026 10:00",
        "on 01.02.2026 10 guests",
        "version 1.2.3.4 and 10.0.19045.3693",
        "price $1,299.00 or 1.299,00 EUR",
        "in 2026 we had 1000000 users",
        "call 555-1234",
        "ratio 0.12.345.6789",
        "ip 192.168.100.200",
        "timestamp 1764788422000",
        "build 2026.12.03.1900",
        "+1234",
    ] {
        assert!(
            hits(&pii, text).is_empty(),
            "{text}: {:?}",
            hits(&pii, text)
        );
    }
}

#[test]
fn ssns_outside_unissued_ranges_are_found() {
    let pii = Pii::only(["us_ssn"]).unwrap();
    assert_eq!(texts(&pii, "SSN: 078-05-1120."), ["078-05-1120"]);
    assert_eq!(texts(&pii, "ssn 899-99-9999"), ["899-99-9999"]);
    for not in [
        "000-12-3456",
        "666-12-3456",
        "900-12-3456",
        "999-12-3456",
        "123-00-4567",
        "123-45-0000",
        "1123-45-6789",
        "123-45-67890",
        "123-45-6789-1",
        "123 45 6789",
    ] {
        assert!(texts(&pii, not).is_empty(), "{not}");
    }
}

#[test]
fn numbers_glued_to_others_are_not_found() {
    let pii = Pii::all();
    for number in [
        "078-05-1120",
        "4111111111111111",
        "4111 1111 1111 1111",
        "+44 20 7946 0958",
        "(415) 555-2671",
        "415-555-2671",
        "030 12345678",
        "DE89370400440532013000",
    ] {
        // Alone, or between punctuation: found.
        for text in [
            number.to_string(),
            format!("[{number}]"),
            format!("\"{number}\","),
            format!("no: {number}; yes"),
        ] {
            assert!(!hits(&pii, &text).is_empty(), "{text}");
        }
        // Glued to a letter, a digit, or (numbers) a sign or a path: not found.
        let mut glued = vec![
            format!("x{number}"),
            format!("{number}x"),
            format!("7{number}"),
            format!("{number}7"),
        ];
        if !number.starts_with("DE") {
            glued.extend([
                format!("-{number}"),
                format!(".{number}"),
                format!("/{number}"),
                format!("{number}-7"),
                format!("{number}.7"),
            ]);
        }
        for glued in glued {
            let found = hits(&pii, &glued);
            assert!(found.iter().all(|(_, t)| t != number), "{glued}: {found:?}");
        }
    }
}

#[test]
fn pii_near_misses_are_not_found() {
    let pii = Pii::all();
    for text in [
        "commit 3f786850e387550fdab836ed7e6dc881de23001b",
        "id 123e4567-e89b-12d3-a456-426614174000",
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    ] {
        assert!(
            hits(&pii, text).is_empty(),
            "{text}: {:?}",
            hits(&pii, text)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Word lists

#[test]
fn profanity_obfuscations_are_found_with_original_ranges() {
    let list = WordList::profanity();
    for word in [
        "fuck",
        "FUCK",
        "f u c k",
        "f.u.c.k",
        "f-u-c-k",
        "f_u_c_k",
        "f*ck",
        "sh1t",
        "$h!t",
        "a55hole",
        "@sshole",
        "fu\u{0441}k",                  // Cyrillic с
        "\u{0430}ss",                   // Cyrillic а
        "ＦＵＣＫ",                     // fullwidth
        "fu\u{200D}ck",                 // zero-width joiner
        "f\u{200B}u\u{200B}c\u{200B}k", // zero-width spaces
        "sh\u{00AD}it",                 // soft hyphen
        "fu\u{0308}ck",                 // combining diaeresis
        "fück",
        "b1tch",
        "motherf*cker",
    ] {
        let text = format!("you {word}!");
        let found = hits(&list, &text);
        assert_eq!(found.len(), 1, "{word:?}: {found:?}");
        assert_eq!(found[0].0, "profanity");
        assert_eq!(found[0].1, word, "{word:?}");
    }
}

#[test]
fn profanity_hard_negatives_are_not_found() {
    let list = WordList::profanity();
    for text in [
        "The class assistant met in Scunthorpe for a cocktail on the grass.",
        "My therapist recommends shiitake and shitake mushrooms.",
        "Hancock passed the bass; the bassist assumed a classic assassin pose.",
        "Analysis of cumulative documents in Sussex and Essex.",
        "Pussycat, cocktails, Dickens, dickensian, Matsushita, scrapbook, skyscraper.",
        "Assess the mass of a titanium shell; a passage, an embassy, a cockpit.",
        "Galaxy A55, 455 units, $50 each, 1.2.3, version 3.5.1, 5h later.",
        "I am a cat; U S A is a country; e.g. a b c.",
        "Shittim wood, Cockburn, Penistone, Clitheroe.",
    ] {
        let found = hits(&list, text);
        assert!(found.is_empty(), "{text}: {found:?}");
    }
}

#[test]
fn names_can_collide_with_list_words() {
    // Documented: whole words are found even when they are names.
    let list = WordList::profanity();
    assert_eq!(texts(&list, "Dick Van Dyke"), ["Dick"]);
}

#[test]
fn custom_lists() {
    let list = WordList::new(["Project Falcon", "ACME"])
        .unwrap()
        .label("codename");
    let text = "The project falcon deck, by Acme (not acmeology).";
    assert_eq!(
        hits(&list, text),
        [
            ("codename".to_string(), "project falcon".to_string()),
            ("codename".to_string(), "Acme".to_string())
        ]
    );
    let substrings = WordList::new(["acme"]).unwrap().whole_words(false);
    assert_eq!(texts(&substrings, "acmeology"), ["acme"]);
    let plain = WordList::new(["falcon"]).unwrap();
    assert!(texts(&plain, "f a l c o n, FALC0N").is_empty());
    let obfuscated = plain.obfuscations(true);
    assert_eq!(
        texts(&obfuscated, "f a l c o n, FALC0N"),
        ["f a l c o n", "FALC0N"]
    );
    assert!(matches!(
        WordList::new(["a", ""]),
        Err(ConfigError::BlankWord { index: 1 })
    ));
}

#[test]
fn case_insensitive_on_any_text() {
    let list = WordList::new(["damn", "kelvin"]).unwrap();
    // Non-ASCII that lowercasing leaves alone (searched as it is), and not (normalized).
    assert_eq!(texts(&list, "café DAMN naïve"), ["DAMN"]);
    assert_eq!(
        texts(&list, "ÇA DAMN \u{212A}ELVIN"),
        ["DAMN", "\u{212A}ELVIN"]
    );
}

#[test]
fn non_ascii_text_gives_original_ranges() {
    let list = WordList::new(["größe", "ǅemal"]).unwrap();
    let text = "Die GRÖSSE? Nein: die GRÖẞE, ǄEMAL und ǆemal.";
    // `ß` lowercases to itself and `ẞ` to `ß`; `SS` is not `ß` (no full case folding).
    assert_eq!(texts(&list, text), ["GRÖẞE", "ǄEMAL", "ǆemal"]);
}

// ---------------------------------------------------------------------------------------
// Patterns

#[test]
fn patterns_with_labels() {
    let p = Patterns::new([
        ("ticket", r"\bTICKET-[0-9]{1,8}\b"),
        ("codename", r"\bproject [a-z]{3,16}\b"),
    ])
    .unwrap();
    let text = "Ticket-42 is about Project Falcon; ticket-123456789 is too long.";
    assert_eq!(
        hits(&p, text),
        [
            ("ticket".to_string(), "Ticket-42".to_string()),
            ("codename".to_string(), "Project Falcon".to_string())
        ]
    );
    let err = Patterns::new([("id", r"[0-9]+")]).unwrap_err();
    assert!(
        err.to_string().contains("{0,64}") || err.to_string().contains("{1,64}"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// Properties: no panics, ranges on character boundaries, locality

fn detectors() -> Vec<(&'static str, Box<dyn Detector>)> {
    vec![
        ("profanity", Box::new(WordList::profanity())),
        (
            "words",
            Box::new(WordList::new(["secret project", "acme", "ass", "日本"]).unwrap()),
        ),
        (
            "words_substrings",
            Box::new(
                WordList::new(["fuck", "acme", "a a"])
                    .unwrap()
                    .whole_words(false)
                    .obfuscations(true),
            ),
        ),
        (
            "patterns",
            Box::new(
                Patterns::new([
                    ("ticket", r"\bT-[0-9]{1,6}\b"),
                    ("runs", r"a{1,3}b?"),
                    ("line", r"(?m)^acme[0-9]{0,3}$"),
                ])
                .unwrap(),
            ),
        ),
        ("secrets", Box::new(Secrets::all())),
        ("pii", Box::new(Pii::all())),
    ]
}

/// Pieces that random texts are made of: near-matches, separators, look-alikes, ignorables.
fn pieces() -> Vec<String> {
    let mut p: Vec<String> = [
        " ",
        " ",
        " ",
        ".",
        "-",
        "_",
        "*",
        "\n",
        ",",
        "@",
        "$",
        "!",
        "+",
        "/",
        "=",
        "(",
        ")",
        "0",
        "1",
        "3",
        "4",
        "5",
        "7",
        "9",
        "a",
        "b",
        "c",
        "f",
        "k",
        "s",
        "u",
        "A",
        "T",
        "the ",
        "class ",
        "assistant ",
        "fuck",
        "f u c k",
        "sh1t",
        "ass",
        "a55",
        "acme",
        "secret project",
        "\u{200B}",
        "\u{200D}",
        "\u{0301}",
        "\u{00AD}",
        "\u{0430}",
        "\u{0441}",
        "Ｆ",
        "é",
        "ẞ",
        "日本",
        "🦀",
        "T-12",
        "aaa",
        "acme12",
        "AKIA",
        "sk-",
        "sk-ant-api03-",
        "ghp_",
        "xoxb-",
        "AIza",
        "eyJ",
        ".eyJ",
        "sk_live_",
        "github_pat_",
        "aws_secret_access_key=",
        "https://hooks.slack.com/services/T",
        "-----BEGIN RSA PRIVATE KEY-----\n",
        "\n-----END RSA PRIVATE KEY-----",
        "jane.doe",
        "@example.com",
        "+44 ",
        "20 ",
        "7946 ",
        "0958",
        "(415) ",
        "555-2671",
        "030 ",
        "4111 1111 1111 1111",
        "4111",
        "1111",
        "DE89",
        " 3704 0044 0532 0130 00",
        "078-05-1120",
        "-05-",
        "2026-12-03 19:00:22",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (_, secret) in sample_secrets(5) {
        p.push(secret);
    }
    // Whole matches, several times each, so that every detector finds things.
    for _ in 0..4 {
        for s in [
            "f u c k",
            "sh1t",
            "fu\u{200B}ck",
            "\u{0430}sshole",
            "ＦＵＣＫ",
            "a55hole",
            "f.u.c.k",
            "$h!t",
            "bullshit",
            "son of a bitch",
            "Secret  Project",
            "jane.doe+x@mail.example.com",
            "+44 20 7946 0958",
            "(415) 555-2671",
            "415-555-2671",
            "030 12345678",
            "4111 1111 1111 1111",
            "378282246310005",
            "DE89 3704 0044 0532 0130 00",
            "GB82WEST12345698765432",
            "078-05-1120",
        ] {
            p.push(s.to_string());
        }
    }
    p
}

/// A text of at least `len` bytes from random pieces and random runs.
fn random_text(seed: u64, len: usize, pieces: &[String]) -> String {
    let mut rng = Rng(seed | 1);
    let mut text = String::new();
    while text.len() < len {
        match rng.below(10) {
            0 => {
                let n = 1 + rng.below(50);
                text.push_str(&rng.from(ALNUM, n))
            }
            1 => {
                let n = 1 + rng.below(20);
                text.push_str(&rng.from(DIGITS, n))
            }
            2 => {
                let n = 1 + rng.below(70);
                text.push_str(&rng.from(BASE64, n))
            }
            3 => text.push(char::from_u32(rng.below(0x3000) as u32).unwrap_or('x')),
            _ => text.push_str(&pieces[rng.below(pieces.len())]),
        }
        // Most pieces stand alone, as words do.
        match rng.below(8) {
            0..=4 => text.push(' '),
            5 => text.push_str(". "),
            _ => {}
        }
    }
    text
}

fn floor_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

type Match = (usize, usize, String);

fn matches_in(d: &dyn Detector, text: &str, offset: usize) -> BTreeSet<Match> {
    let mut found = Vec::new();
    d.find(text, &mut found);
    found
        .into_iter()
        .map(|f| {
            (
                f.range.start + offset,
                f.range.end + offset,
                f.label.into_owned(),
            )
        })
        .collect()
}

/// A scan of the window `[a, b)` finds what a scan of the whole text finds, away from the
/// window's edges.
fn check_locality(d: &dyn Detector, text: &str, a: usize, b: usize) -> Result<(), TestCaseError> {
    let margin = d.max_match_len() + d.context();
    let a = floor_boundary(text, a);
    let b = floor_boundary(text, b);
    if b < a + 2 * margin {
        return Ok(());
    }
    let (lo, hi) = (a + margin, b - margin);
    let inside = |m: &Match| m.0 >= lo && m.1 <= hi;
    let whole: BTreeSet<Match> = matches_in(d, text, 0).into_iter().filter(inside).collect();
    let window: BTreeSet<Match> = matches_in(d, &text[a..b], a)
        .into_iter()
        .filter(inside)
        .collect();
    prop_assert_eq!(whole, window, "window {}..{}", a, b);
    Ok(())
}

fn check_ranges(d: &dyn Detector, text: &str) -> Result<(), TestCaseError> {
    let mut found = Vec::new();
    d.find(text, &mut found);
    for f in found {
        prop_assert!(f.range.start < f.range.end, "{:?}", f);
        prop_assert!(f.range.end <= text.len());
        prop_assert!(text.is_char_boundary(f.range.start) && text.is_char_boundary(f.range.end));
        prop_assert!(
            f.range.len() <= d.max_match_len(),
            "{:?} > {}",
            f,
            d.max_match_len()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_unicode_gives_ranges_on_char_boundaries(text in any::<String>()) {
        for (_, d) in detectors() {
            check_ranges(&*d, &text)?;
        }
    }

    #[test]
    fn near_miss_texts_give_ranges_on_char_boundaries(seed in any::<u64>(), len in 0usize..3000) {
        let text = random_text(seed, len, &pieces());
        for (_, d) in detectors() {
            check_ranges(&*d, &text)?;
        }
    }

    #[test]
    fn every_detector_is_local(seed in any::<u64>(), a in 0.0f64..0.3, b in 0.7f64..1.0) {
        let pieces = pieces();
        for (_, d) in detectors() {
            let margin = d.max_match_len() + d.context();
            let text = random_text(seed, 2 * margin + 4000, &pieces);
            let len = text.len() as f64;
            check_locality(&*d, &text, (a * len) as usize, (b * len) as usize)?;
        }
    }
}

#[test]
fn detectors_are_local_on_many_windows() {
    // A denser check than the property above: one text, many windows.
    let pieces = pieces();
    for (name, d) in detectors() {
        if name == "secrets" {
            continue; // checked by the property; its margin makes windows large
        }
        let margin = d.max_match_len() + d.context();
        let text = random_text(42, 2 * margin + 3000, &pieces);
        for step in 0..40 {
            let a = step * 37;
            let b = text.len() - step * 23;
            check_locality(&*d, &text, a, b).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
