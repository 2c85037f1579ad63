//! Model names: canonical forms, aliases and allow/block lists with wildcards.
//!
//! Clients name the same model many ways: `gpt-4o`, `GPT-4o `, `openai/gpt-4o`,
//! `gpt-4o-2024-08-06`. Policies are written once, on canonical names:
//!
//! 1. surrounding whitespace is trimmed and the name lowercased;
//! 2. a configured provider prefix is dropped (`openai/gpt-4o` → `gpt-4o`). Only the
//!    prefixes of [`ModelAliases::provider_prefix`] are (`openai` by default): any other `/`
//!    stays part of the name, so `o3-mini/gpt-4o-mini` is not taken for `gpt-4o-mini` — an
//!    upstream that routes on the part before the `/` would run another model than the one
//!    checked;
//! 3. the alias table of [`ModelAliases`] applies: exact aliases (`gpt4` → `gpt-4`) and variant
//!    suffixes (`-thinking`, `-latest`), repeatedly, until nothing changes;
//! 4. for the **canonical** name only, a trailing dated snapshot is dropped: `-YYYY-MM-DD`
//!    (`gpt-4o-2024-08-06`), `-YYYYMMDD`, or a `-MMDD` that is a real month and day
//!    (`gpt-4-0613`, `gpt-3.5-turbo-0125`).
//!
//! Steps 1–3 give the **normalised** name, all four the canonical one ([`ModelName`]). A
//! [`ModelList`] entry without a date matches every snapshot of that model; an entry with a
//! date matches that snapshot only; an entry ending in `*` matches every name that starts
//! with what precedes it. Aliases resolve before any list is consulted, so an alias can
//! never reach a model that a list forbids.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;

/// A model name in its normalised and canonical forms. See the [module docs](self).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ModelName {
    /// Trimmed, lowercased, provider prefix dropped, aliases applied.
    pub normalized: String,
    /// The normalised name without a trailing dated snapshot.
    pub canonical: String,
}

/// The alias table used to resolve model names. The default has no aliases and one provider
/// prefix, `openai/`.
#[derive(Clone, PartialEq, Eq)]
pub struct ModelAliases {
    exact: HashMap<String, String>,
    suffixes: Vec<String>,
    prefixes: Vec<String>,
}

/// The provider prefixes dropped by default.
const DEFAULT_PREFIXES: &[&str] = &["openai"];

impl Default for ModelAliases {
    fn default() -> Self {
        ModelAliases {
            exact: HashMap::new(),
            suffixes: Vec::new(),
            prefixes: DEFAULT_PREFIXES.iter().map(|p| (*p).to_owned()).collect(),
        }
    }
}

impl ModelAliases {
    /// A table with no aliases: only the built-in rules apply.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps the name `from` to `to` (both are normalised first).
    #[must_use]
    pub fn alias(mut self, from: &str, to: &str) -> Self {
        let from = base_normalize(from, &self.prefixes);
        let to = base_normalize(to, &self.prefixes);
        self.exact.insert(from, to);
        self
    }

    /// Drops the provider prefix `prefix/` (`azure` for `azure/gpt-4o`), compared without
    /// regard to case. `openai` is dropped by default; a name with any other prefix keeps it
    /// and must be listed (or aliased) as sent.
    #[must_use]
    pub fn provider_prefix(mut self, prefix: &str) -> Self {
        let prefix = prefix.trim().trim_end_matches('/').to_ascii_lowercase();
        if !prefix.is_empty() && !self.prefixes.contains(&prefix) {
            self.prefixes.push(prefix);
        }
        self
    }

    /// Drops no provider prefix, not even the default `openai/`.
    #[must_use]
    pub fn no_provider_prefixes(mut self) -> Self {
        self.prefixes.clear();
        self
    }

    /// Drops a variant suffix such as `-thinking` or `-latest` before any check.
    #[must_use]
    pub fn strip_suffix(mut self, suffix: &str) -> Self {
        let suffix = suffix.trim().to_ascii_lowercase();
        if !suffix.is_empty() && !self.suffixes.contains(&suffix) {
            self.suffixes.push(suffix);
        }
        self
    }

    /// Whether the table has no aliases.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.suffixes.is_empty()
    }

    /// Resolves a model name as sent into its normalised and canonical forms.
    ///
    /// Resolving the canonical name again gives it back, whatever the table (even one whose
    /// aliases form a cycle).
    pub fn resolve(&self, model: &str) -> ModelName {
        let normalized = self.apply_aliases(self.normalize(model));
        // Aliases and date stripping may uncover one another (`x-2024-05-01-latest`): repeat
        // until nothing changes. What a stripped date leaves is normalised again (`x -0613`
        // is `x`). A name that is already canonical is not copied on the way.
        let canonical = settle(Cow::Borrowed(&*normalized), |name| {
            self.apply_aliases(self.normalize(without_date(name)))
        })
        .into_owned();
        ModelName {
            normalized: normalized.into_owned(),
            canonical,
        }
    }

    /// Steps 1 and 2 with this table's provider prefixes.
    fn normalize<'a>(&self, model: &'a str) -> Cow<'a, str> {
        normalize(model, &self.prefixes)
    }

    /// Exact aliases and variant suffixes, repeatedly, until nothing changes.
    fn apply_aliases<'a>(&self, name: Cow<'a, str>) -> Cow<'a, str> {
        if self.is_empty() {
            return name;
        }
        settle(name, |name| {
            if let Some(to) = self.exact.get(name).filter(|to| *to != name) {
                return Cow::Owned(to.clone());
            }
            match self
                .suffixes
                .iter()
                .find(|s| name.len() > s.len() && name.ends_with(s.as_str()))
            {
                Some(s) => self.normalize(&name[..name.len() - s.len()]),
                None => Cow::Borrowed(name),
            }
        })
    }
}

/// Applies `step` to `name` until it gives the name back. The names one step can reach from
/// another are finitely many (alias targets and what stripping leaves of them or of `name`), so
/// the steps end at a fixed point or come back to a name already seen: an alias cycle. Then the
/// smallest name of the cycle is taken, the same wherever the cycle was entered, so settling a
/// settled name gives it back. Nothing is copied while the steps only take away from `name`.
fn settle<'a>(
    mut name: Cow<'a, str>,
    step: impl for<'b> Fn(&'b str) -> Cow<'b, str>,
) -> Cow<'a, str> {
    let mut seen: Vec<Cow<'a, str>> = Vec::new();
    loop {
        let next: Cow<'a, str> = match &name {
            Cow::Borrowed(b) => {
                let next = step(b);
                if next == *b {
                    return name;
                }
                next
            }
            Cow::Owned(o) => {
                let next = step(o);
                if next == o.as_str() {
                    drop(next);
                    return name;
                }
                Cow::Owned(next.into_owned())
            }
        };
        seen.push(std::mem::replace(&mut name, next));
        if let Some(i) = seen.iter().position(|s| *s == name) {
            return seen.swap_remove(
                (i..seen.len())
                    .min_by(|&a, &b| seen[a].cmp(&seen[b]))
                    .unwrap_or(i),
            );
        }
    }
}

impl fmt::Debug for ModelAliases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelAliases")
            .field("aliases", &self.exact)
            .field("strip_suffixes", &self.suffixes)
            .field("provider_prefixes", &self.prefixes)
            .finish()
    }
}

/// The canonical name of `model` under the built-in rules only (no alias table, the default
/// provider prefix): what `ModelAliases::new().resolve(model).canonical` gives, so it is
/// idempotent too (every stacked date is stripped).
pub fn canonical_model(model: &str) -> String {
    settle(normalize(model, DEFAULT_PREFIXES), |name| {
        normalize(without_date(name), DEFAULT_PREFIXES)
    })
    .into_owned()
}

/// Steps 1 and 2 with the default provider prefix.
fn default_normalize(model: &str) -> String {
    normalize(model, DEFAULT_PREFIXES).into_owned()
}

/// Steps 1 and 2 with `prefixes`, as an owned name.
fn base_normalize(model: &str, prefixes: &[String]) -> String {
    normalize(model, prefixes).into_owned()
}

/// Steps 1 and 2: trim, lowercase, drop the provider prefixes `prefixes` (lowercase). Borrows
/// from `model` when it has no upper-case letter.
fn normalize<'a, P: AsRef<str>>(model: &'a str, prefixes: &[P]) -> Cow<'a, str> {
    let trimmed = model.trim();
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        let lower = trimmed.to_ascii_lowercase();
        let rest = strip_prefixes(&lower, prefixes);
        if rest.len() == lower.len() {
            Cow::Owned(lower)
        } else {
            Cow::Owned(rest.to_owned())
        }
    } else {
        Cow::Borrowed(strip_prefixes(trimmed, prefixes))
    }
}

/// Drops leading `prefix/` segments that are in `prefixes` (lowercase), keeping a non-empty
/// rest.
fn strip_prefixes<'a, P: AsRef<str>>(mut name: &'a str, prefixes: &[P]) -> &'a str {
    loop {
        let Some((head, rest)) = name.split_once('/') else {
            return name;
        };
        let rest = rest.trim_start();
        if rest.is_empty() || !prefixes.iter().any(|p| p.as_ref() == head.trim_end()) {
            return name;
        }
        name = rest;
    }
}

/// `name` without a trailing dated snapshot (step 4), if it has one.
fn without_date(name: &str) -> &str {
    let b = name.as_bytes();
    let n = b.len();
    let digits = |range: std::ops::Range<usize>| b[range].iter().all(u8::is_ascii_digit);
    let num = |range: std::ops::Range<usize>| {
        b[range]
            .iter()
            .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'))
    };
    let plausible = |month: u32, day: u32| (1..=12).contains(&month) && (1..=31).contains(&day);
    // -YYYY-MM-DD
    if n > 11
        && b[n - 11] == b'-'
        && b[n - 6] == b'-'
        && b[n - 3] == b'-'
        && digits(n - 10..n - 6)
        && digits(n - 5..n - 3)
        && digits(n - 2..n)
        && plausible(num(n - 5..n - 3), num(n - 2..n))
    {
        return &name[..n - 11];
    }
    // -YYYYMMDD
    if n > 9
        && b[n - 9] == b'-'
        && digits(n - 8..n)
        && (1990..2200).contains(&num(n - 8..n - 4))
        && plausible(num(n - 4..n - 2), num(n - 2..n))
    {
        return &name[..n - 9];
    }
    // -MMDD
    if n > 5 && b[n - 5] == b'-' && digits(n - 4..n) && plausible(num(n - 4..n - 2), num(n - 2..n))
    {
        return &name[..n - 5];
    }
    name
}

/// A list of model names: exact names (matched on canonical forms, see the
/// [module docs](self)) and `prefix*` wildcards. Built once per configuration load.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ModelList {
    entries: Vec<String>,
    names: HashSet<String>,
    prefixes: Vec<String>,
}

impl ModelList {
    /// Builds a list from names and `prefix*` wildcards.
    pub fn new<I, S>(entries: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = ModelList::default();
        for entry in entries {
            list.push(entry.as_ref());
        }
        list
    }

    fn push(&mut self, entry: &str) {
        let trimmed = entry.trim();
        if trimmed.is_empty() {
            return;
        }
        self.entries.push(trimmed.to_owned());
        match trimmed.strip_suffix('*') {
            Some(prefix) => {
                let prefix = prefix.trim().to_ascii_lowercase();
                let prefix = match prefix.rfind('/') {
                    Some(i) => prefix[i + 1..].to_owned(),
                    None => prefix,
                };
                if !self.prefixes.contains(&prefix) {
                    self.prefixes.push(prefix);
                }
            }
            None => {
                self.names.insert(default_normalize(trimmed));
            }
        }
    }

    /// Whether the list has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries as configured.
    pub fn entries(&self) -> &[String] {
        &self.entries
    }

    /// Whether the list matches a resolved model name.
    pub fn contains(&self, name: &ModelName) -> bool {
        self.names.contains(&name.normalized)
            || self.names.contains(&name.canonical)
            || self.prefixes.iter().any(|p| {
                name.normalized.starts_with(p.as_str()) || name.canonical.starts_with(p.as_str())
            })
    }
}

impl fmt::Debug for ModelList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.entries).finish()
    }
}

impl<S: AsRef<str>> FromIterator<S> for ModelList {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        ModelList::new(iter)
    }
}

impl<'de> serde::Deserialize<'de> for ModelList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(ModelList::new(Vec::<String>::deserialize(d)?))
    }
}

impl serde::Serialize for ModelList {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(&self.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        for (sent, canonical) in [
            ("gpt-4o-2024-08-06", "gpt-4o"),
            ("gpt-4-0613", "gpt-4"),
            ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
            ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
            ("gpt-4-32k", "gpt-4-32k"),
            ("model-2048", "model-2048"),
            ("gpt-4-1106-preview", "gpt-4-1106-preview"),
            ("-0613", "-0613"),
            ("", ""),
            // Stacked dates are all stripped, as `ModelAliases::resolve` does.
            ("gpt-4-0613-0613", "gpt-4"),
            ("openai/GPT-4 -20241022", "gpt-4"),
        ] {
            assert_eq!(canonical_model(sent), canonical, "{sent}");
            assert_eq!(canonical_model(canonical), canonical, "{sent}");
        }
    }

    /// Found by the `model_canonical` fuzz target and the property tests: the canonical name
    /// resolves to itself.
    #[test]
    fn canonical_names_resolve_to_themselves() {
        let check = |table: &ModelAliases, sent: &str, canonical: &str| {
            let name = table.resolve(sent);
            assert_eq!(name.canonical, canonical, "{sent:?}");
            assert_eq!(table.resolve(canonical).canonical, canonical, "{sent:?}");
        };
        let none = ModelAliases::new();
        // What a stripped date leaves is trimmed (it was `gpt-4 `, which resolves to `gpt-4`).
        check(&none, "GPT-4 -20241022", "gpt-4");
        check(&none, "- -0613", "-");
        // Stacked dates are all stripped (four were, a fifth stayed).
        check(&none, "x-0101-0101-0101-0101-0101", "x");
        // A stripped suffix leaves a normalised name too.
        let latest = ModelAliases::new().strip_suffix("-latest");
        assert_eq!(latest.resolve("gpt-4o -latest").normalized, "gpt-4o");
        check(&latest, "gpt-4o -latest", "gpt-4o");
        // Alias cycles end on the cycle's smallest name, wherever they are entered.
        let cycle = ModelAliases::new()
            .alias("a", "b")
            .alias("b", "c")
            .alias("c", "a");
        for sent in ["a", "b", "c"] {
            check(&cycle, sent, "a");
        }
        // A cycle through a date: `a-0101` → `a` → `b-0101` → `b` → `a-0101`.
        let dated = ModelAliases::new()
            .alias("a", "b-0101")
            .alias("b", "a-0101");
        for sent in ["a", "b", "a-0101", "b-0101"] {
            let canonical = dated.resolve(sent).canonical;
            assert_eq!(dated.resolve(&canonical).canonical, canonical, "{sent:?}");
        }
        // Ordinary tables are unchanged.
        let table = ModelAliases::new()
            .alias("my-gpt4o", "gpt-4o-2024-08-06")
            .strip_suffix("-latest");
        check(&table, "openai/My-GPT4o", "gpt-4o");
        assert_eq!(table.resolve("my-gpt4o").normalized, "gpt-4o-2024-08-06");
        check(&table, "x-2024-05-01-latest", "x");
    }
}
