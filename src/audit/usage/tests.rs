//! The usage scanner (JSON and SSE bodies) and the usage-only chunk stripper, fed the way a
//! body wrapper feeds them: chunk by chunk, split anywhere.

use super::{ScanMode, UsageChunkStripper, UsageScanner};
use crate::audit::pricing::Usage;
use bytes::Bytes;

// ---- fixtures -------------------------------------------------------------------------------

const CHAT_COMPLETION: &str = r#"{
  "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
  "object": "chat.completion",
  "created": 1741570283,
  "model": "gpt-4o-2024-08-06",
  "choices": [
    {
      "index": 0,
      "message": {
        "role": "assistant",
        "content": "The image shows a wooden boardwalk. Escaped: \" \\ \u00e9 and a fake {\"usage\": {\"prompt_tokens\": 1}}",
        "refusal": null,
        "annotations": []
      },
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 1117,
    "completion_tokens": 46,
    "total_tokens": 1163,
    "prompt_tokens_details": { "cached_tokens": 1024, "audio_tokens": 0 },
    "completion_tokens_details": {
      "reasoning_tokens": 0,
      "audio_tokens": 0,
      "accepted_prediction_tokens": 0,
      "rejected_prediction_tokens": 0
    }
  },
  "service_tier": "default",
  "system_fingerprint": "fp_fc9f1d7035"
}"#;

fn chat_completion_usage() -> Usage {
    Usage {
        prompt_tokens: 1117,
        completion_tokens: 46,
        total_tokens: 1163,
        cached_tokens: Some(1024),
        reasoning_tokens: Some(0),
    }
}

const CONTENT_CHUNK: &str = "data: {\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_eb9dce56a8\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello \\\"usage\\\": {} \"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n";

const FINISH_CHUNK: &str = "data: {\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\n";

const USAGE_CHUNK: &str = "data: {\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_eb9dce56a8\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29,\"prompt_tokens_details\":{\"cached_tokens\":3,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":2,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}\n\n";

const DONE: &str = "data: [DONE]\n\n";

fn stream_usage() -> Usage {
    Usage {
        prompt_tokens: 19,
        completion_tokens: 10,
        total_tokens: 29,
        cached_tokens: Some(3),
        reasoning_tokens: Some(2),
    }
}

fn chat_stream() -> String {
    [
        CONTENT_CHUNK,
        CONTENT_CHUNK,
        FINISH_CHUNK,
        USAGE_CHUNK,
        DONE,
    ]
    .concat()
}

fn chat_stream_without_usage_chunk() -> String {
    [CONTENT_CHUNK, CONTENT_CHUNK, FINISH_CHUNK, DONE].concat()
}

const RESPONSES_STREAM: &str = concat!(
    "event: response.created\n",
    "data: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_67c9\",\"object\":\"response\",\"created_at\":1741290958,\"status\":\"in_progress\",\"error\":null,\"model\":\"o4-mini-2025-04-16\",\"output\":[],\"usage\":null,\"metadata\":{}}}\n",
    "\n",
    "event: response.output_text.delta\n",
    "data: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_67c9\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hi\"}\n",
    "\n",
    ": keep-alive comment\n",
    "\n",
    "event: response.completed\n",
    "data: {\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{\"id\":\"resp_67c9\",\"object\":\"response\",\"status\":\"completed\",\"output\":[{\"id\":\"msg_67c9\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi \\\"usage\\\": {\\\"input_tokens\\\": 999}\",\"annotations\":[]}]}],\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":12},\"output_tokens\":11,\"output_tokens_details\":{\"reasoning_tokens\":4},\"total_tokens\":48},\"user\":null,\"metadata\":{\"usage\":{\"input_tokens\":1}}}}\n",
    "\n",
);

fn responses_usage() -> Usage {
    Usage {
        prompt_tokens: 37,
        completion_tokens: 11,
        total_tokens: 48,
        cached_tokens: Some(12),
        reasoning_tokens: Some(4),
    }
}

// ---- helpers --------------------------------------------------------------------------------

fn scan(mode: ScanMode, chunks: &[&[u8]]) -> UsageScanner {
    let mut scanner = UsageScanner::new(mode);
    for chunk in chunks {
        scanner.feed(chunk);
    }
    scanner.finish();
    scanner
}

fn scan_whole(mode: ScanMode, body: &str) -> Option<Usage> {
    scan(mode, &[body.as_bytes()]).usage().cloned()
}

fn scan_bytewise(mode: ScanMode, body: &str) -> Option<Usage> {
    let chunks: Vec<&[u8]> = body.as_bytes().chunks(1).collect();
    scan(mode, &chunks).usage().cloned()
}

/// The scanner's result for `body` split in two at every position, checked against `expected`.
fn assert_every_split(mode: ScanMode, body: &str, expected: Option<&Usage>) {
    let b = body.as_bytes();
    for k in 0..=b.len() {
        let scanner = scan(mode, &[&b[..k], &b[k..]]);
        assert_eq!(scanner.usage(), expected, "split at {k}");
    }
}

fn strip(chunks: &[&[u8]]) -> (Vec<u8>, UsageChunkStripper) {
    let mut stripper = UsageChunkStripper::new();
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(&stripper.push(Bytes::copy_from_slice(chunk)));
    }
    out.extend_from_slice(&stripper.finish());
    (out, stripper)
}

fn crlf(s: &str) -> String {
    s.replace('\n', "\r\n")
}

// ---- JSON bodies ----------------------------------------------------------------------------

#[test]
fn json_usage_of_a_chat_completion() {
    assert_eq!(
        scan_whole(ScanMode::Json, CHAT_COMPLETION),
        Some(chat_completion_usage())
    );
}

#[test]
fn json_fed_one_byte_at_a_time_gives_the_same_usage() {
    assert_eq!(
        scan_bytewise(ScanMode::Json, CHAT_COMPLETION),
        scan_whole(ScanMode::Json, CHAT_COMPLETION)
    );
    assert_eq!(
        scan_bytewise(ScanMode::Json, CHAT_COMPLETION),
        Some(chat_completion_usage())
    );
}

#[test]
fn json_split_anywhere_gives_the_same_usage() {
    assert_every_split(
        ScanMode::Json,
        CHAT_COMPLETION,
        Some(&chat_completion_usage()),
    );
}

#[test]
fn json_usage_not_at_top_level_is_not_taken() {
    let body = r#"{
        "choices": [{"message": {"content": "\"usage\": {\"prompt_tokens\": 5, \"total_tokens\": 5}",
                                 "usage": {"prompt_tokens": 6, "total_tokens": 6}}}],
        "metadata": {"usage": {"prompt_tokens": 7, "total_tokens": 7}},
        "note": "usage",
        "list": [{"usage": {"prompt_tokens": 8, "total_tokens": 8}}]
    }"#;
    assert_eq!(scan_whole(ScanMode::Json, body), None);
    assert_eq!(scan_bytewise(ScanMode::Json, body), None);

    let with_top = body.replacen(
        '{',
        r#"{"usage": {"prompt_tokens": 1, "total_tokens": 1},"#,
        1,
    );
    let expected = Usage {
        prompt_tokens: 1,
        total_tokens: 1,
        ..Usage::default()
    };
    assert_eq!(
        scan_whole(ScanMode::Json, &with_top),
        Some(expected.clone())
    );
    assert_eq!(scan_bytewise(ScanMode::Json, &with_top), Some(expected));
}

#[test]
fn json_usage_value_that_is_a_string_is_not_taken() {
    assert_eq!(
        scan_whole(ScanMode::Json, r#"{"usage": "prompt_tokens"}"#),
        None
    );
    assert_eq!(
        scan_whole(ScanMode::Json, r#"{"usage": null, "x": 1}"#),
        None
    );
    assert_eq!(scan_whole(ScanMode::Json, r#"{"usage": {}}"#), None);
}

#[test]
fn json_embeddings_usage() {
    let body = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023,-0.0093,0.0158]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
    let expected = Usage {
        prompt_tokens: 8,
        total_tokens: 8,
        ..Usage::default()
    };
    assert_eq!(scan_whole(ScanMode::Json, body), Some(expected.clone()));
    assert_eq!(scan_bytewise(ScanMode::Json, body), Some(expected));
}

#[test]
fn json_responses_api_usage() {
    let body = r#"{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":37,"input_tokens_details":{"cached_tokens":12},"output_tokens":11,"output_tokens_details":{"reasoning_tokens":4},"total_tokens":48}}"#;
    assert_eq!(scan_whole(ScanMode::Json, body), Some(responses_usage()));
}

#[test]
fn json_response_usage_nested_in_response_is_only_read_from_streams() {
    let body = r#"{"type":"response.completed","response":{"usage":{"input_tokens":1,"output_tokens":1}}}"#;
    assert_eq!(scan_whole(ScanMode::Json, body), None);
}

#[test]
fn json_without_usage_or_not_an_object() {
    for body in [
        "{}",
        "[]",
        r#"[{"usage":{"prompt_tokens":1}}]"#,
        "\"usage\"",
        "42",
        "",
        "{",
    ] {
        assert_eq!(scan_whole(ScanMode::Json, body), None, "{body}");
    }
}

#[test]
fn json_malformed_input_does_not_panic() {
    let inputs: [&[u8]; 8] = [
        b"}}}]]]{{{",
        b"{\"usage\":{\"prompt_tokens\":",
        b"{\"usage\"::,,}",
        b"{\"usage\":{\"prompt_tokens\":-5,\"total_tokens\":1e400}}",
        b"{\"a\":\"\\",
        b"\xff\xfe{\"usage\":\xff}",
        b"{\"usage\":[1,2,3]}",
        b"{\"usage\":{\"prompt_tokens\":\"12\"}}",
    ];
    for input in inputs {
        let _ = scan(ScanMode::Json, &[input]).usage();
        let _ = scan(ScanMode::Sse, &[b"data: ", input, b"\n\n"]).usage();
    }
}

#[test]
fn json_float_token_counts_are_accepted() {
    let body = r#"{"usage":{"prompt_tokens":12.0,"completion_tokens":3,"total_tokens":15}}"#;
    let u = scan_whole(ScanMode::Json, body).unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (12, 3, 15)
    );
}

#[test]
fn json_missing_total_is_prompt_plus_completion() {
    let body = r#"{"usage":{"prompt_tokens":12,"completion_tokens":3}}"#;
    assert_eq!(scan_whole(ScanMode::Json, body).unwrap().total_tokens, 15);
}

#[test]
fn json_usage_over_the_bound_is_skipped() {
    let mut scanner = UsageScanner::new(ScanMode::Json).with_max_usage_bytes(32);
    scanner.feed(CHAT_COMPLETION.as_bytes());
    scanner.finish();
    assert_eq!(scanner.usage(), None);
    assert!(scanner.buffered_high_water() <= 32);
}

/// A chunk source that generates `size` bytes cycling over `pattern`, in chunks of `chunk`.
fn cycled(pattern: &[u8], size: usize, chunk: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= size {
            return None;
        }
        let n = chunk.min(size - pos);
        let out = (pos..pos + n).map(|p| pattern[p % pattern.len()]).collect();
        pos += n;
        Some(out)
    })
}

#[test]
fn huge_json_body_keeps_memory_bounded() {
    let mut scanner = UsageScanner::new(ScanMode::Json);
    scanner.feed(br#"{"id":"x","choices":[{"message":{"content":""#);
    // 50 MB of string content, with escapes and braces that must not confuse the scanner.
    let pattern = br#"lorem \"usage\": {\"prompt_tokens\": 1} [ipsum] \\ "#;
    for chunk in cycled(pattern, 50 << 20, 8 << 10) {
        scanner.feed(&chunk);
    }
    scanner.feed(br#""}}],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#);
    scanner.finish();
    assert_eq!(
        scanner.usage(),
        Some(&Usage {
            prompt_tokens: 7,
            completion_tokens: 5,
            total_tokens: 12,
            ..Usage::default()
        })
    );
    assert!(
        scanner.buffered_high_water() <= 1024,
        "{}",
        scanner.buffered_high_water()
    );
}

// ---- SSE streams ----------------------------------------------------------------------------

#[test]
fn sse_chat_stream_with_usage_chunk() {
    let stream = chat_stream();
    let scanner = scan(ScanMode::Sse, &[stream.as_bytes()]);
    assert_eq!(scanner.usage(), Some(&stream_usage()));
    assert!(scanner.saw_done());
}

#[test]
fn sse_chat_stream_fed_one_byte_at_a_time() {
    assert_eq!(
        scan_bytewise(ScanMode::Sse, &chat_stream()),
        Some(stream_usage())
    );
    assert_eq!(
        scan_bytewise(ScanMode::Sse, &crlf(&chat_stream())),
        Some(stream_usage())
    );
}

#[test]
fn sse_split_anywhere_gives_the_same_usage() {
    assert_every_split(ScanMode::Sse, &chat_stream(), Some(&stream_usage()));
    assert_every_split(ScanMode::Sse, &crlf(&chat_stream()), Some(&stream_usage()));
    assert_every_split(
        ScanMode::Sse,
        &chat_stream().replace('\n', "\r"),
        Some(&stream_usage()),
    );
    assert_every_split(ScanMode::Sse, RESPONSES_STREAM, Some(&responses_usage()));
}

#[test]
fn sse_responses_api_stream() {
    let scanner = scan(ScanMode::Sse, &[RESPONSES_STREAM.as_bytes()]);
    assert_eq!(scanner.usage(), Some(&responses_usage()));
    assert!(!scanner.saw_done());
    assert_eq!(
        scan_bytewise(ScanMode::Sse, &crlf(RESPONSES_STREAM)),
        Some(responses_usage())
    );
}

#[test]
fn sse_responses_incomplete_and_failed_carry_usage_too() {
    for kind in ["response.incomplete", "response.failed"] {
        let stream = format!(
            "event: {kind}\ndata: {{\"type\":\"{kind}\",\"response\":{{\"status\":\"x\",\"usage\":{{\"input_tokens\":5,\"output_tokens\":2,\"total_tokens\":7}}}}}}\n\n"
        );
        let u = scan_whole(ScanMode::Sse, &stream).unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.total_tokens),
            (5, 2, 7),
            "{kind}"
        );
    }
}

#[test]
fn sse_stream_without_usage() {
    let stream = chat_stream_without_usage_chunk();
    let scanner = scan(ScanMode::Sse, &[stream.as_bytes()]);
    assert_eq!(scanner.usage(), None);
    assert!(scanner.saw_done());
    assert_eq!(scan_whole(ScanMode::Sse, ""), None);
}

#[test]
fn sse_usage_on_the_last_content_chunk_is_taken() {
    let last = FINISH_CHUNK.replace(
        "\"usage\":null",
        "\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2,\"total_tokens\":6}",
    );
    let stream = [CONTENT_CHUNK, &last, DONE].concat();
    let u = scan_whole(ScanMode::Sse, &stream).unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (4, 2, 6)
    );
}

#[test]
fn sse_data_split_over_lines_comments_and_other_fields() {
    let stream = ": ping\n\nid: 1\nevent: message\nretry: 100\ndata: {\"choices\":[],\ndata:\"usage\":{\"prompt_tokens\":3,\ndata:  \"total_tokens\":3}}\n\n";
    let expected = Usage {
        prompt_tokens: 3,
        total_tokens: 3,
        ..Usage::default()
    };
    assert_eq!(scan_whole(ScanMode::Sse, stream), Some(expected.clone()));
    assert_every_split(ScanMode::Sse, stream, Some(&expected));
}

#[test]
fn sse_last_event_without_blank_line_is_read_at_finish() {
    let stream = USAGE_CHUNK.trim_end();
    assert_eq!(scan_whole(ScanMode::Sse, stream), Some(stream_usage()));
}

#[test]
fn sse_broken_event_does_not_stop_the_scanner() {
    let stream = [
        "data: {\"usage\":{\"prompt_tokens\":\n\n",
        "data: \"unterminated\n\n",
        USAGE_CHUNK,
    ]
    .concat();
    assert_eq!(scan_whole(ScanMode::Sse, &stream), Some(stream_usage()));
}

#[test]
fn sse_done_is_recognised_without_the_space() {
    let scanner = scan(ScanMode::Sse, &[b"data:[DONE]\n\n"]);
    assert!(scanner.saw_done());
    assert_eq!(scanner.usage(), None);
}

#[test]
fn huge_sse_stream_keeps_memory_bounded() {
    let mut scanner = UsageScanner::new(ScanMode::Sse);
    let events = (50 << 20) / CONTENT_CHUNK.len();
    for chunk in cycled(
        CONTENT_CHUNK.as_bytes(),
        events * CONTENT_CHUNK.len(),
        8 << 10,
    ) {
        scanner.feed(&chunk);
    }
    let tail = [FINISH_CHUNK, USAGE_CHUNK, DONE].concat();
    let (a, b) = tail.as_bytes().split_at(FINISH_CHUNK.len() + 100);
    scanner.feed(a);
    scanner.feed(b);
    scanner.finish();
    assert_eq!(scanner.usage(), Some(&stream_usage()));
    assert!(scanner.saw_done());
    assert!(
        scanner.buffered_high_water() <= 1024,
        "{}",
        scanner.buffered_high_water()
    );
}

#[test]
fn one_huge_event_is_still_read_in_bounded_memory() {
    // A response.completed whose output holds 8 MB of text: usage comes after it.
    let mut scanner = UsageScanner::new(ScanMode::Sse);
    scanner.feed(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"output\":[{\"content\":[{\"text\":\"");
    for chunk in cycled(b"0123456789 \\\"{[", 8 << 20, 8 << 10) {
        scanner.feed(&chunk);
    }
    scanner.feed(b"\"}]}],\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":12},\"output_tokens\":11,\"output_tokens_details\":{\"reasoning_tokens\":4},\"total_tokens\":48}}}\n\n");
    scanner.finish();
    assert_eq!(scanner.usage(), Some(&responses_usage()));
    assert!(
        scanner.buffered_high_water() <= 1024,
        "{}",
        scanner.buffered_high_water()
    );
}

#[test]
fn scan_mode_from_content_type() {
    assert_eq!(
        ScanMode::from_content_type("text/event-stream"),
        Some(ScanMode::Sse)
    );
    assert_eq!(
        ScanMode::from_content_type("text/event-stream; charset=utf-8"),
        Some(ScanMode::Sse)
    );
    assert_eq!(
        ScanMode::from_content_type("application/json"),
        Some(ScanMode::Json)
    );
    assert_eq!(
        ScanMode::from_content_type("Application/JSON; charset=utf-8"),
        Some(ScanMode::Json)
    );
    assert_eq!(
        ScanMode::from_content_type("application/problem+json"),
        Some(ScanMode::Json)
    );
    assert_eq!(ScanMode::from_content_type("audio/mpeg"), None);
    assert_eq!(ScanMode::from_content_type(""), None);
    assert_eq!(ScanMode::from_content_type("é"), None);
}

// ---- stripper -------------------------------------------------------------------------------

#[test]
fn stripper_removes_the_usage_only_chunk() {
    let (out, stripper) = strip(&[chat_stream().as_bytes()]);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        chat_stream_without_usage_chunk()
    );
    assert_eq!(stripper.removed(), 1);
}

#[test]
fn stripper_at_every_split_point() {
    for (stream, expected) in [
        (chat_stream(), chat_stream_without_usage_chunk()),
        (
            crlf(&chat_stream()),
            crlf(&chat_stream_without_usage_chunk()),
        ),
        (
            chat_stream().replace('\n', "\r"),
            chat_stream_without_usage_chunk().replace('\n', "\r"),
        ),
    ] {
        let b = stream.as_bytes();
        for k in 0..=b.len() {
            let (out, stripper) = strip(&[&b[..k], &b[k..]]);
            assert_eq!(out, expected.as_bytes(), "split at {k}");
            assert_eq!(stripper.removed(), 1, "split at {k}");
        }
    }
}

#[test]
fn stripper_at_every_pair_of_split_points_around_the_usage_chunk() {
    // Short events, so that the number of (i, j) pairs stays small.
    let content = "data: {\"choices\":[{\"delta\":{}}],\"usage\":null}\n\n";
    let usage = "data: {\"choices\":[],\"usage\":{\"total_tokens\":1}}\n\n";
    let stream = crlf(&[content, usage, DONE].concat());
    let expected = crlf(&[content, DONE].concat());
    let b = stream.as_bytes();
    for i in 0..=b.len() {
        for j in i..=b.len() {
            let (out, _) = strip(&[&b[..i], &b[i..j], &b[j..]]);
            assert_eq!(out, expected.as_bytes(), "split at {i}, {j}");
        }
    }
}

#[test]
fn stripper_fed_one_byte_at_a_time() {
    let stream = chat_stream();
    let chunks: Vec<&[u8]> = stream.as_bytes().chunks(1).collect();
    let (out, stripper) = strip(&chunks);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        chat_stream_without_usage_chunk()
    );
    assert!(stripper.buffered_high_water() <= 1024);
}

#[test]
fn stripper_passes_done_and_other_events_through() {
    let stream = [
        ": keep-alive\n\n",
        "event: x\ndata: {\"a\":1}\n\n",
        "data:\n\n",
        "\n\n",
        DONE,
    ]
    .concat();
    let (out, stripper) = strip(&[stream.as_bytes()]);
    assert_eq!(String::from_utf8(out).unwrap(), stream);
    assert_eq!(stripper.removed(), 0);
}

#[test]
fn stripper_keeps_usage_carried_on_a_content_chunk() {
    let last = FINISH_CHUNK.replace(
        "\"usage\":null",
        "\"usage\":{\"prompt_tokens\":4,\"total_tokens\":4}",
    );
    let stream = [CONTENT_CHUNK, &last, DONE].concat();
    let (out, _) = strip(&[stream.as_bytes()]);
    assert_eq!(String::from_utf8(out).unwrap(), stream);
}

#[test]
fn stripper_keeps_empty_choices_without_usage() {
    let stream = "data: {\"choices\":[],\"usage\":null}\n\ndata: {\"choices\":[]}\n\n";
    let (out, _) = strip(&[stream.as_bytes()]);
    assert_eq!(String::from_utf8(out).unwrap(), stream);
}

#[test]
fn stripper_releases_an_incomplete_event_as_soon_as_it_cannot_be_usage_only() {
    let mut stripper = UsageChunkStripper::new();
    let out = stripper.push(Bytes::from_static(
        b"data: {\"id\":\"x\",\"choices\":[{\"delta\"",
    ));
    assert_eq!(&out[..], b"data: {\"id\":\"x\",\"choices\":[{\"delta\"");
    assert_eq!(stripper.held(), 0);
    let out = stripper.push(Bytes::from_static(b":{}}]}\n\n"));
    assert_eq!(&out[..], b":{}}]}\n\n");

    let out = stripper.push(Bytes::from_static(b"data: {\"usage\":nu"));
    assert_eq!(&out[..], b"data: {\"usage\":nu");
    let out = stripper.push(Bytes::from_static(b"ll}\n\n"));
    assert_eq!(&out[..], b"ll}\n\n");

    // Data that is not a JSON object is released at once too.
    let out = stripper.push(Bytes::from_static(b"data: [DO"));
    assert_eq!(&out[..], b"data: [DO");

    // A complete JSON object that is not usage-only is released before its blank line.
    let out = stripper.push(Bytes::from_static(b"NE]\n\ndata: {\"choices\":[]}"));
    assert_eq!(&out[..], b"NE]\n\ndata: {\"choices\":[]}");
    let out = stripper.push(Bytes::from_static(b"\n\n"));
    assert_eq!(&out[..], b"\n\n");

    // Comment lines alone prove nothing yet: a data line may follow in the same event.
    let out = stripper.push(Bytes::from_static(b": ping\n"));
    assert!(out.is_empty());
    assert_eq!(stripper.held(), ": ping\n".len());
    assert_eq!(&stripper.finish()[..], b": ping\n");
}

#[test]
fn stripper_holds_only_a_possible_usage_only_event() {
    let mut stripper = UsageChunkStripper::new();
    let out = stripper.push(Bytes::from(format!(
        "{CONTENT_CHUNK}data: {{\"choices\":[],"
    )));
    assert_eq!(&out[..], CONTENT_CHUNK.as_bytes());
    assert_eq!(stripper.held(), "data: {\"choices\":[],".len());
    let out = stripper.push(Bytes::from_static(
        b"\"usage\":{\"total_tokens\":1}}\n\ndata: [DONE]\n\n",
    ));
    assert_eq!(&out[..], DONE.as_bytes());
    assert_eq!(stripper.held(), 0);
    assert_eq!(stripper.removed(), 1);
}

#[test]
fn stripper_releases_events_longer_than_the_window() {
    let mut stripper = UsageChunkStripper::new().with_window(64);
    let mut out = Vec::new();
    let b = USAGE_CHUNK.as_bytes();
    for chunk in b.chunks(16) {
        out.extend_from_slice(&stripper.push(Bytes::copy_from_slice(chunk)));
        assert!(stripper.held() <= 64);
    }
    out.extend_from_slice(&stripper.finish());
    assert_eq!(out, b);
    assert_eq!(stripper.removed(), 0);
    assert!(stripper.buffered_high_water() <= 128);
}

#[test]
fn stripper_finish_releases_an_unfinished_event() {
    let mut stripper = UsageChunkStripper::new();
    assert!(stripper
        .push(Bytes::from_static(b"data: {\"choices\":[],\"usa"))
        .is_empty());
    assert_eq!(&stripper.finish()[..], b"data: {\"choices\":[],\"usa");
}

#[test]
fn stripper_finish_removes_a_complete_usage_only_chunk_without_blank_line() {
    let mut stripper = UsageChunkStripper::new();
    let stream = [FINISH_CHUNK, USAGE_CHUNK.trim_end()].concat();
    let out = stripper.push(Bytes::from(stream));
    assert_eq!(&out[..], FINISH_CHUNK.as_bytes());
    assert!(stripper.finish().is_empty());
    assert_eq!(stripper.removed(), 1);
}

#[test]
fn stripper_passes_whole_events_without_copying() {
    let mut stripper = UsageChunkStripper::new();
    let chunk = Bytes::from([CONTENT_CHUNK, FINISH_CHUNK].concat());
    let out = stripper.push(chunk.clone());
    assert_eq!(out, chunk);
    assert_eq!(out.as_ptr(), chunk.as_ptr());

    // A chunk that ends inside a content event is still passed on as one slice.
    let chunk = Bytes::from(format!("{CONTENT_CHUNK}data: {{\"choices\":[{{"));
    let out = stripper.push(chunk.clone());
    assert_eq!(out.as_ptr(), chunk.as_ptr());
    assert_eq!(out.len(), chunk.len());
}

#[test]
fn stripper_and_scanner_on_a_long_stream() {
    let mut scanner = UsageScanner::new(ScanMode::Sse);
    let mut stripper = UsageChunkStripper::new();
    let events = (4 << 20) / CONTENT_CHUNK.len();
    let body_len = events * CONTENT_CHUNK.len();
    let mut forwarded = 0;
    let tail = [USAGE_CHUNK, DONE].concat();
    let chunks = cycled(CONTENT_CHUNK.as_bytes(), body_len, 8 << 10)
        .chain(tail.as_bytes().chunks(100).map(<[u8]>::to_vec));
    for chunk in chunks {
        scanner.feed(&chunk);
        forwarded += stripper.push(Bytes::from(chunk)).len();
    }
    scanner.finish();
    forwarded += stripper.finish().len();
    assert_eq!(forwarded, body_len + DONE.len());
    assert_eq!(stripper.removed(), 1);
    assert_eq!(scanner.usage(), Some(&stream_usage()));
    assert!(stripper.buffered_high_water() <= 2 * CONTENT_CHUNK.len().max(USAGE_CHUNK.len()));
}

// ---- randomised -----------------------------------------------------------------------------

/// A small deterministic PRNG (xorshift64*), so the randomised tests need no dependency and
/// fail the same way every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Splits `bytes` into chunks of random sizes (empty ones included).
fn random_chunks<'a>(rng: &mut Rng, bytes: &'a [u8]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = rng.below(40).min(rest.len());
        let (a, b) = rest.split_at(n);
        chunks.push(a);
        rest = b;
    }
    chunks
}

#[test]
fn random_streams_and_chunkings() {
    const MULTI_LINE_USAGE: &str =
        "data: {\"choices\":[],\ndata: \"usage\":{\"prompt_tokens\":19,\"completion_tokens\":10,\"total_tokens\":29,\"prompt_tokens_details\":{\"cached_tokens\":3},\"completion_tokens_details\":{\"reasoning_tokens\":2}}}\n\n";
    // (event, is usage-only)
    let templates: [(&str, bool); 7] = [
        (CONTENT_CHUNK, false),
        (FINISH_CHUNK, false),
        (USAGE_CHUNK, true),
        (MULTI_LINE_USAGE, true),
        (": keep-alive\n\n", false),
        (
            "id: 7\ndata: {\"choices\":[{\"index\":0}],\"usage\":null}\n\n",
            false,
        ),
        ("data: {\"choices\": [ ], \"usage\": null}\n\n", false),
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for round in 0..300 {
        let ending = ["\n", "\r\n", "\r"][rng.below(3)];
        let mut stream = String::new();
        let mut expected = String::new();
        let mut usage_events = 0;
        for _ in 0..rng.below(8) {
            let (event, usage_only) = templates[rng.below(templates.len())];
            let event = event.replace('\n', ending);
            stream.push_str(&event);
            if usage_only {
                usage_events += 1;
            } else {
                expected.push_str(&event);
            }
        }
        let done = DONE.replace('\n', ending);
        stream.push_str(&done);
        expected.push_str(&done);

        let chunks = random_chunks(&mut rng, stream.as_bytes());
        let (out, stripper) = strip(&chunks);
        assert_eq!(String::from_utf8(out).unwrap(), expected, "round {round}");
        assert_eq!(stripper.removed(), usage_events, "round {round}");

        let scanner = scan(ScanMode::Sse, &chunks);
        let expected_usage = (usage_events > 0).then(stream_usage);
        assert_eq!(scanner.usage(), expected_usage.as_ref(), "round {round}");
        assert!(scanner.saw_done(), "round {round}");
    }
}

#[test]
fn random_bytes_never_panic_and_are_only_removed_in_whole_usage_events() {
    let alphabet: [&[u8]; 16] = [
        b"{",
        b"}",
        b"[",
        b"]",
        b"\"",
        b":",
        b",",
        b"\\",
        b" ",
        b"\r",
        b"\n",
        b"data: ",
        b"\"usage\"",
        b"\"choices\"",
        b"null",
        b"\"response\"",
    ];
    let mut rng = Rng(42);
    for _ in 0..2000 {
        let mut input = Vec::new();
        for _ in 0..rng.below(60) {
            input.extend_from_slice(alphabet[rng.below(alphabet.len())]);
        }
        let chunks = random_chunks(&mut rng, &input);
        let (out, stripper) = strip(&chunks);
        if stripper.removed() == 0 {
            assert_eq!(out, input);
        } else {
            assert!(out.len() < input.len());
        }
        let _ = scan(ScanMode::Sse, &chunks).usage();
        let _ = scan(ScanMode::Json, &chunks).usage();
    }
}

#[test]
fn invalid_counts_and_disagreeing_counts_make_the_usage_invalid() {
    let check = |body: &str| {
        let whole = scan(ScanMode::Json, &[body.as_bytes()]);
        let sse = format!("data: {body}\n\n");
        let stream = scan(ScanMode::Sse, &[sse.as_bytes()]);
        assert_eq!(whole.usage_invalid(), stream.usage_invalid(), "{body}");
        whole.usage_invalid()
    };
    assert!(!check(
        r#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#
    ));
    assert!(!check(
        r#"{"usage":{"prompt_tokens":12.0,"completion_tokens":3}}"#
    ));
    assert!(!check(r#"{"usage":{"prompt_tokens":8,"total_tokens":8}}"#));
    for bad in [
        r#"{"usage":{"prompt_tokens":-1,"completion_tokens":5,"total_tokens":4}}"#,
        r#"{"usage":{"prompt_tokens":1e30,"completion_tokens":5}}"#,
        r#"{"usage":{"prompt_tokens":1000000000001,"completion_tokens":5}}"#,
        r#"{"usage":{"prompt_tokens":1.5,"completion_tokens":5}}"#,
        r#"{"usage":{"prompt_tokens":"1","completion_tokens":5}}"#,
        r#"{"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":16}}"#,
        r#"{"usage":{"prompt_tokens":8,"total_tokens":9}}"#,
        r#"{"usage":{"input_tokens":10,"output_tokens":5,"input_tokens_details":{"cached_tokens":11}}}"#,
        r#"{"usage":{"input_tokens":10,"output_tokens":5,"output_tokens_details":{"reasoning_tokens":6}}}"#,
    ] {
        assert!(check(bad), "{bad}");
    }
}

#[test]
fn a_usage_object_that_does_not_parse_is_invalid_not_missing() {
    for body in [
        r#"{"usage":{"prompt_tokens":1e400,"completion_tokens":1,"total_tokens":2}}"#,
        r#"{"usage":{"prompt_tokens":10,"completion_tokens":1,"total_tokens":"#,
    ] {
        let scanner = scan(ScanMode::Json, &[body.as_bytes()]);
        assert!(scanner.usage_invalid(), "{body}");
        assert_eq!(scanner.usage_reports(), 1, "{body}");
    }
    let stream = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":-1e999}}\n\ndata: [DONE]\n\n";
    let scanner = scan(ScanMode::Sse, &[stream.as_bytes()]);
    assert!(scanner.usage_invalid());
}

#[test]
fn a_responses_error_event_is_an_error() {
    let named = "event: response.created\ndata: {\"type\":\"response.created\"}\n\n\
                 event: error\ndata: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"x\"}\n\n";
    let unnamed = "data: {\"type\":\"error\",\"code\":\"server_error\",\"message\":\"x\"}\n\n";
    let no_space = "event:error\ndata: {\"code\":\"x\"}\n\n";
    for body in [named, unnamed, no_space] {
        assert_every_split_error(body, true);
    }
}

#[test]
fn events_that_only_mention_an_error_are_not_errors() {
    for body in [
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"error\"}\n\n",
        "event: errors\ndata: {}\n\n",
        "event: error-ish\ndata: {}\n\n",
        "data: {\"type\":\"errors\"}\n\n",
        // The type of one event does not carry over to the next.
        "event: error\nevent: response.completed\ndata: {}\n\n",
    ] {
        assert_every_split_error(body, false);
    }
}

/// `saw_error` for `body` split in two at every position.
fn assert_every_split_error(body: &str, expected: bool) {
    let b = body.as_bytes();
    for k in 0..=b.len() {
        let scanner = scan(ScanMode::Sse, &[&b[..k], &b[k..]]);
        assert_eq!(scanner.saw_error(), expected, "split at {k}: {body:?}");
    }
}
