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
