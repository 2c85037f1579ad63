//! ModelAllowList: canonical names, wildcards, workspace narrowing, aliases, model listings.

mod common;

use std::sync::Arc;

use common::{answer, chat, post, Inner};
use http::{Request, StatusCode};
use tower::{ServiceBuilder, ServiceExt};
use tower_llm_policy::model::canonical_model;
use tower_llm_policy::{ApiKey, ModelAliases, ModelAllowListLayer};

/// Sends `req` through ModelAllowList with `key` already authenticated.
async fn send(
    layer: ModelAllowListLayer,
    key: Option<ApiKey>,
    mut req: Request<String>,
) -> (common::Answer, Inner) {
    if let Some(key) = key {
        req.extensions_mut().insert(Arc::new(key));
    }
    let inner = Inner::default();
    let svc = ServiceBuilder::new().layer(layer).service(inner.service());
    let a = answer(svc.oneshot(req).await.unwrap()).await;
    (a, inner)
}

fn limited(models: &[&str]) -> Option<ApiKey> {
    Some(ApiKey::new("k").model_limits(models.iter().copied()))
}

async fn status(key: Option<ApiKey>, model: &str) -> StatusCode {
    send(
        ModelAllowListLayer::new(),
        key,
        post("/v1/chat/completions", chat(model)),
    )
    .await
    .0
    .status
}

#[tokio::test]
async fn allowed_model_reaches_the_inner_service() {
    let (a, inner) = send(
        ModelAllowListLayer::new(),
        limited(&["gpt-4o"]),
        post("/v1/chat/completions", chat("gpt-4o")),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(inner.calls(), 1);
    let view = inner.last().view.expect("LlmRequest in extensions");
    assert_eq!(view.model(), Some("gpt-4o"));
}

#[tokio::test]
async fn model_outside_the_list_is_403_naming_the_model_and_never_forwarded() {
    let (a, inner) = send(
        ModelAllowListLayer::new(),
        limited(&["gpt-4o-mini"]),
        post("/v1/chat/completions", chat("gpt-4.1")),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let (code, message) = a.error();
    assert_eq!(code, "model_not_allowed");
    assert!(message.contains("gpt-4.1"), "{message}");
    assert_eq!(a.json()["error"]["param"], "model");
    assert_eq!(inner.calls(), 0);
}

#[tokio::test]
async fn enabled_empty_list_refuses_everything() {
    let (a, inner) = send(
        ModelAllowListLayer::new(),
        limited(&[]),
        post("/v1/chat/completions", chat("gpt-4o")),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let (code, message) = a.error();
    assert_eq!(code, "model_not_allowed");
    assert_eq!(message, "This key has no access to any models");
    assert_eq!(inner.calls(), 0);
}

#[tokio::test]
async fn disabled_limits_allow_any_model() {
    let mut key = ApiKey::new("k").model_limits(["gpt-4o"]);
    key.model_limits_enabled = false;
    assert_eq!(status(Some(key), "o1-pro").await, StatusCode::OK);
    assert_eq!(status(None, "o1-pro").await, StatusCode::OK);
}

#[tokio::test]
async fn dated_snapshots_match_their_base_model() {
    let key = || limited(&["gpt-4o", "gpt-4", "gpt-3.5-turbo"]);
    for model in [
        "gpt-4o-2024-08-06",
        "gpt-4-0613",
        "gpt-3.5-turbo-0125",
        "gpt-4o",
    ] {
        assert_eq!(status(key(), model).await, StatusCode::OK, "{model}");
    }
    // A snapshot of another model is not its base.
    assert_eq!(
        status(key(), "gpt-4o-mini-2024-07-18").await,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn a_snapshot_entry_pins_that_snapshot_only() {
    let key = || limited(&["gpt-4o-2024-08-06"]);
    assert_eq!(status(key(), "gpt-4o-2024-08-06").await, StatusCode::OK);
    assert_eq!(status(key(), "gpt-4o").await, StatusCode::FORBIDDEN);
    assert_eq!(
        status(key(), "gpt-4o-2024-05-13").await,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn provider_prefix_case_and_whitespace_are_normalised() {
    let key = || limited(&["gpt-4o"]);
    for model in [
        "openai/gpt-4o",
        "GPT-4o",
        "  gpt-4o\t",
        "OpenAI/GPT-4O-2024-08-06",
    ] {
        assert_eq!(status(key(), model).await, StatusCode::OK, "{model:?}");
    }
    // The entries are normalised the same way.
    assert_eq!(
        status(limited(&[" OpenAI/GPT-4o "]), "gpt-4o").await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn wildcards_match_prefixes() {
    let key = || limited(&["gpt-4o*"]);
    for model in [
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4o-mini-2024-07-18",
        "openai/gpt-4o-audio-preview",
    ] {
        assert_eq!(status(key(), model).await, StatusCode::OK, "{model}");
    }
    assert_eq!(status(key(), "gpt-4.1").await, StatusCode::FORBIDDEN);
    assert_eq!(status(limited(&["*"]), "anything").await, StatusCode::OK);
}

#[tokio::test]
async fn workspace_entitlement_applies_and_keys_only_narrow_it() {
    let layer = || ModelAllowListLayer::new().workspace_models(["gpt-4o*", "o3-mini"]);
    let go = |key: Option<ApiKey>, model: &str| {
        send(layer(), key, post("/v1/chat/completions", chat(model)))
    };
    // No key (or a key without limits): the workspace list alone.
    assert_eq!(go(None, "o3-mini").await.0.status, StatusCode::OK);
    assert_eq!(go(None, "gpt-4.1").await.0.status, StatusCode::FORBIDDEN);
    // A key listing more than the workspace gets no more.
    let key = || limited(&["gpt-4.1", "gpt-4o-mini"]);
    assert_eq!(go(key(), "gpt-4.1").await.0.status, StatusCode::FORBIDDEN);
    assert_eq!(go(key(), "gpt-4o-mini").await.0.status, StatusCode::OK);
    // The key narrows: gpt-4o is in the workspace but not in the key's list.
    assert_eq!(go(key(), "gpt-4o").await.0.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn aliases_resolve_before_the_check_and_cannot_escape_the_list() {
    let names = ModelAliases::new()
        .strip_suffix("-thinking")
        .strip_suffix("-latest")
        .alias("best", "o3");
    let layer = || {
        ModelAllowListLayer::new()
            .policy(tower_llm_policy::Policy::new().model_aliases(names.clone()))
    };
    let go = |key: Option<ApiKey>, model: &str| {
        send(layer(), key, post("/v1/chat/completions", chat(model)))
    };
    let key = || limited(&["gpt-4o", "claude-3-7-sonnet"]);
    assert_eq!(go(key(), "gpt-4o-latest").await.0.status, StatusCode::OK);
    assert_eq!(
        go(key(), "claude-3-7-sonnet-thinking").await.0.status,
        StatusCode::OK
    );
    // "best" is an alias of o3, which the list does not allow.
    let (a, inner) = go(key(), "best").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.error().1.contains("best"));
    assert_eq!(inner.calls(), 0);
    assert_eq!(go(limited(&["o3"]), "best").await.0.status, StatusCode::OK);
}

#[test]
fn canonical_names() {
    for (sent, canonical) in [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4-0613", "gpt-4"),
        ("openai/gpt-4o", "gpt-4o"),
        (" GPT-4o-Mini ", "gpt-4o-mini"),
        ("o1-2024-12-17", "o1"),
        ("gpt-4-32k", "gpt-4-32k"),
        ("text-embedding-3-small", "text-embedding-3-small"),
    ] {
        assert_eq!(canonical_model(sent), canonical, "{sent}");
    }
}

#[tokio::test]
async fn missing_model_is_400_and_endpoint_defaults_apply() {
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let (a, inner) = send(
        ModelAllowListLayer::new(),
        limited(&["gpt-4o"]),
        post("/v1/chat/completions", body),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.error().0, "invalid_request_body");
    assert_eq!(inner.calls(), 0);

    // Image generation without a model means dall-e-2: checked as such.
    let images = || post("/v1/images/generations", r#"{"prompt":"a cat"}"#);
    let (a, _) = send(ModelAllowListLayer::new(), limited(&["dall-e-3"]), images()).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.error().1.contains("dall-e-2"));
    let (a, _) = send(ModelAllowListLayer::new(), limited(&["dall-e-2"]), images()).await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn prefixed_and_azure_paths_are_checked() {
    let (a, _) = send(
        ModelAllowListLayer::new(),
        limited(&["gpt-4o"]),
        post("/openai/v1/chat/completions", chat("gpt-4.1")),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);

    // Azure routes by deployment, whatever the body says; an alias maps it to a model.
    let names = ModelAliases::new().alias("prod-gpt4", "gpt-4");
    let layer = || {
        ModelAllowListLayer::new()
            .policy(tower_llm_policy::Policy::new().model_aliases(names.clone()))
    };
    let path = "/openai/deployments/prod-gpt4/chat/completions?api-version=2024-10-21";
    let (a, inner) = send(layer(), limited(&["gpt-4o"]), post(path, chat("gpt-4o"))).await;
    assert_eq!(
        a.status,
        StatusCode::FORBIDDEN,
        "body model must not hide the deployment"
    );
    assert_eq!(inner.calls(), 0);
    let (a, _) = send(
        layer(),
        limited(&["gpt-4"]),
        post(path, r#"{"messages":[]}"#),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn path_and_query_models_are_checked() {
    let get = |uri: &str| Request::get(uri).body(String::new()).unwrap();
    let key = || limited(&["gpt-4o"]);
    let (a, _) = send(ModelAllowListLayer::new(), key(), get("/v1/models/gpt-4o")).await;
    assert_eq!(a.status, StatusCode::OK);
    let (a, inner) = send(ModelAllowListLayer::new(), key(), get("/v1/models/o1-pro")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(inner.calls(), 0);
    let (a, _) = send(
        ModelAllowListLayer::new(),
        key(),
        get("/v1/realtime?model=gpt-4o-realtime-preview"),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn model_listing_is_filtered_to_the_allowed_models() {
    let get = || Request::get("/v1/models").body(String::new()).unwrap();
    let (a, inner) = send(
        ModelAllowListLayer::new(),
        limited(&["gpt-4o", "o3-mini"]),
        get(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert!(
        !inner.last().body_was_buffered,
        "GET /v1/models is not buffered"
    );
    let ids: Vec<String> = a.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["gpt-4o", "gpt-4o-2024-08-06", "o3-mini"]);
    assert_eq!(a.json()["object"], "list");

    let (a, _) = send(ModelAllowListLayer::new(), limited(&[]), get()).await;
    assert_eq!(a.json()["data"].as_array().unwrap().len(), 0);

    // No list applies: the upstream's body passes untouched.
    let (a, _) = send(ModelAllowListLayer::new(), None, get()).await;
    assert_eq!(&a.body[..], common::MODEL_LIST.as_bytes());
}

#[tokio::test]
async fn endpoints_without_a_model_pass_unbuffered() {
    let req = Request::post("/v1/files")
        .header("content-type", "application/octet-stream")
        .body("raw file bytes".to_owned())
        .unwrap();
    let (a, inner) = send(ModelAllowListLayer::new(), limited(&["gpt-4o"]), req).await;
    assert_eq!(a.status, StatusCode::OK);
    let seen = inner.last();
    assert!(!seen.body_was_buffered);
    assert_eq!(&seen.body[..], b"raw file bytes");
}

#[tokio::test]
async fn multipart_model_field_is_checked() {
    let boundary = "XyZ";
    let form = |model: &str| {
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF....WAVEfmt \r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--{boundary}--\r\n"
        )
    };
    let req = |model: &str| {
        Request::post("/v1/audio/transcriptions")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(form(model))
            .unwrap()
    };
    let key = || limited(&["whisper-1"]);
    let (a, inner) = send(ModelAllowListLayer::new(), key(), req("whisper-1")).await;
    assert_eq!(a.status, StatusCode::OK);
    // The upload reaches the inner service byte for byte.
    assert_eq!(inner.last().body, form("whisper-1").as_bytes());
    let (a, inner) = send(ModelAllowListLayer::new(), key(), req("gpt-4o-transcribe")).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(inner.calls(), 0);

    let broken = Request::post("/v1/audio/transcriptions")
        .header("content-type", "multipart/form-data")
        .body(form("whisper-1"))
        .unwrap();
    let (a, _) = send(ModelAllowListLayer::new(), key(), broken).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.error().0, "invalid_request_body");
}

#[tokio::test]
async fn huge_model_names_are_quoted_truncated() {
    let model = "x".repeat(100_000);
    let (a, _) = send(
        ModelAllowListLayer::new(),
        limited(&["gpt-4o"]),
        post("/v1/chat/completions", chat(&model)),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body.len() < 1000, "error body is {} bytes", a.body.len());
}

#[tokio::test]
async fn realtime_fine_tuning_and_assistants_bodies_are_checked() {
    let key = || limited(&["gpt-4o-mini*"]);
    let cases = [
        (
            "/v1/realtime/sessions",
            r#"{"model":"gpt-4o-realtime-preview"}"#,
            StatusCode::FORBIDDEN,
        ),
        (
            "/v1/realtime/client_secrets",
            r#"{"session":{"type":"realtime","model":"gpt-realtime"}}"#,
            StatusCode::FORBIDDEN,
        ),
        (
            "/v1/realtime/client_secrets",
            r#"{"session":{"type":"realtime","model":"gpt-4o-mini-realtime-preview"}}"#,
            StatusCode::OK,
        ),
        (
            "/v1/fine_tuning/jobs",
            r#"{"model":"gpt-4.1","training_file":"file-1"}"#,
            StatusCode::FORBIDDEN,
        ),
        (
            "/v1/assistants",
            r#"{"model":"o1-pro","instructions":"x"}"#,
            StatusCode::FORBIDDEN,
        ),
        (
            "/v1/threads/t1/runs",
            r#"{"assistant_id":"a1","model":"gpt-4.1"}"#,
            StatusCode::FORBIDDEN,
        ),
        // No model in the body: the assistant's own model runs upstream, which the policy
        // cannot see, so a key with model limits is refused (fail closed).
        (
            "/v1/threads/t1/runs",
            r#"{"assistant_id":"a1"}"#,
            StatusCode::FORBIDDEN,
        ),
        ("/v1/fine_tuning/jobs/ft-1/cancel", "", StatusCode::OK),
    ];
    for (path, body, expected) in cases {
        let (a, inner) = send(ModelAllowListLayer::new(), key(), post(path, body)).await;
        assert_eq!(a.status, expected, "{path} {body}");
        assert_eq!(inner.calls(), usize::from(expected == StatusCode::OK));
    }
}

/// The model list as a misbehaving upstream sends it: never passed on raw to a limited key.
#[tokio::test]
async fn a_model_list_that_cannot_be_filtered_is_a_502_never_the_raw_list() {
    use http::Response;
    use http_body_util::Full;

    let list = common::MODEL_LIST;
    let cases: Vec<(&str, Response<Full<bytes::Bytes>>)> = vec![
        (
            "gzip",
            Response::builder()
                .header("content-type", "application/json")
                .header("content-encoding", "gzip")
                .body(Full::from(list))
                .unwrap(),
        ),
        (
            "not JSON",
            Response::builder()
                .header("content-type", "text/plain")
                .body(Full::from(list))
                .unwrap(),
        ),
        (
            "declared over the limit",
            Response::builder()
                .header("content-type", "application/json")
                .header("content-length", "99999999")
                .body(Full::from(list))
                .unwrap(),
        ),
        (
            "no data array",
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::from(r#"{"object":"list","models":["gpt-4.1"]}"#))
                .unwrap(),
        ),
    ];
    for (what, response) in cases {
        let response = Arc::new(std::sync::Mutex::new(Some(response)));
        let svc = ServiceBuilder::new()
            .layer(
                ModelAllowListLayer::new()
                    .workspace_models(["gpt-4o"])
                    .models_response_limit(1 << 20),
            )
            .service(tower::service_fn(
                move |_req: Request<tower_llm_policy::PolicyBody>| {
                    let r = response.lock().unwrap().take().unwrap();
                    async move { Ok::<_, std::convert::Infallible>(r) }
                },
            ));
        let a = answer(
            svc.oneshot(Request::get("/v1/models").body(String::new()).unwrap())
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{what}");
        let (code, _) = a.error();
        assert_eq!(code, "upstream_invalid_response", "{what}");
        assert!(
            !String::from_utf8_lossy(&a.body).contains("gpt-4.1"),
            "{what}"
        );
    }
    // A list over the limit without a declared length: read up to the limit, then refused.
    let big = format!(
        r#"{{"object":"list","data":[{}]}}"#,
        vec![r#"{"id":"gpt-4.1","object":"model"}"#; 2000].join(",")
    );
    let svc = ServiceBuilder::new()
        .layer(
            ModelAllowListLayer::new()
                .workspace_models(["gpt-4o"])
                .models_response_limit(4096),
        )
        .service(tower::service_fn(
            move |_req: Request<tower_llm_policy::PolicyBody>| {
                let body = big.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(common::CountingBody::new(&body, 16).0)
                            .unwrap(),
                    )
                }
            },
        ));
    let a = answer(
        svc.oneshot(Request::get("/v1/models").body(String::new()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(a.error().0, "upstream_invalid_response");
}

/// A large catalogue (5 MiB, with a declared length) is filtered under the default limit, not
/// passed on whole nor emptied.
#[tokio::test]
async fn a_large_model_list_is_filtered_under_the_default_limit() {
    use http::Response;
    use http_body_util::Full;

    let mut entries: Vec<String> = (0..63_000)
        .map(|i| format!(r#"{{"id":"vendor-model-{i:06}","object":"model","owned_by":"someone-with-a-long-name"}}"#))
        .collect();
    entries.push(r#"{"id":"gpt-4o","object":"model"}"#.to_owned());
    let list = format!(r#"{{"object":"list","data":[{}]}}"#, entries.join(","));
    assert!(list.len() > 5 << 20, "{}", list.len());
    let svc = ServiceBuilder::new()
        .layer(ModelAllowListLayer::new().workspace_models(["gpt-4o"]))
        .service(tower::service_fn(
            move |_req: Request<tower_llm_policy::PolicyBody>| {
                let list = list.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .header("content-length", list.len())
                            .body(Full::from(list))
                            .unwrap(),
                    )
                }
            },
        ));
    let a = answer(
        svc.oneshot(Request::get("/v1/models").body(String::new()).unwrap())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let ids: Vec<String> = a.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["gpt-4o"]);
}
