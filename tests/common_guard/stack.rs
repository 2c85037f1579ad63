//! Shared by the request-guard tests (`guard_request`, `guard_hostile`): a regex test
//! detector, a stack of the key (as KeyAuth would insert it), the audit layer, PromptLimit and
//! the guards in front of an upstream that records what it is sent, and a scripted moderator.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{service_fn, ServiceBuilder, ServiceExt};
use tower_llm_policy::audit::{AuditLayer, MemorySink};
use tower_llm_policy::guard::detect::Found;
use tower_llm_policy::guard::{
    Detector, GuardLayer, ModerationError, ModerationInput, Moderator, Verdict,
};
use tower_llm_policy::keys::BoxFuture;
use tower_llm_policy::prompt_limit::PromptLimitLayer;
use tower_llm_policy::{ApiKey, PolicyBody};

/// A test detector: every match of a regex, labelled.
pub(crate) struct Re(regex::Regex, &'static str);

impl Re {
    pub(crate) fn new(pattern: &str, label: &'static str) -> Self {
        Re(regex::Regex::new(pattern).unwrap(), label)
    }
}

impl Detector for Re {
    fn find(&self, text: &str, found: &mut Vec<Found>) {
        found.extend(
            self.0
                .find_iter(text)
                .map(|m| Found::new(m.range(), self.1)),
        );
    }

    fn max_match_len(&self) -> usize {
        64
    }
}

/// API-key-like strings.
pub(crate) fn secret() -> Re {
    Re::new(r"sk-[A-Za-z0-9]{8,40}", "api_key")
}

/// What the upstream was sent.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub body: Bytes,
    pub headers: http::HeaderMap,
}

pub(crate) type Log = Arc<Mutex<Vec<Seen>>>;

/// The key (as KeyAuth would insert it) → Audit → PromptLimit → guards → a recording
/// upstream.
pub(crate) fn stack(layer: GuardLayer, key: Option<ApiKey>) -> (Stack, Log, MemorySink) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let sink = MemorySink::new();
    let key = key.map(Arc::new);
    let svc = ServiceBuilder::new()
        .map_request(move |mut req: Request<String>| {
            if let Some(key) = &key {
                req.extensions_mut().insert(key.clone());
            }
            req
        })
        .layer(AuditLayer::new(sink.clone()).log_content(true))
        .layer(PromptLimitLayer::new())
        .layer(layer)
        .service(service_fn(move |req: Request<PolicyBody>| {
            let seen = seen.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                seen.lock().unwrap().push(Seen {
                    body,
                    headers: parts.headers,
                });
                let mut response = Response::new(http_body_util::Full::new(Bytes::from_static(
                    br#"{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#,
                )));
                response
                    .headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                Ok::<_, Infallible>(response)
            }
        }));
    let svc = svc.map_response(|r| r.map(|b| b.map_err(|e| e.to_string()).boxed_unsync()));
    (Stack(tower::util::BoxCloneService::new(svc)), log, sink)
}

type Boxed = http_body_util::combinators::UnsyncBoxBody<Bytes, String>;

/// The stack under test; its answers are read in full.
#[derive(Clone)]
pub(crate) struct Stack(tower::util::BoxCloneService<Request<String>, Response<Boxed>, Infallible>);

impl Stack {
    pub(crate) async fn oneshot(self, req: Request<String>) -> Result<Response<Bytes>, Infallible> {
        let response = self.0.oneshot(req).await?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Ok(Response::from_parts(parts, body))
    }
}

pub(crate) type Answer = dyn Fn(&ModerationInput) -> Result<Verdict, ModerationError> + Send + Sync;

/// A moderator answering from a script, recording what it was asked.
#[derive(Clone)]
pub(crate) struct Scripted {
    pub answer: Arc<Answer>,
    pub asked: Arc<Mutex<Vec<Vec<String>>>>,
}

impl Scripted {
    pub(crate) fn new(
        answer: impl Fn(&ModerationInput) -> Result<Verdict, ModerationError> + Send + Sync + 'static,
    ) -> Self {
        Scripted {
            answer: Arc::new(answer),
            asked: Arc::default(),
        }
    }

    /// A webhook that redacts `word` wherever it sees it.
    pub(crate) fn redacting(word: &'static str) -> Self {
        Scripted::new(move |input| {
            Ok(Verdict::Redact {
                texts: input
                    .texts
                    .iter()
                    .map(|t| t.replace(word, "[NAME]"))
                    .collect(),
            })
        })
    }
}

impl Moderator for Scripted {
    fn moderate(
        &self,
        input: ModerationInput,
    ) -> BoxFuture<'static, Result<Verdict, ModerationError>> {
        self.asked.lock().unwrap().push(input.texts.clone());
        let answer = (self.answer)(&input);
        Box::pin(async move {
            tokio::task::yield_now().await;
            answer
        })
    }
}
