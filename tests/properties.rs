//! Property tests: the properties the fuzz targets in `fuzz/` check, with short proptest runs
//! (the properties themselves are in `fuzz/src/checks.rs`, shared with the fuzz targets).
//!
//! - the request view never panics, and a view that parses keeps its invariants and agrees
//!   with what `serde_json` reads from the same bytes;
//! - the multipart reader reads a well-formed form as it was written;
//! - the usage scanner finds the same usage whatever the chunking of the response;
//! - resolving a canonical model name gives it back;
//! - the body rewriter's output is JSON meaning the input plus the edits.

#[path = "../fuzz/src/checks.rs"]
mod checks;

use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{Map, Value};
use tower_llm_policy::audit::usage::ScanMode;
use tower_llm_policy::rewrite::Edits;
use tower_llm_policy::ModelAliases;

use checks::{Form, FormField, CONTENT_TYPES, METHODS, PATHS};

/// Keys the view and the rewriter read, and a few they skip.
const KEYS: &[&str] = &[
    "model",
    "messages",
    "content",
    "role",
    "name",
    "text",
    "type",
    "input",
    "prompt",
    "instructions",
    "tools",
    "tool_calls",
    "arguments",
    "output",
    "session",
    "stream",
    "stream_options",
    "include_usage",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "user",
    "safety_identifier",
    "n",
    "image_url",
    "metadata",
    "temperature",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(KEYS).prop_map(str::to_owned),
        1 => "[a-z_]{0,6}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        (0u64..10_000).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        prop::sample::select(&["gpt-4o", "text", "image_url", "input_file", "function"][..])
            .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn object() -> impl Strategy<Value = Value> {
    prop::collection::vec((key(), json()), 0..8)
        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>()))
}

/// An object written as a client may write it: compact or pretty, a key sometimes escaped,
/// sometimes a member sent twice.
fn object_text() -> impl Strategy<Value = Vec<u8>> {
    (
        object(),
        any::<bool>(),
        any::<u8>(),
        prop::option::of((key(), json())),
    )
        .prop_map(|(v, pretty, escape, dup)| {
            let mut text = if pretty {
                serde_json::to_string_pretty(&v).unwrap()
            } else {
                serde_json::to_string(&v).unwrap()
            };
            if escape % 4 == 0 {
                // `"model"` → `"m\u006fdel"`: the same key, escaped.
                text = text.replacen("\"model\"", "\"m\\u006fdel\"", 1);
                text = text.replacen("\"stream_options\"", "\"stream_\\u006fptions\"", 1);
            }
            if let (Some((k, dup)), Some(end)) = (dup, text.rfind('}')) {
                let sep = if v.as_object().is_some_and(|o| !o.is_empty()) {
                    ","
                } else {
                    ""
                };
                let member = format!("{sep}{}:{dup}", Value::from(k));
                text.insert_str(end, &member);
            }
            text.into_bytes()
        })
}

/// An object with one byte that is not UTF-8 put somewhere (often inside a string).
fn not_utf8() -> impl Strategy<Value = Vec<u8>> {
    (object_text(), any::<prop::sample::Index>(), 0x80u8..=0xff).prop_map(|(mut text, at, b)| {
        let at = at.index(text.len() + 1);
        text.insert(at, b);
        text
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => object_text(),
        1 => not_utf8(),
        1 => prop::collection::vec(any::<u8>(), 0..64),
        1 => json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ]
}

proptest! {
    #[test]
    fn request_view_never_panics_and_keeps_its_invariants(
        method in 0..METHODS.len(),
        path in 0..PATHS.len(),
        content_type in 0..CONTENT_TYPES.len(),
        aliases in any::<bool>(),
        body in body(),
    ) {
        let parts = checks::request_parts(METHODS[method], PATHS[path], CONTENT_TYPES[content_type])
            .expect("a valid head");
        checks::check_request_view(&parts, Bytes::from(body), &checks::policy(aliases));
    }
}

const BOMS: &[&[u8]] = &[b"\xff\xfe", b"\xfe\xff", b"\xef\xbb\xbf"];

fn form_field() -> impl Strategy<Value = FormField> {
    let name = prop_oneof![
        4 => prop::sample::select(
            &["model", "prompt", "user", "n", "size", "quality", "stream", "file", "language"][..]
        )
        .prop_map(str::to_owned),
        1 => "[a-z\"; ]{0,6}",
    ];
    let data = prop_oneof![
        prop::sample::select(
            &[
                "whisper-1",
                "gpt-image-1",
                "Openai/GPT-4o-2024-08-06",
                "3",
                ""
            ][..]
        )
        .prop_map(|s| s.as_bytes().to_vec()),
        "\\PC{0,16}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..24),
        // Text after a byte-order mark (UTF-16 LE and BE, UTF-8): still read as UTF-8 bytes.
        (prop::sample::select(BOMS), "[a-z0-9-]{0,8}").prop_map(|(bom, text)| [
            bom,
            text.as_bytes()
        ]
        .concat()),
    ];
    (
        name,
        prop::option::weighted(0.2, "[a-z]{1,6}\\.wav"),
        prop::option::weighted(
            0.3,
            prop::sample::select(&["text/plain", "application/octet-stream", "audio/wav"][..])
                .prop_map(str::to_owned),
        ),
        data,
    )
        .prop_map(|(name, filename, content_type, data)| FormField {
            name,
            filename,
            content_type,
            data,
        })
}

proptest! {
    #[test]
    fn multipart_forms_are_read_as_written(
        boundary in any::<usize>(),
        path in prop::sample::select(&[9usize, 10, 6, 7, 5, 0, 16][..]),
        fields in prop::collection::vec(form_field(), 0..6),
        bare_lf in prop::bool::weighted(0.1),
        unclosed in prop::bool::weighted(0.1),
        preamble in prop::collection::vec(any::<u8>(), 0..4),
        epilogue in prop::collection::vec(any::<u8>(), 0..4),
        aliases in any::<bool>(),
    ) {
        let form = Form { boundary, path, fields, bare_lf, unclosed, preamble, epilogue };
        checks::check_multipart(&form, &checks::policy(aliases));
    }
}

fn usage_json() -> impl Strategy<Value = String> {
    let n = || prop_oneof![Just(None), (0u64..100_000).prop_map(Some)];
    (n(), n(), n(), n(), any::<bool>(), any::<bool>()).prop_map(
        |(prompt, completion, total, cached, responses, null)| {
            if null {
                return "null".to_owned();
            }
            let (p, c, d) = if responses {
                ("input_tokens", "output_tokens", "input_tokens_details")
            } else {
                (
                    "prompt_tokens",
                    "completion_tokens",
                    "prompt_tokens_details",
                )
            };
            let mut fields = Vec::new();
            if let Some(v) = prompt {
                fields.push(format!("\"{p}\":{v}"));
            }
            if let Some(v) = completion {
                fields.push(format!("\"{c}\": {v}"));
            }
            if let Some(v) = total {
                fields.push(format!("\"total_tokens\":{v}"));
            }
            if let Some(v) = cached {
                fields.push(format!("\"{d}\":{{\"cached_tokens\":{v}}}"));
            }
            format!("{{{}}}", fields.join(","))
        },
    )
}

/// One SSE event of a chat/completions or Responses stream.
fn event() -> impl Strategy<Value = String> {
    prop_oneof![
        usage_json().prop_map(|u| format!("data: {{\"choices\":[],\"usage\":{u}}}")),
        ("\\PC{0,12}", usage_json()).prop_map(|(t, u)| format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":{}}}}}],\"usage\":{u}}}",
            Value::from(t)
        )),
        usage_json().prop_map(|u| format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\n\
             data: \"response\":{{\"id\":\"r\",\"output\":[],\"usage\":{u}}}}}"
        )),
        Just("data: [DONE]".to_owned()),
        Just(": keep-alive".to_owned()),
        "\\PC{0,16}".prop_map(|t| format!("data: {t}")),
    ]
}

fn sse_body() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(event(), 0..6),
        prop::sample::select(&["\n", "\r\n", "\r"][..]),
        any::<bool>(),
    )
        .prop_map(|(events, nl, closed)| {
            let mut out = String::new();
            for e in &events {
                out.push_str(&e.replace('\n', nl));
                out.push_str(nl);
                out.push_str(nl);
            }
            if !closed {
                out.truncate(out.len().saturating_sub(nl.len()));
            }
            out.into_bytes()
        })
}

proptest! {
    #[test]
    fn usage_does_not_depend_on_the_chunking(
        sse in any::<bool>(),
        max in prop::option::of(prop_oneof![0usize..200, Just(64)]),
        stream in sse_body(),
        json in usage_json().prop_map(|u| format!("{{\"id\":\"x\",\"choices\":[],\"usage\":{u}}}").into_bytes()),
        noise in prop::collection::vec(any::<u8>(), 0..32),
        noisy in prop::bool::weighted(0.2),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let (mode, mut body) = if sse { (ScanMode::Sse, stream) } else { (ScanMode::Json, json) };
        if noisy {
            body.extend_from_slice(&noise);
        }
        checks::check_usage_chunking(mode, max, &body, &cuts);
    }
}

fn model_piece() -> impl Strategy<Value = String> {
    prop::sample::select(
        &[
            "gpt-4o",
            "gpt4",
            "GPT-4",
            "-0613",
            "-2024-08-06",
            "-20241022",
            "-latest",
            "-thinking",
            "openai/",
            "/",
            " ",
            "-",
            "x",
            "0",
        ][..],
    )
    .prop_map(str::to_owned)
}

fn model_name() -> impl Strategy<Value = String> {
    prop::collection::vec(model_piece(), 0..6).prop_map(|p| p.concat())
}

proptest! {
    #[test]
    fn canonical_model_names_resolve_to_themselves(
        aliases in prop::collection::vec((model_name(), model_name()), 0..4),
        suffixes in prop::collection::vec(prop::sample::select(&["-latest", "-thinking", "-x", " -0613"][..]), 0..3),
        model in model_name(),
    ) {
        let mut table = ModelAliases::new();
        for (from, to) in &aliases {
            table = table.alias(from, to);
        }
        for s in suffixes {
            table = table.strip_suffix(s);
        }
        checks::check_model(&table, &model);
    }
}

proptest! {
    #[test]
    fn rewritten_bodies_mean_the_input_plus_the_edits(
        body in prop_oneof![
            4 => object_text(),
            1 => not_utf8(),
            1 => prop::collection::vec(any::<u8>(), 0..32),
        ],
        include_usage in any::<bool>(),
        clamp in prop::option::of(prop_oneof![0u64..5000, any::<u64>()]),
    ) {
        let mut edits = Edits::default();
        edits.include_usage = include_usage;
        edits.clamp_output = clamp;
        checks::check_rewrite(&body, &edits);
    }
}
