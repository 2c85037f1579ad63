//! The model canonicaliser: an alias table and a name from the input. Never panics; resolving
//! a canonical name again gives the same canonical name.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tower_llm_policy::ModelAliases;
use tower_llm_policy_fuzz::checks;

#[derive(Arbitrary, Debug)]
struct Input {
    aliases: Vec<(String, String)>,
    suffixes: Vec<String>,
    model: String,
}

fuzz_target!(|input: Input| {
    let mut table = ModelAliases::new();
    for (from, to) in &input.aliases {
        table = table.alias(from, to);
    }
    for suffix in &input.suffixes {
        table = table.strip_suffix(suffix);
    }
    checks::check_model(&table, &input.model);
});
