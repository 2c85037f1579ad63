//! Model prices and the cost of a request's token usage.
//!
//! A [`PricingTable`] maps canonical model names (lowercase, no snapshot date: `gpt-4o`,
//! `gpt-4o-mini`) to a [`ModelPrice`] in USD per million tokens. [`PricingTable::cost`] turns a
//! response's [`Usage`] into dollars, or `None` when the model is not in the table: the crate
//! never guesses a price.
//!
//! The built-in table ([`PricingTable::builtin`]) holds OpenAI's public list prices; hosts that
//! have negotiated prices, use another provider, or run after a price change load their own
//! entries on top of it with [`PricingTable::merge`]. A table deserializes from any
//! serde format as a map of model name to price, so it can live in a TOML or JSON config file:
//!
//! ```
//! use tower_llm_policy::audit::pricing::{PricingTable, Usage};
//!
//! // e.g. the `[pricing]` table of the host's TOML config, here as JSON.
//! let overrides: PricingTable = serde_json::from_str(
//!     r#"{ "my-finetune": { "input_per_mtok": 3.0, "output_per_mtok": 12.0 } }"#,
//! )
//! .unwrap();
//! let mut table = PricingTable::builtin();
//! table.merge(overrides);
//!
//! let usage = Usage { prompt_tokens: 1_000_000, completion_tokens: 500_000, ..Usage::default() };
//! assert_eq!(table.cost("my-finetune", &usage), Some(3.0 + 6.0));
//! // A dated snapshot finds its model's price.
//! assert_eq!(table.cost("gpt-4o-2024-08-06", &usage), table.cost("gpt-4o", &usage));
//! // Unknown models have no cost rather than a guessed one.
//! assert_eq!(table.cost("some-local-model", &usage), None);
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The price of one model, in US dollars per million (1 000 000) tokens.
///
/// Deserializes from `{ "input_per_mtok": 2.5, "cached_input_per_mtok": 1.25,
/// "output_per_mtok": 10.0 }`; `cached_input_per_mtok` may be left out (cached input is then
/// billed at the input price) and so may `output_per_mtok` (embedding models: 0). Unknown
/// fields, negative and non-finite prices are rejected, so a typo in a config file is an error
/// rather than a free model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ModelPrice {
    /// USD per million prompt (input) tokens that were not served from the prompt cache.
    pub input_per_mtok: f64,
    /// USD per million prompt tokens served from the prompt cache; `None` bills them at
    /// [`input_per_mtok`](Self::input_per_mtok).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_input_per_mtok: Option<f64>,
    /// USD per million completion (output) tokens, reasoning tokens included.
    pub output_per_mtok: f64,
}

impl ModelPrice {
    /// A price with no separate cached-input rate.
    pub const fn new(input_per_mtok: f64, output_per_mtok: f64) -> Self {
        Self {
            input_per_mtok,
            cached_input_per_mtok: None,
            output_per_mtok,
        }
    }

    /// Sets the price of cached prompt tokens.
    #[must_use]
    pub const fn with_cached_input(mut self, cached_input_per_mtok: f64) -> Self {
        self.cached_input_per_mtok = Some(cached_input_per_mtok);
        self
    }

    /// The cost in USD of `usage` at this price.
    ///
    /// - Uncached prompt tokens (`prompt_tokens - cached_tokens`, never below zero) are billed
    ///   at the input price.
    /// - Cached tokens are billed at the cached price (the input price when there is none).
    ///   They are a part of `prompt_tokens`, so a count above `prompt_tokens` (a confused
    ///   upstream) is capped at `prompt_tokens`.
    /// - `completion_tokens` are billed at the output price. OpenAI counts reasoning tokens
    ///   inside `completion_tokens`, so `reasoning_tokens` is informational and is **not**
    ///   added again.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let cached = usage.cached_tokens.unwrap_or(0).min(usage.prompt_tokens);
        let uncached = usage.prompt_tokens - cached;
        let cached_price = self.cached_input_per_mtok.unwrap_or(self.input_per_mtok);
        (uncached as f64 * self.input_per_mtok
            + cached as f64 * cached_price
            + usage.completion_tokens as f64 * self.output_per_mtok)
            / 1_000_000.0
    }
}

/// The wire form of [`ModelPrice`], validated on the way in.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelPriceRepr {
    input_per_mtok: f64,
    #[serde(default)]
    cached_input_per_mtok: Option<f64>,
    #[serde(default)]
    output_per_mtok: f64,
}

impl<'de> Deserialize<'de> for ModelPrice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let repr = ModelPriceRepr::deserialize(deserializer)?;
        let valid = |p: f64| p.is_finite() && p >= 0.0;
        if !valid(repr.input_per_mtok)
            || !valid(repr.output_per_mtok)
            || !repr.cached_input_per_mtok.is_none_or(valid)
        {
            return Err(serde::de::Error::custom(
                "prices must be finite, non-negative numbers (USD per million tokens)",
            ));
        }
        Ok(Self {
            input_per_mtok: repr.input_per_mtok,
            cached_input_per_mtok: repr.cached_input_per_mtok,
            output_per_mtok: repr.output_per_mtok,
        })
    }
}

/// Token usage of one response, as reported by the upstream.
///
/// Built from either usage shape OpenAI uses (see [`crate::audit::usage`]): chat completions,
/// completions and embeddings (`prompt_tokens`, `completion_tokens`, ...) and the Responses API
/// (`input_tokens`, `output_tokens`, ...).
///
/// The three counts every upstream reports are plain numbers (an embeddings response has no
/// completion, so `completion_tokens` is 0 there). The two details many OpenAI-compatible
/// servers leave out are `Option`s: `None` means "not reported", `Some(0)` "reported as zero".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Prompt (input) tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Completion (output) tokens, reasoning tokens included.
    pub completion_tokens: u64,
    /// Total tokens as reported (normally prompt + completion).
    pub total_tokens: u64,
    /// Prompt tokens served from the prompt cache (a part of `prompt_tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    /// Reasoning tokens (a part of `completion_tokens`; never billed twice).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
}

/// Prices by canonical model name, and the cost of a [`Usage`].
///
/// Keys are stored lowercase. Look-ups ([`get`](Self::get), [`cost`](Self::cost)) lowercase the
/// name and, when there is no entry for it, retry with a trailing snapshot date removed
/// (`-YYYY-MM-DD`, `-YYYYMMDD` or `-MMDD`): `gpt-4o-2024-08-06` and `gpt-4-0613` find `gpt-4o`
/// and `gpt-4`. An entry for the exact snapshot wins over its base model, so a snapshot priced
/// differently can be listed on its own (the built-in table does this for
/// `gpt-4o-2024-05-13`).
///
/// (De)serializes as a map from model name to [`ModelPrice`], in any serde format.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PricingTable {
    prices: HashMap<String, ModelPrice>,
}

/// OpenAI list prices (standard tier, USD per 1M tokens): `(model, input, cached input, output)`.
const BUILTIN: &[(&str, f64, Option<f64>, f64)] = &[
    ("gpt-5", 1.25, Some(0.125), 10.00),
    ("gpt-5-chat-latest", 1.25, Some(0.125), 10.00),
    ("gpt-5-mini", 0.25, Some(0.025), 2.00),
    ("gpt-5-nano", 0.05, Some(0.005), 0.40),
    ("gpt-4.1", 2.00, Some(0.50), 8.00),
    ("gpt-4.1-mini", 0.40, Some(0.10), 1.60),
    ("gpt-4.1-nano", 0.10, Some(0.025), 0.40),
    ("gpt-4o", 2.50, Some(1.25), 10.00),
    ("gpt-4o-2024-05-13", 5.00, None, 15.00),
    ("chatgpt-4o-latest", 5.00, None, 15.00),
    ("gpt-4o-mini", 0.15, Some(0.075), 0.60),
    ("o1", 15.00, Some(7.50), 60.00),
    ("o1-pro", 150.00, None, 600.00),
    ("o1-mini", 1.10, Some(0.55), 4.40),
    ("o3", 2.00, Some(0.50), 8.00),
    ("o3-pro", 20.00, None, 80.00),
    ("o3-mini", 1.10, Some(0.55), 4.40),
    ("o4-mini", 1.10, Some(0.275), 4.40),
    ("codex-mini-latest", 1.50, Some(0.375), 6.00),
    ("gpt-4-turbo", 10.00, None, 30.00),
    ("gpt-4", 30.00, None, 60.00),
    ("gpt-4-32k", 60.00, None, 120.00),
    ("gpt-3.5-turbo", 0.50, None, 1.50),
    ("gpt-3.5-turbo-instruct", 1.50, None, 2.00),
    ("davinci-002", 2.00, None, 2.00),
    ("babbage-002", 0.40, None, 0.40),
    ("text-embedding-3-small", 0.02, None, 0.0),
    ("text-embedding-3-large", 0.13, None, 0.0),
    ("text-embedding-ada-002", 0.10, None, 0.0),
];

impl PricingTable {
    /// A table with no prices: every [`cost`](Self::cost) is `None` until entries are added.
    pub fn empty() -> Self {
        Self::default()
    }

    /// OpenAI's public list prices (standard tier) for its text and embedding models.
    ///
    /// The prices were taken from <https://openai.com/api/pricing> in August 2025 (after the
    /// GPT-5 launch and the June 2025 o3 price cut). Prices change, and batch, flex and
    /// priority tiers or negotiated rates differ: hosts should [`merge`](Self::merge) their
    /// own prices over these rather than rely on them for billing.
    ///
    /// Covered: gpt-5, gpt-5-chat-latest, gpt-5-mini, gpt-5-nano, gpt-4.1, gpt-4.1-mini,
    /// gpt-4.1-nano, gpt-4o (and the differently priced gpt-4o-2024-05-13), chatgpt-4o-latest,
    /// gpt-4o-mini, o1, o1-pro, o1-mini, o3, o3-pro, o3-mini, o4-mini, codex-mini-latest,
    /// gpt-4-turbo, gpt-4, gpt-4-32k, gpt-3.5-turbo, gpt-3.5-turbo-instruct, davinci-002,
    /// babbage-002, text-embedding-3-small, text-embedding-3-large, text-embedding-ada-002.
    /// Older snapshots that were priced differently from their base model (for example
    /// gpt-3.5-turbo-0613) resolve to the base model's current price.
    pub fn builtin() -> Self {
        BUILTIN
            .iter()
            .map(|&(model, input, cached, output)| {
                (
                    model,
                    ModelPrice {
                        input_per_mtok: input,
                        cached_input_per_mtok: cached,
                        output_per_mtok: output,
                    },
                )
            })
            .collect()
    }

    /// Sets the price of `model` (stored lowercase), returning the price it replaces.
    pub fn insert(&mut self, model: impl Into<String>, price: ModelPrice) -> Option<ModelPrice> {
        let mut model = model.into();
        model.make_ascii_lowercase();
        self.prices.insert(model, price)
    }

    /// Builder form of [`insert`](Self::insert).
    #[must_use]
    pub fn with(mut self, model: impl Into<String>, price: ModelPrice) -> Self {
        self.insert(model, price);
        self
    }

    /// Removes the entry stored under exactly `model` (lowercased), returning its price.
    pub fn remove(&mut self, model: &str) -> Option<ModelPrice> {
        self.prices.remove(lowercase(model).as_ref())
    }

    /// Adds every entry of `overrides`, replacing this table's price where both have one.
    pub fn merge(&mut self, overrides: PricingTable) {
        // Keys of a table are lowercase already.
        self.prices.extend(overrides.prices);
    }

    /// The price for `model`: the entry for its lowercase name, else the entry for that name
    /// without a trailing snapshot date. `None` when neither exists.
    pub fn get(&self, model: &str) -> Option<&ModelPrice> {
        let model = lowercase(model);
        if let Some(price) = self.prices.get(model.as_ref()) {
            return Some(price);
        }
        strip_snapshot_date(&model).and_then(|base| self.prices.get(base))
    }

    /// The cost in USD of `usage` on `canonical_model`, or `None` if the table has no price
    /// for it. See [`ModelPrice::cost`] for the arithmetic.
    pub fn cost(&self, canonical_model: &str, usage: &Usage) -> Option<f64> {
        self.get(canonical_model).map(|price| price.cost(usage))
    }

    /// Reads a table from a JSON file: a map from model name to price, as in the
    /// [module docs](self). Merge it over [`builtin`](Self::builtin) to override some prices.
    /// A malformed file is an [`io::ErrorKind::InvalidData`](std::io::ErrorKind) error naming
    /// the problem.
    pub fn from_json_file(path: impl AsRef<std::path::Path>) -> std::io::Result<Self> {
        let text = std::fs::read(path.as_ref())?;
        serde_json::from_slice(&text).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.as_ref().display()),
            )
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.prices.len()
    }

    /// Whether the table has no entries.
    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }

    /// The entries, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ModelPrice)> + '_ {
        self.prices.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl<K: Into<String>> Extend<(K, ModelPrice)> for PricingTable {
    /// Inserts every entry, replacing existing prices (see [`PricingTable::insert`]).
    fn extend<I: IntoIterator<Item = (K, ModelPrice)>>(&mut self, iter: I) {
        for (model, price) in iter {
            self.insert(model, price);
        }
    }
}

impl<K: Into<String>> FromIterator<(K, ModelPrice)> for PricingTable {
    fn from_iter<I: IntoIterator<Item = (K, ModelPrice)>>(iter: I) -> Self {
        let mut table = Self::empty();
        table.extend(iter);
        table
    }
}

impl Serialize for PricingTable {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Sorted, so that a serialized table is stable from run to run.
        self.prices
            .iter()
            .collect::<BTreeMap<_, _>>()
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for PricingTable {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = PricingTable;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map from model name to price")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut table = PricingTable::empty();
                while let Some((model, price)) = map.next_entry::<String, ModelPrice>()? {
                    table.insert(model, price);
                }
                Ok(table)
            }
        }

        deserializer.deserialize_map(Visitor)
    }
}

/// `model` in ASCII lowercase, borrowed when it already is.
fn lowercase(model: &str) -> Cow<'_, str> {
    if model.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(model.to_ascii_lowercase())
    } else {
        Cow::Borrowed(model)
    }
}

/// `model` without a trailing `-YYYY-MM-DD`, `-YYYYMMDD` or `-MMDD` snapshot date, or `None`
/// when it has none (or nothing would be left).
fn strip_snapshot_date(model: &str) -> Option<&str> {
    fn digits(b: &[u8]) -> bool {
        b.iter().all(u8::is_ascii_digit)
    }
    fn month(b: &[u8]) -> bool {
        matches!(b, [b'0', b'1'..=b'9'] | [b'1', b'0'..=b'2'])
    }
    fn day(b: &[u8]) -> bool {
        matches!(
            b,
            [b'0', b'1'..=b'9'] | [b'1' | b'2', b'0'..=b'9'] | [b'3', b'0' | b'1']
        )
    }

    let b = model.as_bytes();
    let n = b.len();
    let suffix_len = match b {
        [.., b'-', y1, y2, y3, y4, b'-', m1, m2, b'-', d1, d2]
            if digits(&[*y1, *y2, *y3, *y4]) && month(&[*m1, *m2]) && day(&[*d1, *d2]) =>
        {
            11
        }
        [.., b'-', y1, y2, y3, y4, m1, m2, d1, d2]
            if digits(&[*y1, *y2, *y3, *y4]) && month(&[*m1, *m2]) && day(&[*d1, *d2]) =>
        {
            9
        }
        [.., b'-', m1, m2, d1, d2] if month(&[*m1, *m2]) && day(&[*d1, *d2]) => 5,
        _ => return None,
    };
    // The suffix is ASCII, so the cut is on a character boundary; `get` keeps that panic-free.
    model.get(..n - suffix_len).filter(|base| !base.is_empty())
}

#[cfg(test)]
mod tests {
    use super::strip_snapshot_date;

    #[test]
    fn snapshot_dates() {
        assert_eq!(strip_snapshot_date("gpt-4o-2024-08-06"), Some("gpt-4o"));
        assert_eq!(strip_snapshot_date("gpt-4-0613"), Some("gpt-4"));
        assert_eq!(
            strip_snapshot_date("gpt-3.5-turbo-0125"),
            Some("gpt-3.5-turbo")
        );
        assert_eq!(strip_snapshot_date("claude-x-20241022"), Some("claude-x"));
        assert_eq!(strip_snapshot_date("gpt-4o"), None);
        assert_eq!(strip_snapshot_date("text-embedding-ada-002"), None);
        assert_eq!(strip_snapshot_date("model-1399"), None);
        assert_eq!(strip_snapshot_date("-0613"), None);
        assert_eq!(strip_snapshot_date("é-0613"), Some("é"));
        assert_eq!(strip_snapshot_date(""), None);
    }
}
