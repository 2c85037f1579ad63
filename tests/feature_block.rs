//! FeatureBlock: features on their real paths, model / size / quality blocks, workspace and key
//! levels combined, default deny, and bodies left unread when the endpoint decides.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{service_fn, BoxError, Service, ServiceBuilder, ServiceExt};
use tower_llm_policy::endpoint::{Endpoint, Route};
use tower_llm_policy::error::LayerName as Layer;
use tower_llm_policy::feature_block::FeatureBlockLayer;
use tower_llm_policy::key_auth::KeyAuthLayer;
use tower_llm_policy::keys::{ApiKey, MemoryKeyStore};
use tower_llm_policy::{FeatureSet, LlmRequest, ModelAliases, PolicyBody, Rejection};

/// What the inner service saw of one request.
#[derive(Debug)]
struct Seen {
    /// Whether the body arrived in memory (read by a layer) rather than streaming.
    buffered: bool,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A stack of `layer` over an inner service that logs what it sees and answers 200.
fn stack(
    layer: FeatureBlockLayer,
) -> (
    impl Service<
            Request<String>,
            Response = Response<tower_llm_policy::ResponseBody<String>>,
            Error = Infallible,
        > + Clone,
    Log,
) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let svc =
        ServiceBuilder::new()
            .layer(layer)
            .service(service_fn(move |req: Request<PolicyBody>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(Seen {
                        buffered: req.body().as_bytes().is_some(),
                    });
                    Ok::<_, Infallible>(Response::new(String::new()))
                }
            }));
    (svc, log)
}

fn features(names: &str) -> FeatureSet {
    names.parse().unwrap()
}

fn request(method: Method, path: &str, body: &str) -> Request<String> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .unwrap()
}

fn with_key(mut req: Request<String>, key: ApiKey) -> Request<String> {
    req.extensions_mut().insert(Arc::new(key));
    req
}

async fn send<S, B>(svc: &S, req: Request<String>) -> (StatusCode, serde_json::Value, Response<()>)
where
    S: Service<Request<String>, Response = Response<B>, Error = Infallible> + Clone,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError> + std::fmt::Debug,
{
    let response = svc.clone().oneshot(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (parts.status, json, Response::from_parts(parts, ()))
}

fn message(json: &serde_json::Value) -> &str {
    json["error"]["message"].as_str().unwrap_or_default()
}

/// Every feature, with a real request on its path: (group name, method, path, body).
const CASES: &[(&str, &str, &str, &str)] = &[
    (
        "chat",
        "POST",
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","messages":[]}"#,
    ),
    (
        "completions",
        "POST",
        "/v1/completions",
        r#"{"model":"gpt-3.5-turbo-instruct","prompt":"hi"}"#,
    ),
    (
        "embeddings",
        "POST",
        "/v1/embeddings",
        r#"{"model":"text-embedding-3-small","input":"hi"}"#,
    ),
    (
        "image_generation",
        "POST",
        "/v1/images/generations",
        r#"{"prompt":"a cat"}"#,
    ),
    ("image_edits", "POST", "/v1/images/edits", ""),
    ("image_edits", "POST", "/v1/images/variations", ""),
    (
        "audio_speech",
        "POST",
        "/v1/audio/speech",
        r#"{"model":"tts-1","input":"hi","voice":"alloy"}"#,
    ),
    (
        "audio_transcription",
        "POST",
        "/v1/audio/transcriptions",
        "",
    ),
    ("audio_transcription", "POST", "/v1/audio/translations", ""),
    (
        "moderations",
        "POST",
        "/v1/moderations",
        r#"{"input":"hi"}"#,
    ),
    (
        "responses",
        "POST",
        "/v1/responses",
        r#"{"model":"gpt-4o","input":"hi"}"#,
    ),
    ("responses", "GET", "/v1/responses/resp_123", ""),
    ("files", "POST", "/v1/files", ""),
    ("files", "GET", "/v1/files/file-abc/content", ""),
    ("files", "POST", "/v1/uploads", ""),
    ("batches", "POST", "/v1/batches", r#"{"input_file_id":"f"}"#),
    ("fine_tuning", "POST", "/v1/fine_tuning/jobs", "{}"),
    ("models", "GET", "/v1/models", ""),
    ("models", "GET", "/v1/models/gpt-4o", ""),
    (
        "realtime",
        "GET",
        "/v1/realtime?model=gpt-4o-realtime-preview",
        "",
    ),
    ("realtime", "POST", "/v1/realtime/sessions", "{}"),
    ("assistants", "POST", "/v1/assistants", "{}"),
    ("assistants", "POST", "/v1/threads/thread_1/runs", "{}"),
    ("assistants", "GET", "/v1/vector_stores", ""),
];

/// The same request under a prefix before `/v1`, and as an Azure deployment path when the
/// endpoint has one.
fn variants(path: &str) -> Vec<String> {
    let mut out = vec![path.to_owned(), format!("/openai{path}")];
    for api in [
        "chat/completions",
        "completions",
        "embeddings",
        "images/generations",
        "audio/speech",
        "audio/transcriptions",
        "audio/translations",
    ] {
        if path == format!("/v1/{api}") {
            out.push(format!(
                "/openai/deployments/my-deployment/{api}?api-version=2024-10-21"
            ));
        }
    }
    out
}

#[tokio::test]
async fn every_feature_is_blocked_on_its_real_paths() {
    for (feature, method, path, body) in CASES {
        let (svc, log) = stack(FeatureBlockLayer::new().block_features(features(feature)));
        for path in variants(path) {
            let req = request(method.parse().unwrap(), &path, body);
            let (status, json, response) = send(&svc, req).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{feature} {path}");
            assert_eq!(json["error"]["code"], "feature_blocked", "{path}");
            assert_eq!(json["error"]["type"], "invalid_request_error", "{path}");
            assert_eq!(
                message(&json),
                format!("This workspace blocks the {feature} feature."),
                "{path}"
            );
            let rejection = response.extensions().get::<Rejection>().unwrap();
            assert_eq!(rejection.layer, Layer::FeatureBlock);
            assert_eq!(rejection.code, "feature_blocked");
        }
        assert!(
            log.lock().unwrap().is_empty(),
            "{feature}: inner was called"
        );
    }
}

#[tokio::test]
async fn other_features_pass_when_one_is_blocked() {
    for (feature, method, path, body) in CASES {
        // Block every feature but this one.
        let mut others = FeatureSet::empty();
        for (other, ..) in CASES {
            if other != feature {
                others = others.union(features(other));
            }
        }
        let (svc, log) = stack(FeatureBlockLayer::new().block_features(others));
        let req = request(method.parse().unwrap(), path, body);
        let (status, json, _) = send(&svc, req).await;
        if *path == "/v1/batches" {
            // A batch could run any blocked feature from its input file, which the policy
            // cannot read: with other features blocked, batches are refused.
            assert_eq!(status, StatusCode::FORBIDDEN, "{json}");
            assert_eq!(json["error"]["code"], "unverifiable_request");
            assert!(log.lock().unwrap().is_empty());
            continue;
        }
        assert_eq!(status, StatusCode::OK, "{feature} {path}: {json}");
        assert_eq!(log.lock().unwrap().len(), 1);
    }
}

#[test]
fn classification_of_prefixed_and_azure_paths() {
    let classify = |path: &str| Route::classify(&path.parse().unwrap());
    let azure = classify("/openai/deployments/My-GPT4/chat/completions?api-version=2024-10-21");
    assert_eq!(azure.endpoint, Endpoint::ChatCompletions);
    assert_eq!(azure.deployment.as_deref(), Some("my-gpt4"));
    assert_eq!(
        classify("/openai/v1/chat/completions").endpoint,
        Endpoint::ChatCompletions
    );
    assert_eq!(
        classify("/api/proxy/v1/embeddings").endpoint,
        Endpoint::Embeddings
    );
    // A deployment may be called `v1`.
    let v1 = classify("/openai/deployments/v1/images/generations");
    assert_eq!(v1.endpoint, Endpoint::ImageGeneration);
    assert_eq!(v1.deployment.as_deref(), Some("v1"));
    // Azure realtime names the deployment in the query.
    let realtime = classify("/openai/realtime?api-version=2024-10-01-preview&deployment=rt");
    assert_eq!(realtime.endpoint, Endpoint::Realtime);
    assert_eq!(realtime.deployment.as_deref(), Some("rt"));
    // Normalisation: case, dot segments, percent-encoding, trailing slash.
    assert_eq!(
        classify("/V1/Images/./x/../Generations/").endpoint,
        Endpoint::ImageGeneration
    );
    assert_eq!(
        classify("/v1/images/%67enerations").endpoint,
        Endpoint::ImageGeneration
    );
    assert_eq!(classify("/v1/unknown").endpoint, Endpoint::Other);
}

#[tokio::test]
async fn normalised_paths_cannot_slip_past_a_block() {
    let (svc, log) = stack(FeatureBlockLayer::new().block_features(features("images")));
    for path in [
        "/V1/IMAGES/GENERATIONS",
        "/v1//images/generations/",
        "/v1/images/%67enerations",
    ] {
        let (status, json, _) = send(&svc, request(Method::POST, path, "{}")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path}");
        assert_eq!(message(&json), "This workspace blocks the images feature.");
    }
    // Dot segments and encoded slashes are refused outright: an upstream that does not
    // resolve them as we do would route the request elsewhere.
    for path in [
        "/v1/chat/../images/generations",
        "/v1/images%2Fgenerations",
        "/v1/images/%2e/generations",
    ] {
        let (status, json, _) = send(&svc, request(Method::POST, path, "{}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(json["error"]["code"], "ambiguous_request", "{path}");
    }
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_group_is_named_as_a_group_and_a_feature_by_its_name() {
    let (svc, _) = stack(FeatureBlockLayer::new().block_features(features("image_generation")));
    let (_, json, _) = send(&svc, request(Method::POST, "/v1/images/generations", "{}")).await;
    assert_eq!(
        message(&json),
        "This workspace blocks the image_generation feature."
    );
    let (status, ..) = send(&svc, request(Method::POST, "/v1/images/edits", "")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn blocked_model_is_refused_and_named() {
    let (svc, log) = stack(FeatureBlockLayer::new().block_models(["dall-e-3"]));
    let images = |model: &str| {
        request(
            Method::POST,
            "/v1/images/generations",
            &format!(r#"{{"model":"{model}","prompt":"a cat"}}"#),
        )
    };
    let (status, json, response) = send(&svc, images("dall-e-3")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(json["error"]["code"], "feature_blocked");
    assert_eq!(
        message(&json),
        "This workspace blocks usage of model: dall-e-3"
    );
    assert_eq!(
        response.extensions().get::<Rejection>().unwrap().layer,
        Layer::FeatureBlock
    );
    assert!(log.lock().unwrap().is_empty());

    // Other spellings of the same model.
    for sent in ["DALL-E-3", " openai/dall-e-3 "] {
        let (status, ..) = send(&svc, images(sent)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{sent}");
    }
    let (status, ..) = send(&svc, images("dall-e-2")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn model_blocks_match_canonical_names_and_wildcards() {
    let (svc, _) = stack(FeatureBlockLayer::new().block_models(["gpt-4", "o1*"]));
    let chat = |model: &str| {
        request(
            Method::POST,
            "/v1/chat/completions",
            &format!(r#"{{"model":"{model}","messages":[]}}"#),
        )
    };
    for blocked in [
        "gpt-4",
        "gpt-4-0613",
        "o1",
        "o1-mini",
        "o1-preview-2024-09-12",
    ] {
        let (status, json, _) = send(&svc, chat(blocked)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{blocked}");
        assert!(message(&json).ends_with(blocked), "{json}");
    }
    for allowed in ["gpt-4o", "gpt-4o-2024-08-06", "gpt-4.1", "o3-mini"] {
        let (status, ..) = send(&svc, chat(allowed)).await;
        assert_eq!(status, StatusCode::OK, "{allowed}");
    }
}

#[tokio::test]
async fn blocking_the_default_model_catches_requests_without_a_model() {
    let (svc, _) = stack(FeatureBlockLayer::new().block_models(["dall-e-2"]));
    let (status, json, _) = send(
        &svc,
        request(
            Method::POST,
            "/v1/images/generations",
            r#"{"prompt":"a cat"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        message(&json),
        "This workspace blocks usage of model: dall-e-2"
    );
}

#[tokio::test]
async fn azure_deployment_maps_to_a_model_through_an_alias() {
    let names = ModelAliases::new().alias("my-gpt4-deployment", "gpt-4o");
    let (svc, log) = stack(
        FeatureBlockLayer::new()
            .policy(tower_llm_policy::Policy::new().model_aliases(names))
            .block_models(["gpt-4o"]),
    );
    let path = "/openai/deployments/my-gpt4-deployment/chat/completions?api-version=2024-10-21";
    let (status, json, _) = send(
        &svc,
        request(
            Method::POST,
            path,
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{json}");
    assert_eq!(
        message(&json),
        "This workspace blocks usage of model: my-gpt4-deployment"
    );
    let other = "/openai/deployments/mini/chat/completions";
    let (status, ..) = send(&svc, request(Method::POST, other, r#"{"messages":[]}"#)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(log.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn model_in_the_path_or_realtime_query_is_blocked() {
    let (svc, _) = stack(FeatureBlockLayer::new().block_models(["gpt-4o-realtime*"]));
    let (status, json, _) = send(
        &svc,
        request(
            Method::GET,
            "/v1/realtime?model=gpt-4o-realtime-preview-2024-12-17",
            "",
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        message(&json),
        "This workspace blocks usage of model: gpt-4o-realtime-preview-2024-12-17"
    );
    let (status, ..) = send(
        &svc,
        request(Method::GET, "/v1/models/gpt-4o-realtime-preview", ""),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, ..) = send(&svc, request(Method::GET, "/v1/realtime?model=gpt-4o", "")).await;
    assert_eq!(status, StatusCode::OK);
}

fn multipart(fields: &[(&str, &str)]) -> Request<String> {
    let boundary = "XBOUNDARYX";
    let mut body = String::new();
    for (name, value) in fields {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        ));
    }
    body.push_str(&format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\nPNGDATA\r\n--{boundary}--\r\n"
    ));
    Request::post("/v1/images/edits")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .unwrap()
}

#[cfg(feature = "multipart")]
#[tokio::test]
async fn multipart_model_and_size_are_blocked() {
    let (svc, _) = stack(
        FeatureBlockLayer::new()
            .block_models(["gpt-image-1"])
            .block_image_sizes(["1536x1024"]),
    );
    let (status, json, _) = send(
        &svc,
        multipart(&[("model", "gpt-image-1"), ("prompt", "x")]),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        message(&json),
        "This workspace blocks usage of model: gpt-image-1"
    );
    let (status, json, _) = send(
        &svc,
        multipart(&[("model", "dall-e-2"), ("size", "1536x1024")]),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        message(&json),
        "This workspace blocks image size: 1536x1024"
    );
    let (status, ..) = send(&svc, multipart(&[("size", "1024x1024")])).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn image_sizes_and_qualities_are_blocked_on_image_endpoints() {
    let (svc, _) = stack(
        FeatureBlockLayer::new()
            .block_image_sizes(["1792x1024", "1024x1792"])
            .block_image_qualities(["HD"]),
    );
    let images = |body: &str| request(Method::POST, "/v1/images/generations", body);
    let (status, json, _) = send(
        &svc,
        images(r#"{"model":"dall-e-3","prompt":"x","size":"1792x1024"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        message(&json),
        "This workspace blocks image size: 1792x1024"
    );
    let (status, json, _) = send(
        &svc,
        images(r#"{"model":"dall-e-3","prompt":"x","quality":"hd"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(message(&json), "This workspace blocks image quality: hd");
    let (status, ..) = send(
        &svc,
        images(r#"{"model":"dall-e-3","prompt":"x","size":"1024x1024","quality":"standard"}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Not an image endpoint: `size` means nothing to the block.
    let (status, ..) = send(
        &svc,
        request(
            Method::POST,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","messages":[],"size":"1792x1024"}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn key_blocks_add_to_workspace_blocks_and_name_their_level() {
    let (svc, log) = stack(
        FeatureBlockLayer::new()
            .block_features(features("audio"))
            .block_models(["dall-e-3"]),
    );
    let key = ApiKey::new("team-a")
        .blocked_features(features("images"))
        .blocked_models(["gpt-4o*"]);
    let chat = |model: &str| {
        request(
            Method::POST,
            "/v1/chat/completions",
            &format!(r#"{{"model":"{model}","messages":[]}}"#),
        )
    };

    // Key level.
    let (status, json, _) = send(
        &svc,
        with_key(
            request(Method::POST, "/v1/images/generations", "{}"),
            key.clone(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(message(&json), "This key blocks the images feature.");
    let (status, json, _) = send(&svc, with_key(chat("gpt-4o-mini"), key.clone())).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        message(&json),
        "This key blocks usage of model: gpt-4o-mini"
    );

    // Workspace level still applies to the key.
    let (_, json, _) = send(
        &svc,
        with_key(request(Method::POST, "/v1/audio/speech", "{}"), key.clone()),
    )
    .await;
    assert_eq!(message(&json), "This workspace blocks the audio feature.");

    // Another key, or no key: only the workspace's blocks.
    let (status, ..) = send(&svc, chat("gpt-4o-mini")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, ..) = send(
        &svc,
        with_key(
            request(Method::POST, "/v1/images/generations", "{}"),
            ApiKey::new("b"),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, ..) = send(&svc, with_key(chat("gpt-4.1"), key)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(log.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn key_blocks_through_key_auth() {
    let store =
        MemoryKeyStore::new().with_key("sk-a", ApiKey::new("team-a").blocked_models(["dall-e-3"]));
    let svc = ServiceBuilder::new()
        .layer(KeyAuthLayer::new(Arc::new(store)))
        .layer(FeatureBlockLayer::new())
        .service(service_fn(|_req: Request<PolicyBody>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    let req = Request::post("/v1/images/generations")
        .header("authorization", "Bearer sk-a")
        .body(r#"{"model":"dall-e-3","prompt":"x"}"#.to_owned())
        .unwrap();
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn default_deny_allows_only_listed_features() {
    let (svc, log) = stack(FeatureBlockLayer::new().allow_only(features("chat,models")));
    let (status, ..) = send(
        &svc,
        request(
            Method::POST,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","messages":[]}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, ..) = send(&svc, request(Method::GET, "/v1/models", "")).await;
    assert_eq!(status, StatusCode::OK);

    let (status, json, _) = send(&svc, request(Method::POST, "/v1/embeddings", "{}")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        message(&json),
        "This workspace does not allow the embeddings feature."
    );
    for path in ["/v1/unknown/thing", "/healthz", "/v1/organization/usage"] {
        let (status, json, _) = send(&svc, request(Method::GET, path, "")).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{path}");
        assert_eq!(
            message(&json),
            "This workspace does not allow this endpoint."
        );
    }
    assert_eq!(log.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn without_default_deny_unknown_endpoints_pass() {
    let (svc, _) = stack(FeatureBlockLayer::new().block_features(features("chat")));
    let (status, ..) = send(&svc, request(Method::GET, "/v1/unknown/thing", "")).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn default_deny_and_blocks_combine() {
    let (svc, _) = stack(
        FeatureBlockLayer::new()
            .allow_only(features("chat"))
            .block_models(["gpt-4"]),
    );
    let key = ApiKey::new("k").blocked_features(features("chat"));
    let chat = |model: &str| {
        request(
            Method::POST,
            "/v1/chat/completions",
            &format!(r#"{{"model":"{model}","messages":[]}}"#),
        )
    };
    let (status, ..) = send(&svc, chat("gpt-4")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (_, json, _) = send(&svc, with_key(chat("gpt-4o"), key)).await;
    assert_eq!(message(&json), "This key blocks the chat feature.");
}

#[tokio::test]
async fn endpoint_only_blocks_do_not_read_the_body() {
    // Embeddings: no body can add that feature to a chat request (images and audio could be,
    // through an image generation tool or audio output, so blocking those reads bodies).
    let (svc, log) = stack(FeatureBlockLayer::new().block_features(features("embeddings")));
    let (status, ..) = send(
        &svc,
        request(
            Method::POST,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","messages":[]}"#,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!log.lock().unwrap()[0].buffered, "the body was read");

    // A body that is not even JSON passes: nothing here needed to parse it.
    let (status, ..) = send(
        &svc,
        request(Method::POST, "/v1/chat/completions", "not json"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    // A blocked feature is refused before its body is read, so a broken body does not matter.
    let (status, ..) = send(&svc, request(Method::POST, "/v1/embeddings", "not json")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn model_blocks_read_the_body_once_and_hand_it_on() {
    let (svc, log) = stack(FeatureBlockLayer::new().block_models(["dall-e-3"]));
    let response = svc
        .clone()
        .oneshot(request(
            Method::POST,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","messages":[]}"#,
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(log.lock().unwrap()[0].buffered);

    // The view is in the extensions for later layers.
    let svc = ServiceBuilder::new()
        .layer(FeatureBlockLayer::new().block_models(["dall-e-3"]))
        .service(service_fn(|req: Request<PolicyBody>| async move {
            let view = req.extensions().get::<LlmRequest>().unwrap();
            assert_eq!(view.model(), Some("gpt-4o"));
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    let response = svc
        .oneshot(request(
            Method::POST,
            "/v1/chat/completions",
            r#"{"model":"gpt-4o","messages":[]}"#,
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn invalid_json_is_a_400_when_the_body_is_needed() {
    let (svc, log) = stack(FeatureBlockLayer::new().block_models(["dall-e-3"]));
    let (status, json, _) = send(
        &svc,
        request(Method::POST, "/v1/images/generations", "{\"model\":"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json["error"]["code"], "invalid_request_body");
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test]
async fn long_model_names_are_quoted_short() {
    let (svc, _) = stack(FeatureBlockLayer::new().block_models(["x*"]));
    let model = "x".repeat(10_000);
    let (status, json, _) = send(
        &svc,
        request(
            Method::POST,
            "/v1/chat/completions",
            &format!(r#"{{"model":"{model}","messages":[]}}"#),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(message(&json).len() < 400);
}

#[tokio::test]
async fn a_keys_image_sizes_and_qualities_are_blocked_for_that_key_only() {
    let (svc, calls) = stack(FeatureBlockLayer::new());
    let mut key = ApiKey::new("thrifty");
    key.blocked_image_sizes = vec!["1792x1024".into()];
    key.blocked_image_qualities = vec!["hd".into()];
    let images = |body: &str| request(Method::POST, "/v1/images/generations", body);
    let (status, json, _) = send(
        &svc,
        with_key(
            images(r#"{"model":"dall-e-3","prompt":"x","size":"1792X1024"}"#),
            key.clone(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(message(&json), "This key blocks image size: 1792X1024");
    let (status, json, _) = send(
        &svc,
        with_key(
            images(r#"{"model":"dall-e-3","prompt":"x","quality":"hd"}"#),
            key.clone(),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(message(&json), "This key blocks image quality: hd");
    assert!(
        calls.lock().unwrap().is_empty(),
        "a blocked request reached the inner service"
    );
    // Another key, or the same key with allowed options, passes.
    let (status, ..) = send(
        &svc,
        with_key(
            images(r#"{"model":"dall-e-3","prompt":"x","size":"1792x1024","quality":"hd"}"#),
            ApiKey::new("other"),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, ..) = send(
        &svc,
        with_key(
            images(r#"{"model":"dall-e-3","prompt":"x","size":"1024x1024"}"#),
            key,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_endpoints_are_404_when_denied_and_pass_otherwise() {
    let (svc, calls) = stack(FeatureBlockLayer::new().deny_unknown_endpoints(true));
    for path in [
        "/v1/does-not-exist",
        "/v1/chat/complete",
        "/v2/chat/completions",
        "/",
    ] {
        let (status, json, response) = send(&svc, request(Method::POST, path, "{}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(json["error"]["code"], "unknown_url", "{path}");
        assert_eq!(
            response.extensions().get::<Rejection>().unwrap().layer,
            Layer::FeatureBlock
        );
    }
    assert!(
        calls.lock().unwrap().is_empty(),
        "an unknown endpoint was forwarded"
    );
    // Known endpoints are untouched by the switch.
    let (status, ..) = send(
        &svc,
        request(Method::POST, "/v1/conversations", r#"{"items":[]}"#),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Without it, unknown endpoints pass (FeatureBlock blocks only what it is told to).
    let (svc, _) = stack(FeatureBlockLayer::new());
    let (status, ..) = send(&svc, request(Method::POST, "/v1/does-not-exist", "{}")).await;
    assert_eq!(status, StatusCode::OK);
}
