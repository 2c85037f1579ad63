//! Prices, snapshot look-ups, overrides and the cost arithmetic.

use tower_llm_policy::audit::pricing::{ModelPrice, PricingTable, Usage};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

fn usage(prompt: u64, cached: Option<u64>, completion: u64, reasoning: Option<u64>) -> Usage {
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        cached_tokens: cached,
        reasoning_tokens: reasoning,
    }
}

fn table() -> PricingTable {
    PricingTable::empty()
        .with("m", ModelPrice::new(2.0, 8.0).with_cached_input(0.5))
        .with("plain", ModelPrice::new(2.0, 8.0))
}

#[test]
fn cost_of_prompt_and_completion() {
    let cost = table().cost("m", &usage(1_000, None, 500, None)).unwrap();
    assert!(close(cost, (1_000.0 * 2.0 + 500.0 * 8.0) / 1e6), "{cost}");
}

#[test]
fn cached_tokens_are_billed_at_the_cached_price() {
    let cost = table()
        .cost("m", &usage(1_000, Some(400), 0, None))
        .unwrap();
    assert!(close(cost, (600.0 * 2.0 + 400.0 * 0.5) / 1e6), "{cost}");
}

#[test]
fn cached_tokens_without_a_cached_price_cost_the_input_price() {
    let cost = table()
        .cost("plain", &usage(1_000, Some(400), 0, None))
        .unwrap();
    assert!(close(cost, 1_000.0 * 2.0 / 1e6), "{cost}");
}

#[test]
fn cached_tokens_above_prompt_tokens_are_capped() {
    let cost = table()
        .cost("m", &usage(100, Some(1_000), 0, None))
        .unwrap();
    assert!(close(cost, 100.0 * 0.5 / 1e6), "{cost}");
}

#[test]
fn reasoning_tokens_are_not_billed_twice() {
    let t = table();
    let with = t.cost("m", &usage(10, None, 1_000, Some(900))).unwrap();
    let without = t.cost("m", &usage(10, None, 1_000, None)).unwrap();
    assert_eq!(with, without);
    assert!(close(with, (10.0 * 2.0 + 1_000.0 * 8.0) / 1e6), "{with}");
}

#[test]
fn zero_usage_costs_nothing() {
    assert_eq!(table().cost("m", &Usage::default()), Some(0.0));
}

#[test]
fn unknown_model_has_no_cost() {
    assert_eq!(table().cost("gpt-4o", &usage(1, None, 1, None)), None);
    assert_eq!(
        PricingTable::builtin().cost("llama-3-70b", &usage(1, None, 1, None)),
        None
    );
    assert_eq!(PricingTable::empty().cost("", &Usage::default()), None);
}

#[test]
fn builtin_prices_known_models() {
    let t = PricingTable::builtin();
    for model in [
        "gpt-5",
        "gpt-5-mini",
        "gpt-5-nano",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "gpt-4o",
        "gpt-4o-mini",
        "o1",
        "o1-mini",
        "o3",
        "o3-mini",
        "o4-mini",
        "gpt-4-turbo",
        "gpt-4",
        "gpt-3.5-turbo",
        "text-embedding-3-small",
        "text-embedding-3-large",
        "text-embedding-ada-002",
    ] {
        assert!(t.get(model).is_some(), "{model} missing");
    }
    let gpt4o = t.get("gpt-4o").unwrap();
    assert_eq!(gpt4o.input_per_mtok, 2.5);
    assert_eq!(gpt4o.cached_input_per_mtok, Some(1.25));
    assert_eq!(gpt4o.output_per_mtok, 10.0);
}

#[test]
fn embeddings_cost_only_input() {
    let u = Usage {
        prompt_tokens: 1_000_000,
        total_tokens: 1_000_000,
        ..Usage::default()
    };
    let cost = PricingTable::builtin()
        .cost("text-embedding-3-small", &u)
        .unwrap();
    assert!(close(cost, 0.02), "{cost}");
}

#[test]
fn dated_snapshots_find_their_model() {
    let t = PricingTable::builtin();
    let u = usage(1_000, Some(10), 1_000, None);
    assert_eq!(
        t.cost("gpt-4o-mini-2024-07-18", &u),
        t.cost("gpt-4o-mini", &u)
    );
    assert_eq!(t.cost("gpt-4o-2024-08-06", &u), t.cost("gpt-4o", &u));
    assert_eq!(t.cost("gpt-4-0613", &u), t.cost("gpt-4", &u));
    assert_eq!(
        t.cost("gpt-3.5-turbo-0125", &u),
        t.cost("gpt-3.5-turbo", &u)
    );
    assert!(t.cost("gpt-4o-mini", &u).is_some());
}

#[test]
fn lookup_ignores_case() {
    let t = PricingTable::builtin();
    assert_eq!(t.get("GPT-4o"), t.get("gpt-4o"));
    assert_eq!(t.get("GPT-4O-2024-08-06"), t.get("gpt-4o"));
    assert!(t.get("GPT-4o").is_some());
}

#[test]
fn exact_snapshot_entry_wins_over_the_base_model() {
    let t = PricingTable::builtin();
    assert_eq!(
        t.get("gpt-4o-2024-05-13"),
        Some(&ModelPrice::new(5.0, 15.0))
    );

    let t = PricingTable::empty()
        .with("gpt-4o", ModelPrice::new(1.0, 1.0))
        .with("GPT-4o-2024-11-20", ModelPrice::new(9.0, 9.0));
    assert_eq!(t.get("gpt-4o-2024-11-20"), Some(&ModelPrice::new(9.0, 9.0)));
    assert_eq!(t.get("gpt-4o-2024-08-06"), Some(&ModelPrice::new(1.0, 1.0)));
}

#[test]
fn undated_suffixes_are_not_stripped() {
    let t = PricingTable::empty().with("gpt-4", ModelPrice::new(1.0, 1.0));
    assert_eq!(t.get("gpt-4-32k"), None);
    assert_eq!(t.get("gpt-4-1399"), None);
    assert_eq!(t.get("gpt-4-preview"), None);
}

#[test]
fn insert_replaces_and_returns_the_old_price() {
    let mut t = PricingTable::empty();
    assert_eq!(t.insert("X", ModelPrice::new(1.0, 2.0)), None);
    assert_eq!(
        t.insert("x", ModelPrice::new(3.0, 4.0)),
        Some(ModelPrice::new(1.0, 2.0))
    );
    assert_eq!(t.len(), 1);
    assert_eq!(t.remove("X"), Some(ModelPrice::new(3.0, 4.0)));
    assert!(t.is_empty());
}

#[test]
fn merge_overrides_builtin_prices_and_keeps_the_rest() {
    let mut t = PricingTable::builtin();
    let before = t.len();
    let overrides = PricingTable::empty()
        .with("gpt-4o", ModelPrice::new(1.0, 2.0))
        .with("my-model", ModelPrice::new(3.0, 4.0));
    t.merge(overrides);
    assert_eq!(t.len(), before + 1);
    assert_eq!(t.get("gpt-4o"), Some(&ModelPrice::new(1.0, 2.0)));
    assert_eq!(t.get("my-model"), Some(&ModelPrice::new(3.0, 4.0)));
    assert!(t.get("gpt-4o-mini").is_some());
}

#[test]
fn extend_and_collect() {
    let mut t: PricingTable = [("a", ModelPrice::new(1.0, 1.0))].into_iter().collect();
    t.extend([(String::from("B"), ModelPrice::new(2.0, 2.0))]);
    assert_eq!(t.get("b"), Some(&ModelPrice::new(2.0, 2.0)));
    assert_eq!(t.len(), 2);
}

#[test]
fn overrides_load_from_a_json_map() {
    let t: PricingTable = serde_json::from_str(
        r#"{
            "My-Model": { "input_per_mtok": 1.5, "cached_input_per_mtok": 0.5, "output_per_mtok": 6 },
            "my-embedder": { "input_per_mtok": 0.1 }
        }"#,
    )
    .unwrap();
    assert_eq!(
        t.get("my-model"),
        Some(&ModelPrice::new(1.5, 6.0).with_cached_input(0.5))
    );
    assert_eq!(t.get("my-embedder"), Some(&ModelPrice::new(0.1, 0.0)));
}

#[test]
fn invalid_prices_are_rejected() {
    for bad in [
        r#"{ "m": { "input_per_mtok": -1, "output_per_mtok": 1 } }"#,
        r#"{ "m": { "input_per_mtok": 1, "output_per_mtok": 1, "cached_input_per_mtok": -0.5 } }"#,
        r#"{ "m": { "input_per_mtok": 1, "output_per_mtok": 1, "ouput": 2 } }"#,
        r#"{ "m": { "output_per_mtok": 1 } }"#,
        r#"{ "m": 3 }"#,
        r#"[1, 2]"#,
    ] {
        assert!(serde_json::from_str::<PricingTable>(bad).is_err(), "{bad}");
    }
}

#[test]
fn table_round_trips_through_json() {
    let t = PricingTable::builtin();
    let json = serde_json::to_string(&t).unwrap();
    let back: PricingTable = serde_json::from_str(&json).unwrap();
    assert_eq!(back, t);
}

#[test]
fn usage_deserializes_with_missing_fields() {
    let u: Usage = serde_json::from_str(r#"{ "prompt_tokens": 5, "total_tokens": 5 }"#).unwrap();
    assert_eq!(
        u,
        Usage {
            prompt_tokens: 5,
            total_tokens: 5,
            ..Usage::default()
        }
    );
}
