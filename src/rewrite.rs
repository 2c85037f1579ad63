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

use bytes::Bytes;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::PolicyError;

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
pub(crate) fn apply(body: &[u8], edits: &Edits) -> Result<Bytes, PolicyError> {
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
