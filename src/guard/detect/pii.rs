//! [`Pii`]: e-mail addresses, phone numbers, payment cards, IBANs and US social security
//! numbers.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::OnceLock;

use super::patterns::{Check, Patterns, Rule};
use super::secrets::select;
use super::{ConfigError, Detector, Found};

/// The labels of [`Pii`], as [`ConfigError::UnknownLabel`] lists them.
const KNOWN: &str = "email, phone, credit_card, iban, us_ssn";

/// (label, pattern, validator). Patterns are case-sensitive.
const SPECS: &[(&str, &str, Check)] = &[
    (
        "email",
        r"[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}",
        email,
    ),
    // International: `+`, country code, groups.
    (
        "phone",
        r"\+[1-9][0-9]{0,3}(?:[ .-]?(?:\([0-9]{1,4}\)|[0-9]{1,6})){1,7}",
        international_phone,
    ),
    // North American: (555) 123-4567, 555-123-4567, 555.123.4567, 555 123 4567.
    (
        "phone",
        r"(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[ .-])[2-9][0-9]{2}[ .-][0-9]{4}",
        national_phone,
    ),
    // National with a trunk 0 (Europe and others): 030 12345678, 01 23 45 67 89,
    // 020 7946 0958, 06-12345678.
    (
        "phone",
        r"0[1-9][0-9]{0,3}(?:[ ./-][0-9]{2,8}){1,4}",
        trunk_phone,
    ),
    ("credit_card", r"[0-9](?:[ -]?[0-9]){12,18}", credit_card),
    (
        "iban",
        r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?",
        iban,
    ),
    ("us_ssn", r"[0-9]{3}-[0-9]{2}-[0-9]{4}", us_ssn),
];

fn rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| {
        SPECS
            .iter()
            .map(|&(label, pattern, check)| {
                match Rule::new(Cow::Borrowed(label), pattern, false, Some(check)) {
                    Ok(rule) => rule,
                    // Constant patterns; a unit test compiles each.
                    Err(e) => unreachable!("built-in PII pattern {label}: {e}"),
                }
            })
            .collect()
    })
}

/// Finds personal data, each with its label:
///
/// | label | what |
/// |---|---|
/// | `email` | e-mail addresses (`first.last+tag@mail.example.co.uk`) |
/// | `phone` | `+` and a country code (`+44 20 7946 0958`, `+1 (415) 555-2671`, `+14155552671`), North American numbers with separators (`(415) 555-2671`, `415-555-2671`, `415.555.2671`), national numbers with a trunk `0` and separators (`030 12345678`, `01 23 45 67 89`, `06-12345678`); 9 to 15 digits |
/// | `credit_card` | 13 to 19 digits, plain or in groups separated by single spaces or dashes (4-4-4-4, 4-6-5, ...), that pass the Luhn check and start like a Visa, Mastercard, American Express, Discover, JCB, Diners Club or UnionPay card of that length |
/// | `iban` | IBANs of the countries of the ISO 13616 registry (SEPA and others) with the country's length and valid mod-97 check digits, compact or in groups of 4 |
/// | `us_ssn` | US social security numbers `AAA-GG-SSSS` (dashed form only) outside the ranges never issued (area 000, 666, 900-999; group 00; serial 0000) |
///
/// Conservative: phone numbers need separators (a bare `4155552671` is not one) or a `+`,
/// and plain long numbers (order ids, timestamps like `2026-12-03 19:00:22`, versions like
/// `1.2.3.4`, prices) are not phone numbers or cards; a number that is part of a longer
/// run of digits, letters or groups is not reported. Validators (Luhn, mod 97, ranges) run
/// on the regex candidates, so a scan stays linear.
///
/// ```
/// use tower_llm_policy::guard::detect::{Detector, Pii};
///
/// let pii = Pii::all();
/// let text = "Mail jane.doe+billing@mail.example.com or call +44 20 7946 0958. \
///             Card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00. Order 20261203190022.";
/// let mut found = Vec::new();
/// pii.find(text, &mut found);
/// let mut hits: Vec<(&str, &str)> =
///     found.iter().map(|f| (&*f.label, &text[f.range.clone()])).collect();
/// hits.sort();
/// assert_eq!(hits, [
///     ("credit_card", "4111 1111 1111 1111"),
///     ("email", "jane.doe+billing@mail.example.com"),
///     ("iban", "DE89 3704 0044 0532 0130 00"),
///     ("phone", "+44 20 7946 0958"),
/// ]);
/// ```
#[derive(Clone, Debug)]
pub struct Pii {
    patterns: Patterns,
}

impl Pii {
    /// Every built-in kind of personal data (see the table).
    pub fn all() -> Self {
        Pii {
            patterns: Patterns::from_rules(rules().to_vec()),
        }
    }

    /// The built-in kinds with these labels.
    ///
    /// # Errors
    ///
    /// [`ConfigError::UnknownLabel`] (listing the known labels) for a label not in the
    /// table, [`ConfigError::NoPatterns`] for no labels.
    pub fn only<I>(labels: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Ok(Pii {
            patterns: select(rules(), labels, KNOWN)?,
        })
    }

    /// The labels this detector reports (once each).
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        let mut seen: Vec<&str> = Vec::new();
        self.patterns.labels().filter(move |l| {
            let new = !seen.contains(l);
            if new {
                seen.push(l);
            }
            new
        })
    }
}

impl Detector for Pii {
    fn find(&self, text: &str, found: &mut Vec<Found>) {
        self.patterns.find(text, found);
    }

    fn max_match_len(&self) -> usize {
        self.patterns.max_match_len()
    }

    fn context(&self) -> usize {
        self.patterns.context()
    }
}

fn before(text: &str, range: &Range<usize>) -> Option<char> {
    text[..range.start].chars().next_back()
}

fn before2(text: &str, range: &Range<usize>) -> Option<char> {
    let mut chars = text[..range.start].chars();
    chars.next_back();
    chars.next_back()
}

fn after(text: &str, range: &Range<usize>) -> Option<char> {
    text[range.end..].chars().next()
}

fn after2(text: &str, range: &Range<usize>) -> Option<char> {
    let mut chars = text[range.end..].chars();
    chars.next();
    chars.next()
}

fn is(c: Option<char>, f: impl Fn(char) -> bool) -> bool {
    c.is_some_and(f)
}

fn digit(c: char) -> bool {
    c.is_ascii_digit()
}

fn digits(s: &str) -> usize {
    s.bytes().filter(u8::is_ascii_digit).count()
}

/// Not glued to a longer number: no letter or digit right before or after, and no
/// `<separator><digit>` either side (a group of a longer grouped number).
fn number_alone(text: &str, range: &Range<usize>, separators: &[char]) -> bool {
    let glued = |c: char| c.is_alphanumeric() || c == '_';
    let b = before(text, range);
    let a = after(text, range);
    let grouped_before = is(b, |c| separators.contains(&c)) && is(before2(text, range), digit);
    let grouped_after = is(a, |c| separators.contains(&c)) && is(after2(text, range), digit);
    !(is(b, glued) || is(a, glued) || grouped_before || grouped_after)
}

fn email(text: &str, range: Range<usize>) -> bool {
    let local = |c: char| c.is_ascii_alphanumeric() || "._%+-".contains(c);
    !is(before(text, &range), local)
        && !is(after(text, &range), |c| {
            c.is_alphanumeric() || c == '-' || c == '_' || c == '@'
        })
}

fn international_phone(text: &str, range: Range<usize>) -> bool {
    let number = &text[range.clone()];
    (9..=15).contains(&digits(number))
        && !is(before(text, &range), |c| "+-./".contains(c))
        && number_alone(text, &range, &[' ', '.', '-', ':'])
}

fn national_phone(text: &str, range: Range<usize>) -> bool {
    !is(before(text, &range), |c| "+-./:".contains(c))
        && number_alone(text, &range, &['.', '-', '/', ':'])
}

fn trunk_phone(text: &str, range: Range<usize>) -> bool {
    let number = &text[range.clone()];
    let mut separators = number.chars().filter(|c| !c.is_ascii_digit());
    let first = separators.next();
    (9..=12).contains(&digits(number))
        && separators.all(|c| Some(c) == first)
        && !is(before(text, &range), |c| "+-./:,".contains(c))
        && number_alone(text, &range, &[' ', '.', '-', '/', ':'])
}

fn credit_card(text: &str, range: Range<usize>) -> bool {
    let number = &text[range.clone()];
    let mut buf = [0u8; 19];
    let mut n = 0;
    let mut groups = [0usize; 19];
    let mut g = 0;
    let mut separator = None;
    for b in number.bytes() {
        if b.is_ascii_digit() {
            if n == buf.len() {
                return false;
            }
            buf[n] = b - b'0';
            n += 1;
            groups[g] += 1;
        } else {
            if separator.is_some_and(|s| s != b) {
                return false;
            }
            separator = Some(b);
            g += 1;
        }
    }
    let digits = &buf[..n];
    let groups = &groups[..=g];
    let grouped = match groups {
        [_] => true,
        [4, 6, 5] | [4, 6, 4] => true,
        [init @ .., last] => init.iter().all(|&l| l == 4) && (1..=4).contains(last),
        [] => false,
    };
    grouped
        && (13..=19).contains(&n)
        && brand_fits(digits)
        && luhn(digits)
        && number_alone(text, &range, &[' ', '-', '.', ','])
        && !is(before(text, &range), |c| "+-./".contains(c))
}

/// The Luhn check of a card number's digits.
pub(crate) fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

/// Whether a number starts like a major brand's card of its length.
fn brand_fits(digits: &[u8]) -> bool {
    let prefix = |len: usize| {
        digits[..len.min(digits.len())]
            .iter()
            .fold(0u32, |acc, &d| acc * 10 + u32::from(d))
    };
    let n = digits.len();
    let (p1, p2, p3, p4) = (prefix(1), prefix(2), prefix(3), prefix(4));
    // Visa
    (p1 == 4 && matches!(n, 13 | 16 | 19))
        // Mastercard
        || (((51..=55).contains(&p2) || (2221..=2720).contains(&p4)) && n == 16)
        // American Express
        || (matches!(p2, 34 | 37) && n == 15)
        // Discover
        || ((p4 == 6011 || (644..=649).contains(&p3) || p2 == 65) && (16..=19).contains(&n))
        // JCB
        || ((3528..=3589).contains(&p4) && (16..=19).contains(&n))
        // Diners Club
        || (((300..=305).contains(&p3) || matches!(p2, 36 | 38 | 39)) && (14..=19).contains(&n))
        // UnionPay
        || (p2 == 62 && (16..=19).contains(&n))
}

/// IBAN lengths by country (the ISO 13616 registry).
const IBAN_LENGTHS: &[(&str, usize)] = &[
    ("AD", 24),
    ("AE", 23),
    ("AL", 28),
    ("AT", 20),
    ("AZ", 28),
    ("BA", 20),
    ("BE", 16),
    ("BG", 22),
    ("BH", 22),
    ("BR", 29),
    ("BY", 28),
    ("CH", 21),
    ("CR", 22),
    ("CY", 28),
    ("CZ", 24),
    ("DE", 22),
    ("DK", 18),
    ("DO", 28),
    ("EE", 20),
    ("EG", 29),
    ("ES", 24),
    ("FI", 18),
    ("FO", 18),
    ("FR", 27),
    ("GB", 22),
    ("GE", 22),
    ("GI", 23),
    ("GL", 18),
    ("GR", 27),
    ("GT", 28),
    ("HR", 21),
    ("HU", 28),
    ("IE", 22),
    ("IL", 23),
    ("IQ", 23),
    ("IS", 26),
    ("IT", 27),
    ("JO", 30),
    ("KW", 30),
    ("KZ", 20),
    ("LB", 28),
    ("LC", 32),
    ("LI", 21),
    ("LT", 20),
    ("LU", 20),
    ("LV", 21),
    ("MC", 27),
    ("MD", 24),
    ("ME", 22),
    ("MK", 19),
    ("MR", 27),
    ("MT", 31),
    ("MU", 30),
    ("NL", 18),
    ("NO", 15),
    ("PK", 24),
    ("PL", 28),
    ("PS", 29),
    ("PT", 25),
    ("QA", 29),
    ("RO", 24),
    ("RS", 22),
    ("SA", 24),
    ("SC", 31),
    ("SE", 24),
    ("SI", 19),
    ("SK", 24),
    ("SM", 27),
    ("ST", 25),
    ("SV", 28),
    ("TL", 23),
    ("TN", 24),
    ("TR", 26),
    ("UA", 29),
    ("VA", 22),
    ("VG", 24),
    ("XK", 20),
];

fn iban(text: &str, range: Range<usize>) -> bool {
    let found = &text[range.clone()];
    let compact: Vec<u8> = found.bytes().filter(|&b| b != b' ').collect();
    let spaces = found.len() - compact.len();
    // Compact, or a space before every group of 4.
    let spacing = spaces == 0 || spaces == (compact.len() - 1) / 4;
    let length = IBAN_LENGTHS
        .iter()
        .find(|(cc, _)| cc.as_bytes() == &compact[..2])
        .is_some_and(|&(_, len)| len == compact.len());
    spacing
        && length
        && iban_check(&compact)
        && !is(before(text, &range), char::is_alphanumeric)
        && !is(after(text, &range), char::is_alphanumeric)
}

/// The ISO 13616 mod-97 check of a compact IBAN (ASCII capitals and digits).
pub(crate) fn iban_check(iban: &[u8]) -> bool {
    if iban.len() < 5 {
        return false;
    }
    let mut rem: u32 = 0;
    for &b in iban[4..].iter().chain(&iban[..4]) {
        rem = match b {
            b'0'..=b'9' => (rem * 10 + u32::from(b - b'0')) % 97,
            b'A'..=b'Z' => (rem * 100 + u32::from(b - b'A' + 10)) % 97,
            _ => return false,
        };
    }
    rem == 1
}

fn us_ssn(text: &str, range: Range<usize>) -> bool {
    let s = text[range.clone()].as_bytes();
    let area = &s[0..3];
    let group = &s[4..6];
    let serial = &s[7..11];
    area != b"000"
        && area != b"666"
        && area[0] != b'9'
        && group != b"00"
        && serial != b"0000"
        && !is(before(text, &range), |c| "+-./".contains(c))
        && number_alone(text, &range, &['-', '.', '/'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits_of(s: &str) -> Vec<u8> {
        s.bytes().map(|b| b - b'0').collect()
    }

    #[test]
    fn every_pattern_compiles() {
        let pii = Pii::all();
        assert_eq!(pii.labels().collect::<Vec<_>>().join(", "), KNOWN);
        assert!(pii.max_match_len() < 700, "{}", pii.max_match_len());
    }

    #[test]
    fn luhn_known_values() {
        assert!(luhn(&digits_of("4111111111111111")));
        assert!(luhn(&digits_of("79927398713")));
        assert!(!luhn(&digits_of("79927398710")));
        assert!(!luhn(&digits_of("4111111111111112")));
        assert!(luhn(&digits_of("378282246310005")));
        assert!(luhn(&digits_of("0")));
        assert!(!luhn(&digits_of("19")));
        assert!(luhn(&digits_of("59")));
    }

    #[test]
    fn iban_check_known_values() {
        assert!(iban_check(b"DE89370400440532013000"));
        assert!(iban_check(b"GB82WEST12345698765432"));
        assert!(!iban_check(b"GB82WEST12345698765433"));
        assert!(!iban_check(b"GB28WEST12345698765432"));
        assert!(!iban_check(b"GB82"));
        assert!(!iban_check(b"GB82west12345698765432"));
    }

    #[test]
    fn brands() {
        assert!(brand_fits(&digits_of("4111111111111111")));
        assert!(brand_fits(&digits_of("4222222222222")));
        assert!(!brand_fits(&digits_of("41111111111111")));
        assert!(brand_fits(&digits_of("5555555555554444")));
        assert!(brand_fits(&digits_of("2223003122003222")));
        assert!(!brand_fits(&digits_of("2721003122003222")));
        assert!(!brand_fits(&digits_of("5655555555554444")));
        assert!(brand_fits(&digits_of("378282246310005")));
        assert!(!brand_fits(&digits_of("3782822463100051")));
        assert!(brand_fits(&digits_of("6011111111111117")));
        assert!(brand_fits(&digits_of("3530111333300000")));
        assert!(brand_fits(&digits_of("30569309025904")));
        assert!(brand_fits(&digits_of("6200000000000005")));
        assert!(!brand_fits(&digits_of("1234567812345670")));
        assert!(!brand_fits(&digits_of("9111111111111111")));
    }

    #[test]
    fn brand_prefixes_and_lengths() {
        // (prefix, lengths that fit): every other length from 12 to 20 does not.
        let table: &[(&str, &[usize])] = &[
            ("4", &[13, 16, 19]),
            ("51", &[16]),
            ("55", &[16]),
            ("2221", &[16]),
            ("2720", &[16]),
            ("34", &[15]),
            ("37", &[15]),
            ("6011", &[16, 17, 18, 19]),
            ("644", &[16, 17, 18, 19]),
            ("649", &[16, 17, 18, 19]),
            ("65", &[16, 17, 18, 19]),
            ("3528", &[16, 17, 18, 19]),
            ("3589", &[16, 17, 18, 19]),
            ("300", &[14, 15, 16, 17, 18, 19]),
            ("305", &[14, 15, 16, 17, 18, 19]),
            ("36", &[14, 15, 16, 17, 18, 19]),
            ("38", &[14, 15, 16, 17, 18, 19]),
            ("39", &[14, 15, 16, 17, 18, 19]),
            ("62", &[16, 17, 18, 19]),
            // No brand.
            ("50", &[]),
            ("56", &[]),
            ("2220", &[]),
            ("2721", &[]),
            ("6010", &[]),
            ("643", &[]),
            ("3527", &[]),
            ("3590", &[]),
            ("306", &[]),
            ("1", &[]),
            ("0", &[]),
            ("9", &[]),
        ];
        for &(prefix, fits) in table {
            for len in 12..=20 {
                let mut number = prefix.to_string();
                while number.len() < len {
                    number.push('0');
                }
                assert_eq!(
                    brand_fits(&digits_of(&number)),
                    fits.contains(&len),
                    "{prefix} {len}"
                );
            }
        }
    }

    #[test]
    fn card_groups_and_separators() {
        let ok = |s: &str| credit_card(s, 0..s.len());
        assert!(ok("4111111111111111"));
        assert!(ok("4111 1111 1111 1111"));
        assert!(ok("4111-1111-1111-1111"));
        assert!(ok("3782 822463 10005"));
        assert!(ok("3056 930902 5904"));
        assert!(ok("4222 2222 2222 2"));
        assert!(!ok("4111 1111-1111 1111"));
        assert!(!ok("41111 111 1111 1111"));
        assert!(!ok("4111 1111 11111 111"));
        assert!(!ok("4111111111111112"));
        assert!(!ok("1111111111111117"));
    }

    #[test]
    fn ssn_ranges() {
        let ok = |s: &str| us_ssn(s, 0..s.len());
        assert!(ok("078-05-1120"));
        assert!(ok("899-99-9999"));
        assert!(!ok("000-12-3456"));
        assert!(!ok("666-12-3456"));
        assert!(!ok("900-12-3456"));
        assert!(!ok("123-00-4567"));
        assert!(!ok("123-45-0000"));
    }
}
