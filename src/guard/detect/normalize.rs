//! The normalized copy of a text that word lists match in, with a map from each of its bytes
//! back to the original text, so matches are reported as original byte ranges.
//!
//! Two strengths:
//!
//! - [`Fold::Case`]: each character lowercased (its first lowercase character, so one
//!   character stays one character).
//! - [`Fold::Obfuscations`]: what people do to slip a word past a filter, undone:
//!   - case, accents on Latin letters (`é` → `e`, Latin-1 and Latin Extended-A), fullwidth
//!     forms (`ＡＢＣ` → `abc`), Cyrillic and Greek letters that look Latin (`а е о р с х у і
//!     ѕ ј`, `α ο ρ ι κ ν υ χ`, and the capitals that look Latin);
//!   - zero-width characters (U+200B..U+200D, U+2060..U+2064, U+FEFF), the soft hyphen
//!     (U+00AD) and combining marks (U+0300..U+036F) are dropped, up to [`MAX_IGNORED`] in a
//!     row: a longer run is a word break (so a match stays bounded);
//!   - leetspeak: `0`→o, `1`→i, `3`→e, `4`→a, `5`→s, `7`→t, `@`→a, `$`→s, `!`→i, when more
//!     real letters than other such characters stand within three characters either side
//!     (`sh1t`, `a55hole`, `$h1t` are words; `455`, `1.2.3`, `A55` and `$50` are not), and
//!     `!` only between two letters (`sh!t`, but `shit!` keeps its `!`);
//!   - single letters separated by single spaces, dots, dashes, underscores or asterisks are
//!     joined (`f u c k`, `f.u.c.k`, `f_u_c_k` → `fuck`); an asterisk standing for a letter
//!     (`f*ck`) is kept, so such spellings are list entries of their own.
//!
//! Every rule looks at a bounded number of characters around it, which keeps a word list
//! local (see [`Detector`](super::Detector)): [`OBFUSCATED_CONTEXT`].

use std::ops::Range;

/// How much a text is normalized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fold {
    /// Lowercase only.
    Case,
    /// Lowercase and undo obfuscations.
    Obfuscations,
}

/// The most ignorable characters in a row that are dropped; a longer run is a word break.
pub(crate) const MAX_IGNORED: usize = 8;

/// What a word break (a run of more than [`MAX_IGNORED`] ignorable characters) becomes: a
/// noncharacter, which word list entries never contain (they are removed from entries).
pub(crate) const BREAK: char = '\u{FFFF}';

/// The most original bytes behind one normalized character: the character (4 bytes) and the
/// ignorable characters after it (3 bytes each at most).
pub(crate) const UNIT_BYTES: usize = 4 + MAX_IGNORED * 3;

/// The most original bytes behind a dropped separator: the separator (ASCII) and the
/// ignorable characters after it.
pub(crate) const SEPARATOR_BYTES: usize = 1 + MAX_IGNORED * 3;

/// Bytes either side of a match that can decide it with [`Fold::Obfuscations`]: the rules
/// look at most six characters beyond a match (a boundary character behind a joined
/// separator, whose letters' leetspeak looks three further), each with its ignorable
/// characters, and a run of ignorables must be seen long enough to tell it is a break.
pub(crate) const OBFUSCATED_CONTEXT: usize = 10 * UNIT_BYTES;

/// A normalized text and the original range behind each of its bytes.
#[derive(Debug)]
pub(crate) struct Normalized {
    /// The normalized text.
    pub(crate) text: String,
    /// For each byte of `text`, where the original character behind it starts.
    starts: Vec<usize>,
    /// For each byte of `text`, where the original character behind it (and the ignorable
    /// characters that follow it) ends.
    ends: Vec<usize>,
}

impl Normalized {
    /// The original byte range behind `range` of the normalized text (non-empty, on its
    /// character boundaries).
    pub(crate) fn original(&self, range: Range<usize>) -> Range<usize> {
        self.starts[range.start]..self.ends[range.end - 1]
    }

    fn push(&mut self, c: char, original: Range<usize>) {
        self.text.push(c);
        for _ in 0..c.len_utf8() {
            self.starts.push(original.start);
            self.ends.push(original.end);
        }
    }
}

/// What one character of the original text is, for [`Fold::Obfuscations`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A letter (after folding).
    Letter,
    /// A character that can stand for a letter (leetspeak).
    Leet,
    /// A separator between spelled-out letters: space, `.`, `-`, `_`, `*`.
    Separator,
    /// Anything else.
    Other,
    /// A run of more than [`MAX_IGNORED`] ignorable characters.
    Break,
}

#[derive(Clone, Copy, Debug)]
struct Unit {
    kind: Kind,
    /// The normalized character.
    c: char,
    /// The letter a [`Kind::Leet`] stands for.
    letter: char,
    start: usize,
    end: usize,
}

/// Normalizes `text`.
pub(crate) fn normalize(text: &str, fold: Fold) -> Normalized {
    let mut out = Normalized {
        text: String::with_capacity(text.len()),
        starts: Vec::with_capacity(text.len()),
        ends: Vec::with_capacity(text.len()),
    };
    match fold {
        Fold::Case => {
            for (i, c) in text.char_indices() {
                out.push(lower(c), i..i + c.len_utf8());
            }
        }
        Fold::Obfuscations => obfuscations(text, &mut out),
    }
    out
}

/// The first lowercase character of `c`.
pub(crate) fn lower(c: char) -> char {
    if c.is_ascii() {
        c.to_ascii_lowercase()
    } else {
        c.to_lowercase().next().unwrap_or(c)
    }
}

fn obfuscations(text: &str, out: &mut Normalized) {
    // Pass 1: one unit per character that is not ignorable; runs of ignorables extend the
    // unit before them, or become a break when too long.
    let mut units: Vec<Unit> = Vec::with_capacity(text.len());
    let mut run: Option<(usize, usize, usize)> = None; // (start, count, end)
    for (i, c) in text.char_indices() {
        let end = i + c.len_utf8();
        if is_ignorable(c) {
            run = Some(match run {
                Some((start, count, _)) => (start, count + 1, end),
                None => (i, 1, end),
            });
            continue;
        }
        flush(&mut units, run.take());
        units.push(classify(c, i, end));
    }
    flush(&mut units, run);

    // Pass 2: which leetspeak characters are letters.
    let n = units.len();
    let kind = |j: usize| units[j].kind;
    let mut letter = vec![false; n];
    for j in 0..n {
        letter[j] = match units[j].kind {
            Kind::Letter => true,
            Kind::Leet if units[j].c == '!' => {
                j > 0 && j + 1 < n && kind(j - 1) == Kind::Letter && kind(j + 1) == Kind::Letter
            }
            Kind::Leet => {
                let (mut letters, mut leets) = (0, 0);
                let mut count = |k: Kind| match k {
                    Kind::Letter => letters += 1,
                    Kind::Leet => leets += 1,
                    _ => {}
                };
                for k in (j.saturating_sub(3)..j).rev() {
                    if kind(k) == Kind::Break {
                        break;
                    }
                    count(kind(k));
                }
                for k in j + 1..n.min(j + 4) {
                    if kind(k) == Kind::Break {
                        break;
                    }
                    count(kind(k));
                }
                letters > leets
            }
            _ => false,
        };
    }

    // Pass 3: join spelled-out letters, emit.
    let is_letter = |j: Option<usize>| j.is_some_and(|j| j < n && letter[j]);
    for (j, unit) in units.iter().enumerate() {
        if unit.kind == Kind::Separator
            && is_letter(j.checked_sub(1))
            && is_letter(Some(j + 1))
            && !is_letter(j.checked_sub(2))
            && !is_letter(Some(j + 2))
        {
            continue;
        }
        let c = if unit.kind == Kind::Leet && letter[j] {
            unit.letter
        } else {
            unit.c
        };
        out.push(c, unit.start..unit.end);
    }
}

/// Ends a run of ignorable characters: dropped into the unit before it, or a break.
fn flush(units: &mut Vec<Unit>, run: Option<(usize, usize, usize)>) {
    let Some((start, count, end)) = run else {
        return;
    };
    if count > MAX_IGNORED {
        units.push(Unit {
            kind: Kind::Break,
            c: BREAK,
            letter: BREAK,
            start,
            end,
        });
    } else if let Some(last) = units.last_mut() {
        last.end = end;
    }
}

pub(crate) fn is_ignorable(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{200B}'..='\u{200D}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}'
        | '\u{0300}'..='\u{036F}')
}

fn classify(c: char, start: usize, end: usize) -> Unit {
    // Fullwidth ASCII (U+FF01..U+FF5E) is ASCII.
    let c = match c {
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
        _ => c,
    };
    let unit = |kind, c, letter| Unit {
        kind,
        c,
        letter,
        start,
        end,
    };
    if let Some(l) = fold_letter(c) {
        return unit(Kind::Letter, l, l);
    }
    if let Some(l) = leet(c) {
        return unit(Kind::Leet, c, l);
    }
    if matches!(c, ' ' | '.' | '-' | '_' | '*') {
        return unit(Kind::Separator, c, c);
    }
    let c = lower(c);
    unit(Kind::Other, c, c)
}

/// The letter a leetspeak character stands for.
fn leet(c: char) -> Option<char> {
    Some(match c {
        '0' => 'o',
        '1' | '!' => 'i',
        '3' => 'e',
        '4' | '@' => 'a',
        '5' | '$' => 's',
        '7' => 't',
        _ => return None,
    })
}

/// The ASCII lowercase letter `c` is or looks like, if any.
fn fold_letter(c: char) -> Option<char> {
    if c.is_ascii() {
        return c.is_ascii_alphabetic().then(|| c.to_ascii_lowercase());
    }
    // Capitals that look Latin but whose lowercase does not (Cyrillic В Н К М Т, Greek
    // Β Η Κ Μ Ν Τ Υ Χ ...).
    let l = match c {
        '\u{0410}' | '\u{0391}' => 'a',
        '\u{0412}' | '\u{0392}' => 'b',
        '\u{0415}' | '\u{0401}' | '\u{0395}' => 'e',
        '\u{0396}' => 'z',
        '\u{041D}' | '\u{0397}' => 'h',
        '\u{0406}' | '\u{0399}' => 'i',
        '\u{0408}' => 'j',
        '\u{041A}' | '\u{039A}' => 'k',
        '\u{041C}' | '\u{039C}' => 'm',
        '\u{039D}' => 'n',
        '\u{041E}' | '\u{039F}' => 'o',
        '\u{0420}' | '\u{03A1}' => 'p',
        '\u{0421}' => 'c',
        '\u{0405}' => 's',
        '\u{0422}' | '\u{03A4}' => 't',
        '\u{0425}' | '\u{03A7}' => 'x',
        '\u{0423}' | '\u{03A5}' => 'y',
        _ => {
            let lc = lower(c);
            if lc.is_ascii() {
                // Kelvin sign, ...
                return lc.is_ascii_alphabetic().then_some(lc);
            }
            return fold_lower(lc);
        }
    };
    Some(l)
}

/// The ASCII letter a non-ASCII lowercase letter looks like (accents, Cyrillic and Greek
/// look-alikes), if any.
fn fold_lower(c: char) -> Option<char> {
    Some(match c {
        // Cyrillic: а е ё о р с х у і ѕ ј ԁ к
        '\u{0430}' => 'a',
        '\u{0435}' | '\u{0451}' => 'e',
        '\u{043E}' => 'o',
        '\u{0440}' => 'p',
        '\u{0441}' => 'c',
        '\u{0445}' => 'x',
        '\u{0443}' => 'y',
        '\u{0456}' => 'i',
        '\u{0455}' => 's',
        '\u{0458}' => 'j',
        '\u{0501}' => 'd',
        '\u{043A}' => 'k',
        // Greek: α ο ρ ι κ ν υ χ ϲ
        '\u{03B1}' => 'a',
        '\u{03BF}' => 'o',
        '\u{03C1}' => 'p',
        '\u{03B9}' => 'i',
        '\u{03BA}' => 'k',
        '\u{03BD}' => 'v',
        '\u{03C5}' => 'u',
        '\u{03C7}' => 'x',
        '\u{03F2}' => 'c',
        // Latin-1 and Latin Extended-A
        'à'..='å' | 'ā' | 'ă' | 'ą' => 'a',
        'ç' | 'ć' | 'ĉ' | 'ċ' | 'č' => 'c',
        'ď' | 'đ' => 'd',
        'è'..='ë' | 'ē' | 'ĕ' | 'ė' | 'ę' | 'ě' => 'e',
        'ĝ' | 'ğ' | 'ġ' | 'ģ' => 'g',
        'ĥ' | 'ħ' => 'h',
        'ì'..='ï' | 'ĩ' | 'ī' | 'ĭ' | 'į' | 'ı' => 'i',
        'ĵ' => 'j',
        'ķ' => 'k',
        'ĺ' | 'ļ' | 'ľ' | 'ŀ' | 'ł' => 'l',
        'ñ' | 'ń' | 'ņ' | 'ň' => 'n',
        'ò'..='ö' | 'ø' | 'ō' | 'ŏ' | 'ő' => 'o',
        'ŕ' | 'ŗ' | 'ř' => 'r',
        'ś' | 'ŝ' | 'ş' | 'š' => 's',
        'ţ' | 'ť' | 'ŧ' => 't',
        'ù'..='ü' | 'ũ' | 'ū' | 'ŭ' | 'ů' | 'ű' | 'ų' => 'u',
        'ŵ' => 'w',
        'ý' | 'ÿ' | 'ŷ' => 'y',
        'ź' | 'ż' | 'ž' => 'z',
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obf(text: &str) -> String {
        normalize(text, Fold::Obfuscations).text
    }

    #[test]
    fn case_fold_keeps_one_char_per_char() {
        let n = normalize("ÄBC İx", Fold::Case);
        assert_eq!(n.text, "äbc ix");
        assert_eq!(n.original(4..5), 4..5);
        assert_eq!(n.original(5..6), 5..7); // İ (2 bytes) → i
    }

    #[test]
    fn look_alikes_fold_to_latin() {
        assert_eq!(obf("FÜCK"), "fuck");
        // Cyrillic с, у, к; Greek ο
        assert_eq!(obf("\u{0441}\u{0443}\u{043A}a"), "cyka");
        assert_eq!(obf("h\u{03BF}rse"), "horse");
        assert_eq!(obf("ＳＨＩＴ"), "shit");
        assert_eq!(obf("\u{0421}\u{041D}\u{0410}\u{0422}"), "chat");
        assert_eq!(obf("caf\u{00E9}"), "cafe");
    }

    #[test]
    fn ignorables_are_dropped_and_mapped() {
        let text = "f\u{200B}u\u{200D}ck\u{0301}!";
        let n = normalize(text, Fold::Obfuscations);
        assert_eq!(n.text, "fuck!");
        assert_eq!(n.original(0..4), 0..text.len() - 1);
        assert_eq!(obf("e\u{0301}t\u{00AD}e"), "ete");
        // A run longer than MAX_IGNORED is a break.
        let long = format!("a{}b", "\u{200B}".repeat(MAX_IGNORED + 1));
        assert_eq!(obf(&long), format!("a{BREAK}b"));
        let short = format!("a{}b", "\u{200B}".repeat(MAX_IGNORED));
        assert_eq!(obf(&short), "ab");
    }

    #[test]
    fn leetspeak_needs_letters_around_it() {
        assert_eq!(obf("sh1t"), "shit");
        assert_eq!(obf("a55hole"), "asshole");
        assert_eq!(obf("$h1t"), "shit");
        assert_eq!(obf("@ss"), "ass");
        assert_eq!(obf("sh!t"), "shit");
        assert_eq!(obf("shit!"), "shit!");
        assert_eq!(obf("455"), "455");
        assert_eq!(obf("1.2.3.4"), "1.2.3.4");
        assert_eq!(obf("A55"), "a55");
        assert_eq!(obf("$50"), "$50");
        assert_eq!(obf("costs $50 now"), "costs $50 now");
    }

    #[test]
    fn spelled_out_letters_are_joined() {
        assert_eq!(obf("f u c k you"), "fuck you");
        assert_eq!(obf("f.u.c.k"), "fuck");
        assert_eq!(obf("s-h-1-t"), "shit");
        assert_eq!(obf("f_u_c_k"), "fuck");
        assert_eq!(obf("f*u*c*k"), "fuck");
        assert_eq!(obf("f*ck"), "f*ck");
        assert_eq!(obf("f  u"), "f  u");
        assert_eq!(obf("a cat is here"), "a cat is here");
        assert_eq!(obf("end. Next"), "end. next");
    }

    #[test]
    fn original_ranges_cover_whole_characters() {
        let text = "x ＦＵＣＫ y";
        let n = normalize(text, Fold::Obfuscations);
        let at = n.text.find("fuck").unwrap();
        assert_eq!(&text[n.original(at..at + 4)], "ＦＵＣＫ");
    }
}
