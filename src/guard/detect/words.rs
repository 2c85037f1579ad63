//! [`WordList`]: words and phrases, matched with one aho-corasick automaton.

use std::borrow::Cow;
use std::fmt;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder};

use super::normalize::{self, Fold, Normalized, OBFUSCATED_CONTEXT, SEPARATOR_BYTES, UNIT_BYTES};
use super::{ConfigError, Detector, Found};

/// Finds words and phrases from a list: case-insensitive, whole words by default, in time
/// linear in the text (one aho-corasick automaton for the whole list).
///
/// - **Case**: letters are compared lowercased (Unicode lowercase, one character for one).
/// - **Whole words** ([`whole_words`](Self::whole_words), on by default): a match must not
///   have a letter or digit right before or after it, so `ass` finds `ass.` and `(ass)` but
///   not `class`, `assistant` or `grass`. List the forms you want (`shit`, `shitty`,
///   `shitting`) or turn it off to match inside words.
/// - **Obfuscations** ([`obfuscations`](Self::obfuscations), off by default, on for
///   [`profanity`](Self::profanity)): the text is matched after undoing common tricks, and
///   the original range is reported: accents and look-alike letters (`fück`, Cyrillic
///   `с`/`о`/`а`, fullwidth `ＦＵＣＫ`), leetspeak inside words (`sh1t`, `a55hole`, `$h!t`),
///   zero-width characters, soft hyphens and combining marks (`f\u{200B}uck`), letters spelled
///   out with single spaces, dots, dashes, underscores or asterisks (`f u c k`, `f.u.c.k`).
///   Masked spellings where a symbol replaces a letter (`f*ck`, `sh*t`) are entries of their
///   own in the built-in list.
///
/// Matches carry the list's [`label`](Self::label) (`"word"` by default).
///
/// ```
/// use tower_llm_policy::guard::detect::{Detector, WordList};
///
/// let list = WordList::new(["project falcon", "acme"])?.label("codename");
/// let text = "Is Project  Falcon late? ACME's plan: Acmeology.";
/// let mut found = Vec::new();
/// list.find(text, &mut found);
/// let hits: Vec<&str> = found.iter().map(|f| &text[f.range.clone()]).collect();
/// assert_eq!(hits, ["ACME"]); // two spaces are not one; `Acmeology` is another word
/// assert_eq!(found[0].label, "codename");
/// # Ok::<(), tower_llm_policy::guard::detect::ConfigError>(())
/// ```
#[derive(Clone)]
pub struct WordList {
    /// The entries lowercased, matched ASCII-case-insensitively (so ASCII text is searched
    /// as it is).
    plain: AhoCorasick,
    /// The longest entry lowercased, in characters.
    plain_chars: usize,
    /// The entries normalized with [`Fold::Obfuscations`].
    obfuscated: AhoCorasick,
    /// The longest obfuscation-normalized entry, in characters.
    obfuscated_chars: usize,
    entries: usize,
    label: Cow<'static, str>,
    whole_words: bool,
    obfuscations: bool,
}

impl fmt::Debug for WordList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WordList")
            .field("entries", &self.entries)
            .field("label", &self.label)
            .field("whole_words", &self.whole_words)
            .field("obfuscations", &self.obfuscations)
            .finish_non_exhaustive()
    }
}

impl WordList {
    /// A list of words and phrases (leading and trailing white space ignored), labelled
    /// `"word"`, matched as whole words, without undoing obfuscations.
    ///
    /// # Errors
    ///
    /// [`ConfigError::NoWords`] for an empty list, [`ConfigError::BlankWord`] for an empty
    /// or blank entry.
    pub fn new<I>(words: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let mut plain = Vec::new();
        let mut obfuscated = Vec::new();
        for (index, word) in words.into_iter().enumerate() {
            let word = word.as_ref().trim();
            if word.is_empty() {
                return Err(ConfigError::BlankWord { index });
            }
            // Without ignorable characters (and word breaks), a match never spans a break.
            let bare: String = word
                .chars()
                .filter(|&c| !normalize::is_ignorable(c) && c != normalize::BREAK)
                .collect();
            let folded = normalize::normalize(&bare, Fold::Obfuscations).text;
            if folded.trim().is_empty() {
                return Err(ConfigError::BlankWord { index });
            }
            plain.push(normalize::normalize(word, Fold::Case).text);
            obfuscated.push(folded);
        }
        if plain.is_empty() {
            return Err(ConfigError::NoWords);
        }
        let entries = plain.len();
        let (plain, plain_chars) = automaton(plain, true)?;
        let (obfuscated, obfuscated_chars) = automaton(obfuscated, false)?;
        Ok(WordList {
            plain,
            plain_chars,
            obfuscated,
            obfuscated_chars,
            entries,
            label: Cow::Borrowed("word"),
            whole_words: true,
            obfuscations: false,
        })
    }

    /// A built-in list of common English profanity, insults and slurs (about 150 entries,
    /// with their common inflections and masked spellings such as `f*ck`), labelled
    /// `"profanity"`, whole words, obfuscations undone.
    ///
    /// Whole-word matching keeps `class`, `assistant`, `Scunthorpe`, `cocktail`, `therapist`
    /// and `shiitake` clean, but a word that is also a name or an ordinary word is still
    /// found where it stands alone: `Dick` in *Dick Van Dyke*, `cock` for a rooster, `ass`
    /// for a donkey. Words that are mostly innocent (`hell`, `cum`, `tit`, `fag` for a
    /// cigarette) are not in the list.
    ///
    /// ```
    /// use tower_llm_policy::guard::detect::{Detector, WordList};
    ///
    /// let list = WordList::profanity();
    /// let text = "what the f u c k, you \u{0430}sshole! Great class, assistant.";
    /// let mut found = Vec::new();
    /// list.find(text, &mut found);
    /// let hits: Vec<&str> = found.iter().map(|f| &text[f.range.clone()]).collect();
    /// assert_eq!(hits, ["f u c k", "\u{0430}sshole"]);
    /// assert!(found.iter().all(|f| f.label == "profanity"));
    /// ```
    pub fn profanity() -> Self {
        match WordList::new(PROFANITY) {
            Ok(list) => list.label("profanity").obfuscations(true),
            // The built-in list has no blank entries (a unit test checks it).
            Err(_) => unreachable!("the built-in profanity list is valid"),
        }
    }

    /// The label of every match (`"word"` by default).
    #[must_use]
    pub fn label(mut self, label: impl Into<Cow<'static, str>>) -> Self {
        self.label = label.into();
        self
    }

    /// Whether a match must be a whole word (on by default): no letter or digit right before
    /// or after it. Off, entries also match inside longer words.
    #[must_use]
    pub fn whole_words(mut self, on: bool) -> Self {
        self.whole_words = on;
        self
    }

    /// Whether to undo obfuscations before matching (off by default; on for
    /// [`profanity`](Self::profanity)): see the type's documentation. Reported ranges are
    /// always ranges of the original text.
    #[must_use]
    pub fn obfuscations(mut self, on: bool) -> Self {
        self.obfuscations = on;
        self
    }

    fn scan(&self, ac: &AhoCorasick, hay: &str, map: Option<&Normalized>, found: &mut Vec<Found>) {
        let max = self.max_match_len();
        for m in ac.find_overlapping_iter(hay) {
            if self.whole_words && !whole_word(hay, m.start(), m.end()) {
                continue;
            }
            let range = match map {
                Some(n) => n.original(m.range()),
                None => m.range(),
            };
            if range.len() <= max {
                found.push(Found::new(range, self.label.clone()));
            }
        }
    }
}

impl Detector for WordList {
    fn find(&self, text: &str, found: &mut Vec<Found>) {
        if self.obfuscations {
            let n = normalize::normalize(text, Fold::Obfuscations);
            self.scan(&self.obfuscated, &n.text, Some(&n), found);
        } else if text
            .chars()
            .all(|c| c.is_ascii() || normalize::lower(c) == c)
        {
            // Lowercasing would change ASCII letters only, which the automaton ignores the
            // case of: search the text as it is.
            self.scan(&self.plain, text, None, found);
        } else {
            let n = normalize::normalize(text, Fold::Case);
            self.scan(&self.plain, &n.text, Some(&n), found);
        }
    }

    fn max_match_len(&self) -> usize {
        if self.obfuscations {
            // Each character with its ignorable characters, and a joined separator between
            // each two.
            let n = self.obfuscated_chars;
            n * UNIT_BYTES + n.saturating_sub(1) * SEPARATOR_BYTES
        } else {
            self.plain_chars * 4
        }
    }

    fn context(&self) -> usize {
        if self.obfuscations {
            OBFUSCATED_CONTEXT
        } else {
            4
        }
    }
}

/// One automaton for `entries` (deduplicated), and the longest entry in characters.
fn automaton(
    mut entries: Vec<String>,
    ascii_case_insensitive: bool,
) -> Result<(AhoCorasick, usize), ConfigError> {
    entries.sort_unstable();
    entries.dedup();
    let longest = entries.iter().map(|e| e.chars().count()).max().unwrap_or(0);
    let ac = AhoCorasickBuilder::new()
        .ascii_case_insensitive(ascii_case_insensitive)
        .build(&entries)
        .map_err(|e| ConfigError::Invalid {
            label: "word list".into(),
            message: e.to_string(),
        })?;
    Ok((ac, longest))
}

/// Whether `text[start..end]` has no letter or digit right before or after it.
fn whole_word(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    !before.is_some_and(char::is_alphanumeric) && !after.is_some_and(char::is_alphanumeric)
}

/// The built-in profanity list: written for this crate. Inflections are entries of their own
/// (matching is by whole words).
const PROFANITY: &[&str] = &[
    // f
    "fuck",
    "fucks",
    "fucked",
    "fucker",
    "fuckers",
    "fucking",
    "fuckin",
    "fuckhead",
    "fuckface",
    "fuckwit",
    "fuckoff",
    "motherfucker",
    "motherfuckers",
    "motherfucking",
    "motherf*cker",
    "clusterfuck",
    "fck",
    "fcking",
    "fuk",
    "fuking",
    "fukin",
    "fuq",
    "phuck",
    "phucking",
    "f*ck",
    "f**k",
    "f*cking",
    "f**king",
    "f***",
    "effing",
    "stfu",
    "gtfo",
    // s
    "shit",
    "shits",
    "shitty",
    "shitting",
    "shitted",
    "shithead",
    "shitheads",
    "shithole",
    "shitshow",
    "bullshit",
    "horseshit",
    "dipshit",
    "batshit",
    "sh*t",
    "sh*tty",
    "sh1t",
    // a
    "ass",
    "asses",
    "asshole",
    "assholes",
    "arse",
    "arsehole",
    "arseholes",
    "jackass",
    "dumbass",
    "smartass",
    "fatass",
    "asshat",
    "assclown",
    "a**hole",
    "a*shole",
    // b
    "bitch",
    "bitches",
    "bitching",
    "bitchy",
    "son of a bitch",
    "b*tch",
    "biatch",
    "bastard",
    "bastards",
    "bollocks",
    "bugger",
    "bellend",
    "bloody hell",
    // c
    "cunt",
    "cunts",
    "c*nt",
    "cock",
    "cocks",
    "cocksucker",
    "cocksuckers",
    "crap",
    "crappy",
    "craphole",
    // d
    "dick",
    "dicks",
    "dickhead",
    "dickheads",
    "d*ck",
    "damn",
    "dammit",
    "goddamn",
    "goddammit",
    "douche",
    "douchebag",
    "douchebags",
    "dildo",
    "dildos",
    // other insults and vulgarities
    "piss",
    "pissed",
    "pissing",
    "piss off",
    "prick",
    "pricks",
    "pussy",
    "pussies",
    "slut",
    "sluts",
    "slutty",
    "whore",
    "whores",
    "twat",
    "twats",
    "wanker",
    "wankers",
    "wank",
    "tosser",
    "knobhead",
    "jizz",
    "tits",
    "titties",
    "boobs",
    "skank",
    "skanky",
    "scumbag",
    "numbnuts",
    "dumbfuck",
    "dickwad",
    // slurs
    "faggot",
    "faggots",
    "nigger",
    "niggers",
    "nigga",
    "niggas",
    "retard",
    "retards",
    "retarded",
    "tranny",
    "trannies",
    "kike",
    "kikes",
    "wetback",
    "wetbacks",
    "raghead",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn hits(list: &WordList, text: &str) -> Vec<String> {
        let mut found = Vec::new();
        list.find(text, &mut found);
        found
            .iter()
            .map(|f| text[f.range.clone()].to_string())
            .collect()
    }

    #[test]
    fn built_in_list_is_valid() {
        assert!(WordList::new(PROFANITY).is_ok());
        assert!(PROFANITY.len() >= 100);
    }

    #[test]
    fn blank_and_empty_lists_are_refused() {
        assert_eq!(
            WordList::new(["ok", "  "]).unwrap_err(),
            ConfigError::BlankWord { index: 1 }
        );
        assert_eq!(
            WordList::new(["\u{200B}"]).unwrap_err(),
            ConfigError::BlankWord { index: 0 }
        );
        assert_eq!(
            WordList::new(Vec::<String>::new()).unwrap_err(),
            ConfigError::NoWords
        );
    }

    #[test]
    fn whole_words_by_default_and_substrings_on_request() {
        let list = WordList::new(["ass"]).unwrap();
        assert_eq!(hits(&list, "class assistant grass ass."), ["ass"]);
        let list = list.whole_words(false);
        assert_eq!(hits(&list, "class").len(), 1);
    }

    #[test]
    fn case_insensitive_beyond_ascii() {
        let list = WordList::new(["straße"]).unwrap();
        assert_eq!(hits(&list, "STRAẞE und Straße"), ["STRAẞE", "Straße"]);
    }

    #[test]
    fn custom_list_with_obfuscations() {
        let list = WordList::new(["falcon"]).unwrap();
        assert!(hits(&list, "f a l c o n").is_empty());
        let list = list.obfuscations(true);
        assert_eq!(hits(&list, "the f a l c o n plan"), ["f a l c o n"]);
        assert_eq!(hits(&list, "FALC0N"), ["FALC0N"]);
    }

    #[test]
    fn max_match_len_is_honest() {
        let list = WordList::new(["abc"]).unwrap();
        assert_eq!(list.max_match_len(), 12);
        assert_eq!(list.context(), 4);
        let list = list.obfuscations(true);
        assert_eq!(list.max_match_len(), 3 * UNIT_BYTES + 2 * SEPARATOR_BYTES);
        let worst = format!(
            "ａ{z}.{z}ｂ{z}.{z}ｃ{z}",
            z = "\u{200B}".repeat(normalize::MAX_IGNORED / 2)
        );
        let found = hits(&list, &worst);
        assert_eq!(found, [worst.as_str()]);
        assert!(found[0].len() <= list.max_match_len());
    }
}
