//! The one body rewriter: the changes the layers queue on the [`LlmRequest`], applied once
//! to the body as read.
//!
//! Layers never edit body bytes themselves. A layer that wants a change queues it on the view
//! ([`Edits`]); the changes are applied together, in one pass over the body's top-level
//! members as parsed (not a search of its bytes), and the request goes on with the result.
//! Every member that no edit concerns is copied byte for byte. The fields an edit writes are
//! fields the request parse refuses to see twice (escaped spellings included), so the body
//! that leaves holds each of them once, with the edited value: a client value can never
//! override an injected one, whichever of duplicate keys the upstream would read.
//!
//! [`LlmRequest`]: crate::LlmRequest

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::PolicyError;
use crate::request::{PromptSource, Role};

/// The changes queued for a request's body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Edits {
    /// Every top-level output-token field (`max_tokens`, `max_completion_tokens`,
    /// `max_output_tokens`, realtime's `max_response_output_tokens`) above this value, or
    /// `"inf"`, is set to it.
    pub clamp_output: Option<u64>,
    /// `stream_options.include_usage` is set to `true` (the object is added when absent).
    pub include_usage: bool,
    /// Prompt text was redacted by a content guard (feature `guards`): each string of the
    /// prompt fields that held a match was rewritten with the guard's mask.
    pub redacted: bool,
    /// `user` and `safety_identifier` were replaced by a salted hash of their value (feature
    /// `guards`).
    pub end_user_hashed: bool,
}

/// Rewrites a prompt string: given where it is (its top-level field and the `role` of the
/// message around it), its new text, or `None` to keep it.
pub(crate) type Redactor =
    Arc<dyn Fn(PromptSource, Option<Role>, &str) -> Option<String> + Send + Sync>;

/// The rewrites of string values queued with the [`Edits`]: kept apart because they are
/// functions of the text, applied once and then dropped (see `LlmRequest::reparse`).
#[derive(Clone, Default)]
pub(crate) struct TextEdits {
    /// Rewrites the strings of the prompt fields.
    pub(crate) redact: Option<Redactor>,
    /// The redaction rewrites the strings of every top-level member but `model`, `user`,
    /// `safety_identifier` and `metadata` (bodies whose text the guards read whole).
    pub(crate) everywhere: bool,
    /// The value `user` and `safety_identifier` strings are replaced with.
    pub(crate) end_user: Option<EndUserHash>,
}

/// What an end-user id (`user`, `safety_identifier`) is replaced with.
pub(crate) type EndUserHash = Arc<dyn Fn(&str) -> String + Send + Sync>;

impl TextEdits {
    #[cfg(feature = "guards")]
    pub(crate) fn is_empty(&self) -> bool {
        self.redact.is_none() && self.end_user.is_none()
    }
}

impl fmt::Debug for TextEdits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextEdits")
            .field("redact", &self.redact.is_some())
            .field("end_user", &self.end_user.is_some())
            .finish()
    }
}

/// The prompt source of a top-level field, for the fields whose strings a [`Redactor`] may
/// rewrite (as the request parse reads them).
fn prompt_field(key: &str) -> Option<PromptSource> {
    Some(match key {
        "messages" | "additional_messages" => PromptSource::Message,
        "prompt" => PromptSource::Prompt,
        "input" => PromptSource::Input,
        "instructions" | "additional_instructions" => PromptSource::Instructions,
        "tools" | "functions" => PromptSource::Tools,
        "response_format" | "text" => PromptSource::Schema,
        "suffix" => PromptSource::Suffix,
        "prediction" => PromptSource::Prediction,
        _ => return None,
    })
}

/// Members inside prompt fields whose strings are identifiers or enumerations, never text.
const NOT_TEXT: [&str; 8] = [
    "role",
    "type",
    "id",
    "call_id",
    "tool_call_id",
    "model",
    "status",
    "detail",
];

/// Deepest nesting a [`Redactor`] follows: a value nested deeper is copied as it is (the
/// guards' check of the rewritten request then finds what it still holds). The request parse
/// follows prompt items 8 levels deep.
const MAX_REDACT_DEPTH: u8 = 32;

/// Writes `value` with every string inside it passed through `redact` (objects and arrays
/// are followed; the `role` of the outermost object that has one applies to what is inside
/// it, as the request parse reads it).
fn redact_value(
    out: &mut Vec<u8>,
    value: &RawValue,
    source: PromptSource,
    role: Option<Role>,
    redact: &Redactor,
    depth: u8,
) -> Result<(), PolicyError> {
    let text = value.get().trim_start();
    if depth >= MAX_REDACT_DEPTH {
        out.extend_from_slice(value.get().as_bytes());
        return Ok(());
    }
    match text.as_bytes().first() {
        Some(b'"') => {
            let s: Cow<'_, str> = serde_json::from_str(text).map_err(unwritable)?;
            match redact(source, role, &s) {
                Some(new) => serde_json::to_writer(&mut *out, &new).map_err(unwritable)?,
                None => out.extend_from_slice(value.get().as_bytes()),
            }
        }
        Some(b'{') => {
            let members: Members<'_> = serde_json::from_str(text).map_err(unwritable)?;
            let own_role = members
                .0
                .iter()
                .find(|(k, _)| k == "role")
                .and_then(|(_, v)| serde_json::from_str::<Cow<'_, str>>(v.get()).ok())
                .map(|name| Role::from_name(&name));
            let role = role.or(own_role);
            out.push(b'{');
            for (i, (key, value)) in members.0.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_key(out, key)?;
                if NOT_TEXT.contains(&key.as_ref()) {
                    out.extend_from_slice(value.get().as_bytes());
                } else {
                    redact_value(out, value, source, role, redact, depth + 1)?;
                }
            }
            out.push(b'}');
        }
        Some(b'[') => {
            let items: Vec<&RawValue> = serde_json::from_str(text).map_err(unwritable)?;
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                redact_value(out, item, source, role, redact, depth + 1)?;
            }
            out.push(b']');
        }
        _ => out.extend_from_slice(value.get().as_bytes()),
    }
    Ok(())
}

const OUTPUT_FIELDS: [&str; 4] = [
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "max_response_output_tokens",
];

/// Whether an output-token value as sent is over `limit` (`"inf"`, realtime's "no limit", is).
fn over(value: &RawValue, limit: u64) -> bool {
    let text = value.get();
    text == "\"inf\"" || text.parse::<u64>().is_ok_and(|v| v > limit)
}

/// A JSON object's members in order, each key unescaped and each value as its raw text.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MembersVisitor;

        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    members.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(members))
            }
        }

        d.deserialize_map(MembersVisitor)
    }
}

fn unwritable(e: impl fmt::Display) -> PolicyError {
    PolicyError::InvalidBody {
        message: format!("The request body could not be rewritten: {e}"),
        param: None,
    }
}

/// Writes `key` as a JSON string, then a colon.
fn write_key(out: &mut Vec<u8>, key: &str) -> Result<(), PolicyError> {
    serde_json::to_writer(&mut *out, key).map_err(unwritable)?;
    out.push(b':');
    Ok(())
}

/// `body` (a JSON object) with `edits` applied. See the [module docs](self).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn apply(body: &[u8], edits: &Edits) -> Result<Bytes, PolicyError> {
    apply_with(body, edits, &TextEdits::default())
}

/// [`apply`], with the text rewrites of `text` as well.
pub(crate) fn apply_with(
    body: &[u8],
    edits: &Edits,
    text: &TextEdits,
) -> Result<Bytes, PolicyError> {
    let members: Members<'_> = serde_json::from_slice(body).map_err(unwritable)?;
    let mut out = Vec::with_capacity(body.len() + 48);
    out.push(b'{');
    let mut usage_written = false;
    for (i, (key, value)) in members.0.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_key(&mut out, key)?;
        let key = key.as_ref();
        match edits.clamp_output {
            Some(limit) if OUTPUT_FIELDS.contains(&key) && over(value, limit) => {
                out.extend_from_slice(limit.to_string().as_bytes());
                continue;
            }
            _ => {}
        }
        if edits.include_usage && key == "stream_options" {
            with_include_usage(&mut out, value)?;
            usage_written = true;
            continue;
        }
        if let Some(hash) = &text.end_user {
            if key == "user" || key == "safety_identifier" {
                if let Ok(id) = serde_json::from_str::<Cow<'_, str>>(value.get()) {
                    serde_json::to_writer(&mut out, &hash(&id)).map_err(unwritable)?;
                    continue;
                }
            }
        }
        if let Some(redact) = &text.redact {
            let source = prompt_field(key).or_else(|| {
                (text.everywhere
                    && !matches!(key, "model" | "user" | "safety_identifier" | "metadata"))
                .then_some(PromptSource::Input)
            });
            if let Some(source) = source {
                redact_value(&mut out, value, source, None, redact, 0)?;
                continue;
            }
        }
        out.extend_from_slice(value.get().as_bytes());
    }
    if edits.include_usage && !usage_written {
        if !members.0.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
    }
    out.push(b'}');
    Ok(Bytes::from(out))
}

/// Writes the `stream_options` value with `include_usage` set to `true`: `null` becomes
/// `{"include_usage":true}`; in an object, an `include_usage` member is replaced (and one
/// added when there is none), every other member kept as sent.
fn with_include_usage(out: &mut Vec<u8>, value: &RawValue) -> Result<(), PolicyError> {
    if value.get().trim() == "null" {
        out.extend_from_slice(br#"{"include_usage":true}"#);
        return Ok(());
    }
    let members: Members<'_> = serde_json::from_str(value.get()).map_err(unwritable)?;
    out.push(b'{');
    let mut written = false;
    for (i, (key, value)) in members.0.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_key(out, key)?;
        if key == "include_usage" {
            out.extend_from_slice(b"true");
            written = true;
        } else {
            out.extend_from_slice(value.get().as_bytes());
        }
    }
    if !written {
        if !members.0.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(br#""include_usage":true"#);
    }
    out.push(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(body: &str, edits: Edits) -> String {
        String::from_utf8(apply(body.as_bytes(), &edits).unwrap().to_vec()).unwrap()
    }

    fn usage() -> Edits {
        Edits {
            include_usage: true,
            ..Edits::default()
        }
    }

    #[test]
    fn adds_stream_options_when_absent() {
        assert_eq!(
            run(r#" {"model":"m", "stream":true}"#, usage()),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            run("{ }", usage()),
            r#"{"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn sets_include_usage_in_stream_options() {
        assert_eq!(
            run(
                r#"{"stream_options":{"include_usage":false,"x":[1, 2]},"n":1.50}"#,
                usage()
            ),
            r#"{"stream_options":{"include_usage":true,"x":[1, 2]},"n":1.50}"#
        );
        assert_eq!(
            run(r#"{"stream_options":{"x":1}}"#, usage()),
            r#"{"stream_options":{"x":1,"include_usage":true}}"#
        );
        assert_eq!(
            run(r#"{"stream_options":{}}"#, usage()),
            r#"{"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            run(r#"{"stream_options":null}"#, usage()),
            r#"{"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn escaped_keys_are_edited_as_the_upstream_reads_them() {
        // The member is found by its unescaped name and written once, plainly.
        assert_eq!(
            run(
                r#"{"stream_\u006fptions":{"include_\u0075sage":false},"model":"m"}"#,
                usage()
            ),
            r#"{"stream_options":{"include_usage":true},"model":"m"}"#
        );
        // A string value that mentions the field changes nothing but the field.
        assert_eq!(
            run(r#"{"user":"\"stream_options\"","model":"m"}"#, usage()),
            r#"{"user":"\"stream_options\"","model":"m","stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn clamps_only_top_level_output_fields_over_the_limit() {
        let clamp = Edits {
            clamp_output: Some(100),
            ..Edits::default()
        };
        assert_eq!(
            run(
                r#"{"max_tokens":4096,"max_completion_tokens":50,"max_output_tokens":101,"metadata":{"max_tokens":999}}"#,
                clamp
            ),
            r#"{"max_tokens":100,"max_completion_tokens":50,"max_output_tokens":100,"metadata":{"max_tokens":999}}"#
        );
    }

    #[test]
    fn both_edits_in_one_pass() {
        let both = Edits {
            clamp_output: Some(10),
            include_usage: true,
            ..Edits::default()
        };
        assert_eq!(
            run(r#"{"max_tokens":20,"stream":true}"#, both),
            r#"{"max_tokens":10,"stream":true,"stream_options":{"include_usage":true}}"#
        );
    }

    #[test]
    fn refuses_what_is_not_an_object() {
        assert!(apply(b"[1]", &usage()).is_err());
        assert!(apply(br#"{"stream_options":3}"#, &usage()).is_err());
    }
}
