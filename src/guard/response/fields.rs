//! Where the model's text is in a response's JSON (a whole body, or one stream event's data):
//! each string with its byte span in the JSON, so that a rewrite replaces only those strings
//! and keeps every other byte.
//!
//! The JSON is read with borrowed [`RawValue`]s (their offsets in the input are their spans);
//! a part of an unexpected shape is skipped, never an error.

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

/// One text stream of a streamed response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum StreamKey {
    /// A chat choice's `delta.content`.
    Content(u64),
    /// A chat choice's `delta.refusal`.
    Refusal(u64),
    /// The arguments of a chat choice's tool call.
    ToolArgs(u64, u64),
    /// The arguments of a chat choice's legacy `function_call`.
    FnArgs(u64),
    /// A completions choice's `text`.
    Text(u64),
    /// A Responses output text (`response.output_text.delta`).
    OutText(u64, u64),
    /// A Responses refusal (`response.refusal.delta`).
    OutRefusal(u64, u64),
    /// A Responses function call's arguments.
    OutArgs(u64),
}

impl StreamKey {
    /// The chat or completions choice the stream belongs to.
    pub(super) fn choice(&self) -> Option<u64> {
        match *self {
            StreamKey::Content(c)
            | StreamKey::Refusal(c)
            | StreamKey::ToolArgs(c, _)
            | StreamKey::FnArgs(c)
            | StreamKey::Text(c) => Some(c),
            _ => None,
        }
    }

    /// The Responses output item the stream belongs to.
    pub(super) fn output(&self) -> Option<u64> {
        match *self {
            StreamKey::OutText(o, _) | StreamKey::OutRefusal(o, _) | StreamKey::OutArgs(o) => {
                Some(o)
            }
            _ => None,
        }
    }
}

/// What a string of the JSON is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// A piece of a text stream (a delta).
    Stream(StreamKey),
    /// A whole text.
    Whole,
    /// A tool's name (checked by firewalls, and read as a whole text).
    ToolName,
}

/// One string of model output in the JSON.
#[derive(Debug)]
pub(super) struct Field<'a> {
    /// The span of the JSON string (quotes included); `None` for a name made from a type.
    pub(super) span: Option<Range<usize>>,
    /// The decoded text.
    pub(super) text: Cow<'a, str>,
    pub(super) role: Role,
}

/// Where a text stream (or a choice, or every stream) ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Finish {
    /// Every stream of this chat or completions choice.
    Choice(u64),
    /// Every stream of this Responses output item.
    Output(u64),
    /// One stream.
    Key(StreamKey),
    /// Every stream.
    All,
}

/// The model output found in one JSON document.
#[derive(Debug, Default)]
pub(super) struct Found<'a> {
    pub(super) fields: Vec<Field<'a>>,
    pub(super) finishes: Vec<Finish>,
    /// Spans of non-null `logprobs` values (they spell the text out token by token): replaced
    /// when the text is rewritten.
    pub(super) logprobs: Vec<(Range<usize>, &'static str)>,
}

struct Reader<'a, 'f> {
    base: &'a str,
    found: &'f mut Found<'a>,
}

type Raw<'a> = Option<&'a RawValue>;

#[derive(Deserialize)]
struct Top<'a> {
    #[serde(borrow, default)]
    choices: Raw<'a>,
    #[serde(borrow, default)]
    output: Raw<'a>,
    #[serde(borrow, default)]
    output_text: Raw<'a>,
    #[serde(borrow, default, rename = "type")]
    kind: Raw<'a>,
    #[serde(borrow, default)]
    delta: Raw<'a>,
    #[serde(borrow, default)]
    text: Raw<'a>,
    #[serde(borrow, default)]
    arguments: Raw<'a>,
    #[serde(borrow, default)]
    refusal: Raw<'a>,
    #[serde(borrow, default)]
    item: Raw<'a>,
    #[serde(borrow, default)]
    part: Raw<'a>,
    #[serde(borrow, default)]
    response: Raw<'a>,
    #[serde(borrow, default)]
    logprobs: Raw<'a>,
    #[serde(default)]
    output_index: Option<u64>,
    #[serde(default)]
    content_index: Option<u64>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(borrow, default)]
    message: Raw<'a>,
    #[serde(borrow, default)]
    delta: Raw<'a>,
    #[serde(borrow, default)]
    text: Raw<'a>,
    #[serde(borrow, default)]
    finish_reason: Raw<'a>,
    #[serde(borrow, default)]
    logprobs: Raw<'a>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    content: Raw<'a>,
    #[serde(borrow, default)]
    refusal: Raw<'a>,
    #[serde(borrow, default)]
    tool_calls: Raw<'a>,
    #[serde(borrow, default)]
    function_call: Raw<'a>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(default)]
    index: Option<u64>,
    #[serde(borrow, default)]
    function: Raw<'a>,
    #[serde(borrow, default)]
    custom: Raw<'a>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(borrow, default)]
    name: Raw<'a>,
    #[serde(borrow, default)]
    arguments: Raw<'a>,
    #[serde(borrow, default)]
    input: Raw<'a>,
}

#[derive(Deserialize)]
struct Item<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Raw<'a>,
    #[serde(borrow, default)]
    name: Raw<'a>,
    #[serde(borrow, default)]
    arguments: Raw<'a>,
    #[serde(borrow, default)]
    input: Raw<'a>,
    #[serde(borrow, default)]
    content: Raw<'a>,
    #[serde(borrow, default)]
    server_label: Raw<'a>,
    #[serde(borrow, default)]
    text: Raw<'a>,
    #[serde(borrow, default)]
    refusal: Raw<'a>,
    #[serde(borrow, default)]
    logprobs: Raw<'a>,
}

#[derive(Deserialize)]
struct ResponseObject<'a> {
    #[serde(borrow, default)]
    output: Raw<'a>,
    #[serde(borrow, default)]
    output_text: Raw<'a>,
}

/// Reads the model output of `json` (a whole body or an event's data). `Err` if it is not
/// JSON at all (an object of an unexpected shape gives nothing).
pub(super) fn read(json: &str) -> Result<Found<'_>, serde_json::Error> {
    let top: Top<'_> = match serde_json::from_str(json) {
        Ok(top) => top,
        Err(e) => {
            // Valid JSON of another shape (an array, a string, an object with a field of an
            // unexpected type) holds no model output we know of.
            return match serde_json::from_str::<serde::de::IgnoredAny>(json) {
                Ok(_) => Ok(Found::default()),
                Err(_) => Err(e),
            };
        }
    };
    let mut found = Found::default();
    let mut r = Reader {
        base: json,
        found: &mut found,
    };
    r.top(&top);
    Ok(found)
}

impl<'a> Reader<'a, '_> {
    fn span(&self, raw: &RawValue) -> Range<usize> {
        let start = (raw.get().as_ptr() as usize).saturating_sub(self.base.as_ptr() as usize);
        start..start + raw.get().len()
    }

    fn string(&mut self, raw: Raw<'a>, role: Role) {
        let Some(raw) = raw else { return };
        let text: Cow<'a, str> = match serde_json::from_str::<&'a str>(raw.get()) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => match serde_json::from_str::<String>(raw.get()) {
                Ok(s) => Cow::Owned(s),
                Err(_) => return,
            },
        };
        let span = Some(self.span(raw));
        self.found.fields.push(Field { span, text, role });
    }

    fn name(&mut self, name: String) {
        self.found.fields.push(Field {
            span: None,
            text: Cow::Owned(name),
            role: Role::ToolName,
        });
    }

    fn logprobs(&mut self, raw: Raw<'a>, empty: &'static str) {
        if let Some(raw) = raw {
            self.found.logprobs.push((self.span(raw), empty));
        }
    }

    fn parse<T: Deserialize<'a>>(raw: Raw<'a>) -> Option<T> {
        raw.and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    fn list(raw: Raw<'a>) -> Vec<&'a RawValue> {
        Self::parse::<Vec<&'a RawValue>>(raw).unwrap_or_default()
    }

    fn str_of(raw: Raw<'a>) -> Option<Cow<'a, str>> {
        Self::parse::<Cow<'a, str>>(raw)
    }

    fn top(&mut self, top: &Top<'a>) {
        for (n, choice) in Self::list(top.choices).into_iter().enumerate() {
            if let Some(choice) = Self::parse::<Choice<'a>>(Some(choice)) {
                self.choice(&choice, n as u64);
            }
        }
        for item in Self::list(top.output) {
            self.item(item, None);
        }
        self.string(top.output_text, Role::Whole);
        let Some(kind) = Self::str_of(top.kind) else {
            return;
        };
        let (o, c) = (
            top.output_index.unwrap_or(0),
            top.content_index.unwrap_or(0),
        );
        match &*kind {
            "response.output_text.delta" => {
                self.string(top.delta, Role::Stream(StreamKey::OutText(o, c)));
                self.logprobs(top.logprobs, "[]");
            }
            "response.refusal.delta" => {
                self.string(top.delta, Role::Stream(StreamKey::OutRefusal(o, c)))
            }
            "response.function_call_arguments.delta" => {
                self.string(top.delta, Role::Stream(StreamKey::OutArgs(o)))
            }
            "response.output_text.done" => {
                self.string(top.text, Role::Whole);
                self.logprobs(top.logprobs, "[]");
                self.found
                    .finishes
                    .push(Finish::Key(StreamKey::OutText(o, c)));
            }
            "response.refusal.done" => {
                self.string(top.refusal, Role::Whole);
                self.found
                    .finishes
                    .push(Finish::Key(StreamKey::OutRefusal(o, c)));
            }
            "response.function_call_arguments.done" => {
                self.string(top.arguments, Role::Whole);
                self.found.finishes.push(Finish::Key(StreamKey::OutArgs(o)));
            }
            "response.content_part.added" | "response.content_part.done" => {
                if let Some(part) = top.part {
                    self.part(part);
                }
            }
            "response.output_item.added" | "response.output_item.done" => {
                if let Some(item) = top.item {
                    self.item(item, Some(o));
                }
            }
            _ => {
                if let Some(response) = Self::parse::<ResponseObject<'a>>(top.response) {
                    for item in Self::list(response.output) {
                        self.item(item, None);
                    }
                    self.string(response.output_text, Role::Whole);
                }
            }
        }
        if matches!(
            &*kind,
            "response.completed" | "response.incomplete" | "response.failed"
        ) {
            self.found.finishes.push(Finish::All);
        } else if kind.ends_with(".done") {
            self.found.finishes.push(Finish::Output(o));
        }
    }

    fn choice(&mut self, choice: &Choice<'a>, n: u64) {
        let i = choice.index.unwrap_or(n);
        if let Some(message) = Self::parse::<Message<'a>>(choice.message) {
            self.message(&message, None);
        }
        if let Some(delta) = Self::parse::<Message<'a>>(choice.delta) {
            self.message(&delta, Some(i));
        }
        let role = if choice.delta.is_some() || choice.message.is_none() {
            // A completions choice: streamed when the body is a stream (the caller knows).
            Role::Stream(StreamKey::Text(i))
        } else {
            Role::Whole
        };
        self.string(choice.text, role);
        self.logprobs(choice.logprobs, "null");
        if choice.finish_reason.is_some() {
            self.found.finishes.push(Finish::Choice(i));
        }
    }

    /// A chat message (`delta` of choice `streamed`, or a whole message).
    fn message(&mut self, m: &Message<'a>, streamed: Option<u64>) {
        let role = |key: StreamKey| streamed.map_or(Role::Whole, |_| Role::Stream(key));
        let i = streamed.unwrap_or(0);
        match m.content {
            Some(raw) if raw.get().starts_with('"') => {
                self.string(Some(raw), role(StreamKey::Content(i)))
            }
            content => {
                for part in Self::list(content) {
                    self.part(part);
                }
            }
        }
        self.string(m.refusal, role(StreamKey::Refusal(i)));
        for (n, call) in Self::list(m.tool_calls).into_iter().enumerate() {
            let Some(call) = Self::parse::<ToolCall<'a>>(Some(call)) else {
                continue;
            };
            let k = call.index.unwrap_or(n as u64);
            for function in [call.function, call.custom] {
                if let Some(f) = Self::parse::<Function<'a>>(function) {
                    self.string(f.name, Role::ToolName);
                    self.string(f.arguments, role(StreamKey::ToolArgs(i, k)));
                    self.string(f.input, role(StreamKey::ToolArgs(i, k)));
                }
            }
        }
        if let Some(f) = Self::parse::<Function<'a>>(m.function_call) {
            self.string(f.name, Role::ToolName);
            self.string(f.arguments, role(StreamKey::FnArgs(i)));
        }
    }

    /// A content part (`{"type":"text"|"output_text","text":..}`, a refusal part).
    fn part(&mut self, raw: &'a RawValue) {
        if let Some(part) = Self::parse::<Item<'a>>(Some(raw)) {
            self.string(part.text, Role::Whole);
            self.string(part.refusal, Role::Whole);
            self.logprobs(part.logprobs.filter(|l| l.get() != "[]"), "[]");
        }
    }

    /// A Responses output item.
    fn item(&mut self, raw: &'a RawValue, _output: Option<u64>) {
        let Some(item) = Self::parse::<Item<'a>>(Some(raw)) else {
            return;
        };
        let kind = Self::str_of(item.kind).unwrap_or_default();
        match &*kind {
            "message" => {
                for part in Self::list(item.content) {
                    self.part(part);
                }
            }
            "function_call" | "custom_tool_call" => {
                self.string(item.name, Role::ToolName);
                self.string(item.arguments, Role::Whole);
                self.string(item.input, Role::Whole);
            }
            "mcp_call" | "mcp_approval_request" => {
                let label = Self::str_of(item.server_label).unwrap_or_default();
                self.name(format!("mcp:{label}"));
                self.string(item.arguments, Role::Whole);
            }
            "computer_call" => self.name("computer_use_preview".to_owned()),
            other => {
                if let Some(tool) = other.strip_suffix("_call") {
                    self.name(tool.to_owned());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(json: &str) -> Vec<(String, Role, String)> {
        read(json)
            .unwrap()
            .fields
            .into_iter()
            .map(|f| {
                let raw = f.span.map(|s| json[s].to_owned()).unwrap_or_default();
                (f.text.into_owned(), f.role, raw)
            })
            .collect()
    }

    #[test]
    fn chat_message_fields_with_spans() {
        let json = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"hi \u0073ecret","tool_calls":[{"id":"c","type":"function","function":{"name":"rm","arguments":"{\"a\":1}"}}]},"finish_reason":"stop"}]}"#;
        let t = texts(json);
        assert_eq!(
            t[0],
            (
                "hi secret".into(),
                Role::Whole,
                r#""hi \u0073ecret""#.into()
            )
        );
        assert_eq!(t[1].0, "rm");
        assert_eq!(t[1].1, Role::ToolName);
        assert_eq!(t[2].0, r#"{"a":1}"#);
    }

    #[test]
    fn stream_keys_of_chat_completions_and_responses() {
        let t = texts(r#"{"choices":[{"index":2,"delta":{"content":"x"},"finish_reason":null}]}"#);
        assert_eq!(t[0].1, Role::Stream(StreamKey::Content(2)));
        let t = texts(r#"{"choices":[{"index":0,"text":"x","finish_reason":null}]}"#);
        assert_eq!(t[0].1, Role::Stream(StreamKey::Text(0)));
        let t = texts(
            r#"{"choices":[{"index":1,"delta":{"tool_calls":[{"index":3,"function":{"arguments":"{"}}]}}]}"#,
        );
        assert_eq!(t[0].1, Role::Stream(StreamKey::ToolArgs(1, 3)));
        let t = texts(
            r#"{"type":"response.output_text.delta","output_index":1,"content_index":0,"delta":"x"}"#,
        );
        assert_eq!(t[0].1, Role::Stream(StreamKey::OutText(1, 0)));
        let f = read(r#"{"type":"response.output_item.added","output_index":0,"item":{"type":"web_search_call"}}"#).unwrap();
        assert_eq!(f.fields[0].text, "web_search");
        let f = read(r#"{"type":"response.output_item.added","output_index":0,"item":{"type":"mcp_call","server_label":"gh","name":"x"}}"#).unwrap();
        assert_eq!(f.fields[0].text, "mcp:gh");
    }

    #[test]
    fn other_shapes_give_nothing_and_non_json_is_an_error() {
        assert!(read("[1,2]").unwrap().fields.is_empty());
        assert!(read(r#"{"choices":"x"}"#).unwrap().fields.is_empty());
        assert!(read("{").is_err());
    }
}
