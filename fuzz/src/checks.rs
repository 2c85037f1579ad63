//! The properties the fuzz targets (`fuzz/fuzz_targets/*.rs`) and the property tests
//! (`tests/properties.rs`, which includes this file) check. Each `check_*` function panics
//! when a property does not hold.

// Included by `tests/properties.rs` as a private module too, where not every item is used.
#![allow(dead_code, unreachable_pub)]

use bytes::Bytes;
use http::request::Parts;
use serde_json::Value;
use tower_llm_policy::audit::usage::{ScanMode, UsageScanner};
use tower_llm_policy::endpoint::BodyModel;
use tower_llm_policy::request::PromptSource;
use tower_llm_policy::rewrite::Edits;
use tower_llm_policy::{LlmRequest, ModelAliases, Policy};

/// Methods a request may have.
pub const METHODS: &[&str] = &["POST", "GET", "PUT", "DELETE", "PATCH"];

/// Paths (and queries) of the endpoints the view classifies, Azure and bare forms included.
pub const PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/realtime/sessions",
    "/v1/realtime/client_secrets",
    "/v1/realtime?model=gpt-4o-realtime-preview",
    "/openai/realtime?api-version=2024-10-01&deployment=my-rt",
    "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21",
    "/openai/deployments/whisper/audio/transcriptions",
    "/v1/models/openai/gpt-4o",
    "/v1/files",
    "/v1/batches",
    "/chat/completions",
    "/V1/Chat/%63ompletions",
    "/v1/x/../responses",
    "/v1/conversations/c1/items",
    "/v1/unknown",
    "/",
];

/// The multipart boundaries of [`CONTENT_TYPES`].
pub const BOUNDARIES: &[&str] = &[
    "----WebKitFormBoundary7MA4YWxkTrZu0gW",
    "X",
    "a'()+_,-./:=?b",
];

/// Content types: JSON, multipart (with the boundaries above, quoted or not), odd ones.
pub const CONTENT_TYPES: &[Option<&str>] = &[
    Some("application/json"),
    None,
    Some("multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW"),
    Some("multipart/form-data; boundary=X"),
    Some("Multipart/Form-Data ; boundary=\"X\""),
    Some("multipart/form-data"),
    Some("application/json; charset=utf-8"),
    Some("text/plain"),
    Some("multipart/form-data; boundary=\"a'()+_,-./:=?b\""),
    Some("application/x-www-form-urlencoded"),
];

/// The head of a request, or `None` when `uri` is not a valid URI.
pub fn request_parts(method: &str, uri: &str, content_type: Option<&str>) -> Option<Parts> {
    let mut builder = http::Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        builder = builder.header(http::header::CONTENT_TYPE, ct);
    }
    builder.body(()).ok().map(|r| r.into_parts().0)
}

/// A policy with a few aliases, or the default one.
pub fn policy(with_aliases: bool) -> Policy {
    if with_aliases {
        Policy::new().model_aliases(
            ModelAliases::new()
                .alias("my-gpt4o", "gpt-4o")
                .alias("gpt4", "gpt-4")
                .strip_suffix("-latest"),
        )
    } else {
        Policy::default()
    }
}

/// Parses `body` with the head `parts`; when the parse succeeds, checks the view's invariants
/// (and, for a JSON body, that it agrees with what `serde_json::Value` reads from the same
/// bytes). Returns the view.
pub fn check_request_view(parts: &Parts, body: Bytes, policy: &Policy) -> Option<LlmRequest> {
    let req = LlmRequest::parse_with(parts, body.clone(), policy).ok()?;
    assert!(req.has_body());
    assert_eq!(req.body(), &body, "the view keeps the body as read");

    // The model is resolved once, through the policy's aliases.
    let resolved = req.model().map(|m| policy.aliases().resolve(m));
    assert_eq!(req.model_name(), resolved.as_ref(), "model resolved");
    assert_eq!(
        req.canonical_model(),
        resolved.as_ref().map(|n| n.canonical.as_str())
    );
    let route_default = match req.body_model() {
        BodyModel::Default(model) => Some(model),
        _ => None,
    };
    if req.model_is_default() {
        assert_eq!(req.model(), route_default);
    }
    if req.model().is_none() && req.body_model() != BodyModel::None {
        assert_eq!(route_default, None, "default model applies");
    }
    // Every model the request selects is resolved, the first being the priced one.
    let models: Vec<&str> = req.models().map(|(sent, _)| sent).collect();
    if req.model().is_some() {
        assert_eq!(
            models.first().copied(),
            req.model(),
            "models() starts with model()"
        );
    }
    for (sent, name) in req.models() {
        assert_eq!(
            *name,
            policy.aliases().resolve(sent),
            "every model resolved"
        );
    }
    if let Some(deployment) = &req.route().deployment {
        assert_eq!(
            req.model(),
            Some(deployment.as_str()),
            "the deployment runs"
        );
    }

    // Prompt parts: text borrowed from the body is a string's content as written there
    // (no escapes), or the raw JSON text of `tools` and schemas; anything else is owned.
    let multipart = is_multipart_ct(parts);
    let base = body.as_ptr() as usize;
    let mut chars = 0;
    for part in req.prompt_parts() {
        chars += part.text.chars().count();
        let start = part.text.as_ptr() as usize;
        let borrowed = start >= base && start + part.text.len() <= base + body.len();
        if !borrowed || multipart {
            continue;
        }
        // JSON parts are never empty: an empty text would be a span that is not valid UTF-8.
        assert!(!part.text.is_empty(), "an empty borrowed prompt part");
        let (s, e) = (start - base, start - base + part.text.len());
        if matches!(part.source, PromptSource::Tools | PromptSource::Schema) {
            assert!(
                serde_json::from_str::<&serde_json::value::RawValue>(part.text).is_ok(),
                "tools text is JSON"
            );
        } else {
            assert!(
                s > 0 && body[s - 1] == b'"',
                "a borrowed part starts a string"
            );
            assert!(
                e < body.len() && body[e] == b'"',
                "a borrowed part ends a string"
            );
            assert!(
                !part.text.contains(['"', '\\']),
                "a borrowed part has no escapes"
            );
        }
    }
    assert_eq!(req.prompt_chars(), chars);

    // What the upstream reads: a JSON body the view accepts is JSON, and the fields agree.
    if !multipart && !body.iter().all(u8::is_ascii_whitespace) {
        let v: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            // A `\uD800` escape without its pair is in JSON's grammar (RFC 8259 leaves its
            // meaning open); serde_json refuses it where it reads a string, the view only where
            // it reads one too (a skipped value may hold it).
            Err(e) if lone_surrogate(&body, &e) => return Some(req),
            // So is a number too large for an `f64` (`1e400`), which serde_json refuses too.
            Err(e) if e.to_string().starts_with("number out of range") => return Some(req),
            Err(e) => panic!("the view accepted a body serde_json rejects: {e}"),
        };
        let obj = v
            .as_object()
            .expect("the view accepted a body that is not an object");
        if req.route().deployment.is_none() {
            let session_model = obj
                .get("session")
                .and_then(|s| s.get("model"))
                .and_then(Value::as_str);
            let sent = obj.get("model").and_then(Value::as_str).or(session_model);
            if let Some(sent) = sent {
                assert_eq!(req.model(), Some(sent), "the model the upstream reads");
            }
        }
        assert_eq!(
            req.stream(),
            obj.get("stream").and_then(Value::as_bool).unwrap_or(false)
        );
        for (name, got) in [
            ("max_tokens", req.max_tokens()),
            ("max_completion_tokens", req.max_completion_tokens()),
            ("max_output_tokens", req.max_output_tokens()),
            ("n", req.n()),
        ] {
            assert_eq!(got, obj.get(name).and_then(Value::as_u64), "{name}");
        }
        let user = obj.get("user").and_then(Value::as_str);
        let safety = obj.get("safety_identifier").and_then(Value::as_str);
        assert_eq!(req.user(), user.or(safety), "user");
    }
    Some(req)
}

/// Whether serde_json refused `body` for a `\uD800`-`\uDFFF` escape without its pair.
fn lone_surrogate(body: &[u8], e: &serde_json::Error) -> bool {
    let msg = e.to_string();
    (msg.contains("surrogate") || msg.contains("hex escape"))
        && body
            .windows(3)
            .any(|w| w[0] == b'\\' && w[1] == b'u' && matches!(w[2].to_ascii_lowercase(), b'd'))
}

fn is_multipart_ct(parts: &Parts) -> bool {
    parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .get(..19)
                .is_some_and(|p| p.eq_ignore_ascii_case("multipart/form-data"))
        })
}

/// One part of a multipart form, as the fuzz target and the tests build it.
#[derive(Clone, Debug)]
pub struct FormField {
    /// The field's name.
    pub name: String,
    /// The part's file name (a file part), if any.
    pub filename: Option<String>,
    /// The part's own content type, if any.
    pub content_type: Option<String>,
    /// The part's data.
    pub data: Vec<u8>,
}

/// A multipart form and how it is written.
#[derive(Clone, Debug)]
pub struct Form {
    /// Index into [`BOUNDARIES`].
    pub boundary: usize,
    /// Index into [`PATHS`].
    pub path: usize,
    /// The parts.
    pub fields: Vec<FormField>,
    /// Lines end in `\n` instead of `\r\n`.
    pub bare_lf: bool,
    /// The closing delimiter is left out.
    pub unclosed: bool,
    /// Bytes before the first delimiter.
    pub preamble: Vec<u8>,
    /// Bytes after the closing delimiter.
    pub epilogue: Vec<u8>,
}

impl Form {
    /// The body, and whether it is well formed (so that a reader must read it as built).
    pub fn render(&self) -> (Bytes, bool) {
        let boundary = BOUNDARIES[self.boundary % BOUNDARIES.len()];
        let nl: &[u8] = if self.bare_lf { b"\n" } else { b"\r\n" };
        let delimiter = format!("--{boundary}");
        let plain = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        };
        let mut clean = !self.bare_lf && !self.unclosed;
        let mut out = self.preamble.clone();
        if !self.preamble.is_empty() {
            out.extend_from_slice(nl);
            clean &= !contains(&self.preamble, delimiter.as_bytes());
        }
        for f in &self.fields {
            out.extend_from_slice(delimiter.as_bytes());
            out.extend_from_slice(nl);
            out.extend_from_slice(b"Content-Disposition: form-data; name=\"");
            out.extend_from_slice(f.name.as_bytes());
            out.push(b'"');
            clean &= plain(&f.name);
            if let Some(file) = &f.filename {
                out.extend_from_slice(b"; filename=\"");
                out.extend_from_slice(file.as_bytes());
                out.push(b'"');
                clean &= plain(file);
            }
            out.extend_from_slice(nl);
            if let Some(ct) = &f.content_type {
                out.extend_from_slice(b"Content-Type: ");
                out.extend_from_slice(ct.as_bytes());
                out.extend_from_slice(nl);
                clean &= ct == "text/plain" || ct == "application/octet-stream";
            }
            out.extend_from_slice(nl);
            out.extend_from_slice(&f.data);
            out.extend_from_slice(nl);
            clean &= !contains(&f.data, delimiter.as_bytes()) && !f.data.ends_with(b"\r");
        }
        if !self.unclosed {
            out.extend_from_slice(delimiter.as_bytes());
            out.extend_from_slice(b"--");
            out.extend_from_slice(nl);
            out.extend_from_slice(&self.epilogue);
        }
        clean &= !self.fields.is_empty();
        (Bytes::from(out), clean)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Parses a multipart form through the request view; checks the view's invariants and, for
/// a well-formed form, that it reads the fields as they were written.
pub fn check_multipart(form: &Form, policy: &Policy) {
    let boundary = BOUNDARIES[form.boundary % BOUNDARIES.len()];
    let path = PATHS[form.path % PATHS.len()];
    let ct = format!("multipart/form-data; boundary=\"{boundary}\"");
    let parts = request_parts("POST", path, Some(&ct)).expect("a valid head");
    let (body, clean) = form.render();
    let result = LlmRequest::parse_with(&parts, body.clone(), policy);
    if let Ok(req) = &result {
        // The same invariants as any view.
        check_request_view(&parts, body.clone(), policy).expect("the parse is deterministic");
        assert_eq!(req.body(), &body);
    }
    if !clean {
        return;
    }
    let wanted = |f: &&FormField| f.filename.is_none();
    let texts = |name: &str| -> Vec<String> {
        form.fields
            .iter()
            .filter(wanted)
            .filter(|f| f.name == name)
            .map(|f| String::from_utf8_lossy(&f.data).into_owned())
            .collect()
    };
    // The fields the view reads: sent twice, as a file, not as UTF-8, or in another case,
    // they are refused (a parser upstream could read them otherwise). A `session` part is JSON.
    const READ: [&str; 8] = [
        "model", "prompt", "user", "n", "size", "quality", "stream", "session",
    ];
    if form
        .fields
        .iter()
        .any(|f| f.name == "session" || f.name.bytes().any(|b| b.is_ascii_uppercase()))
    {
        return;
    }
    let ambiguous = form.fields.iter().any(|f| {
        READ.contains(&f.name.as_str())
            && (f.filename.is_some() || std::str::from_utf8(&f.data).is_err())
    }) || READ
        .iter()
        .any(|r| form.fields.iter().filter(|f| f.name == *r).count() > 1);
    let models = texts("model");
    let ns = texts("n");
    let bad_n = ns.iter().any(|n| n.trim().parse::<u64>().is_err());
    if ambiguous || bad_n {
        assert!(
            result.is_err(),
            "an ambiguous field or a bad `n` is refused"
        );
        return;
    }
    let req = match result {
        Ok(req) => req,
        Err(e) => panic!("a well-formed form was refused: {e}"),
    };
    let files = form.fields.iter().filter(|f| f.filename.is_some()).count();
    assert_eq!(req.media().files as usize, files, "file parts counted");
    let prompts: Vec<String> = req.prompt_parts().map(|p| p.text.to_owned()).collect();
    assert_eq!(prompts, texts("prompt"), "prompt fields in order");
    if req.route().deployment.is_none() {
        match models.first() {
            Some(m) => assert_eq!(req.model(), Some(m.as_str())),
            None if req.route().path_model.is_none() => {
                let route_default = match req.body_model() {
                    BodyModel::Default(model) => Some(model),
                    _ => None,
                };
                assert_eq!(req.model(), route_default)
            }
            None => {}
        }
    }
    if let Some(n) = ns.last() {
        assert_eq!(req.n(), n.trim().parse().ok());
    }
}

/// Feeds `body` to a scanner in one chunk and in the chunks `cuts` gives (offsets, in any
/// order, out of range ones ignored); the usage found, `[DONE]` and the memory bound must not
/// depend on the chunking.
pub fn check_usage_chunking(mode: ScanMode, max_usage: Option<usize>, body: &[u8], cuts: &[usize]) {
    let scanner = || {
        let s = UsageScanner::new(mode);
        match max_usage {
            Some(max) => s.with_max_usage_bytes(max),
            None => s,
        }
    };
    let mut whole = scanner();
    whole.feed(body);
    whole.finish();

    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    cuts.sort_unstable();
    let mut split = scanner();
    let mut at = 0;
    for cut in cuts.into_iter().chain([body.len()]) {
        split.feed(&body[at..cut]);
        at = cut;
    }
    split.finish();

    let mut bytewise = scanner();
    for b in body {
        bytewise.feed(std::slice::from_ref(b));
    }
    bytewise.finish();

    assert_eq!(
        whole.usage(),
        split.usage(),
        "usage depends on the chunking"
    );
    assert_eq!(
        whole.usage(),
        bytewise.usage(),
        "usage depends on the chunking"
    );
    assert_eq!(whole.saw_done(), split.saw_done());
    assert_eq!(whole.saw_done(), bytewise.saw_done());
    let bound = max_usage.unwrap_or(tower_llm_policy::audit::usage::DEFAULT_MAX_USAGE_BYTES);
    for s in [&whole, &split, &bytewise] {
        assert!(
            s.buffered_high_water() <= bound.max(64),
            "buffered {} over the bound {bound}",
            s.buffered_high_water()
        );
    }
}

/// Resolves `model`: no panic, and resolving the canonical name again gives it back.
pub fn check_model(aliases: &ModelAliases, model: &str) {
    let name = aliases.resolve(model);
    let again = aliases.resolve(&name.canonical);
    assert_eq!(
        again.canonical, name.canonical,
        "the canonical name of {model:?} resolves to another canonical name"
    );
}

/// A JSON object's members in order, duplicates kept.
struct Members(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Applies `edits` to `body`: the output is JSON whose meaning is the input's plus the edits
/// (compared as `serde_json::Value`s); a JSON object the edits can apply to is never refused.
pub fn check_rewrite(body: &[u8], edits: &Edits) {
    let input: Option<Value> = match serde_json::from_slice(body) {
        Ok(v) => Some(v),
        // JSON that serde_json alone refuses (see `check_request_view`): nothing to compare.
        Err(e) if lone_surrogate(body, &e) || e.to_string().starts_with("number out of range") => {
            return;
        }
        Err(_) => None,
    };
    let result = tower_llm_policy::fuzzing::rewrite_apply(body, edits);
    // Every `stream_options` member counts (a duplicate key too, which `Value` drops).
    let appliable = matches!(input, Some(Value::Object(_)))
        && (!edits.include_usage
            || serde_json::from_slice::<Members>(body).is_ok_and(|m| {
                m.0.iter()
                    .filter(|(k, _)| k == "stream_options")
                    .all(|(_, v)| v.is_null() || v.is_object())
            }));
    let out = match result {
        Ok(out) => out,
        Err(e) => {
            assert!(!appliable, "a JSON object was refused: {e}");
            return;
        }
    };
    let Some(mut expected) = input else {
        panic!(
            "the rewriter accepted a body serde_json rejects: {:?}",
            String::from_utf8_lossy(body)
        );
    };
    let got: Value = match serde_json::from_slice(&out) {
        Ok(v) => v,
        Err(e) => panic!(
            "the rewriter wrote invalid JSON ({e}): {:?}",
            String::from_utf8_lossy(&out)
        ),
    };
    let obj = expected
        .as_object_mut()
        .expect("the rewriter accepted a non-object");
    if let Some(limit) = edits.clamp_output {
        for field in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
            if let Some(v) = obj.get_mut(field) {
                if v.as_u64().is_some_and(|v| v > limit) {
                    *v = Value::from(limit);
                }
            }
        }
    }
    if edits.include_usage {
        let so = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(Default::default()));
        if so.is_null() {
            *so = Value::Object(Default::default());
        }
        so.as_object_mut()
            .expect("checked above")
            .insert("include_usage".into(), Value::Bool(true));
    }
    assert_eq!(got, expected, "the rewrite changed more than the edits");
}
