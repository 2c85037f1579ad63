//! Regression tests for inputs the fuzz targets (`fuzz/`) found.

use bytes::Bytes;
use http::Request;
use tower_llm_policy::LlmRequest;

fn parts(path: &str) -> http::request::Parts {
    Request::post(path)
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

/// Found by `request_view`: invalid UTF-8 inside a string the view skips (here `session.type`)
/// was accepted, although the body is not JSON and the upstream's parser reads it otherwise.
#[test]
fn invalid_utf8_in_a_skipped_string_is_refused() {
    let body = b"{\"session\":{\"type\":\"realti\xffme\",\"model\":\"gpt-realtime\"}}";
    let err = LlmRequest::parse(
        &parts("/v1/realtime/client_secrets"),
        Bytes::from_static(body),
    )
    .unwrap_err();
    assert!(err.to_string().contains("UTF-8"), "{err}");
    // Anywhere in the body: a skipped top-level member, a message field.
    for body in [
        &b"{\"model\":\"gpt-4o\",\"metadata\":{\"k\":\"\xc3\"}}"[..],
        &b"{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"us\xe2\x82er\",\"content\":\"hi\"}]}"[..],
    ] {
        assert!(
            LlmRequest::parse(&parts("/v1/chat/completions"), Bytes::copy_from_slice(body))
                .is_err()
        );
    }
    // Valid UTF-8 everywhere is still read, borrowed text included.
    let ok = "{\"model\":\"gpt-4o\",\"metadata\":{\"k\":\"été\"},\"messages\":[{\"role\":\"user\",\"content\":\"héllo\"}]}";
    let req = LlmRequest::parse(
        &parts("/v1/chat/completions"),
        Bytes::from_static(ok.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        req.prompt_parts().map(|p| p.text).collect::<Vec<_>>(),
        ["héllo"]
    );
}

/// Found by `multipart`: a text field that starts with a UTF-16 byte-order mark was decoded as
/// UTF-16 (multer sniffs the BOM), so the view read another prompt (and model) than the bytes
/// the upstream reads as UTF-8.
#[cfg(feature = "multipart")]
#[test]
fn multipart_text_fields_are_read_as_utf8_whatever_their_first_bytes() {
    let boundary = "X";
    let mut body = Vec::new();
    for (name, data) in [
        ("model", &b"whisper-1"[..]),
        ("prompt", &b"\xff\xfeh\x00i\x00"[..]),
        ("user", &b"\xef\xbb\xbfu-1"[..]),
    ] {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n")
                .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let parts = Request::post("/v1/audio/transcriptions")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(())
        .unwrap()
        .into_parts()
        .0;
    // Bytes that are not UTF-8 (a UTF-16 byte-order mark) are refused, not decoded as UTF-16
    // (multer's `text()` did, and read `hi` where the upstream reads other bytes).
    let refused = LlmRequest::parse(&parts, Bytes::from(body.clone())).unwrap_err();
    assert!(refused.to_string().contains("not UTF-8"), "{refused}");
    // The same form with a UTF-8 prompt is read byte for byte; a UTF-8 BOM is kept, as the
    // upstream gets it.
    let at = body
        .windows(6)
        .position(|w| w == b"\xff\xfeh\x00i\x00")
        .unwrap();
    body.splice(at..at + 6, b"hi".iter().copied());
    let req = LlmRequest::parse(&parts, Bytes::from(body)).unwrap();
    let prompts: Vec<&str> = req.prompt_parts().map(|p| p.text).collect();
    assert_eq!(prompts, ["hi"]);
    assert_eq!(req.user(), Some("\u{feff}u-1"));
    assert_eq!(req.model(), Some("whisper-1"));
}
