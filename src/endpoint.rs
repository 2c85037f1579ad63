//! Endpoint classification: which OpenAI API a request is for, from its method and path.
//!
//! The path is matched after normalisation, so a client cannot slip past a policy with a
//! path the upstream would still route: segments are compared case-insensitively, empty and
//! `.` segments are dropped, `..` is resolved, percent-encoded characters are decoded, and a
//! trailing slash is ignored. Anything before a `/v1` segment is a prefix
//! (`/openai/v1/chat/completions`), and Azure-style deployment paths
//! (`/openai/deployments/{name}/chat/completions`) are classified by what follows the
//! deployment name, which is kept as [`Route::deployment`].

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

/// The OpenAI API a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    ChatCompletions,
    /// `/v1/completions` (legacy).
    Completions,
    /// `/v1/embeddings`.
    Embeddings,
    /// `/v1/images/generations`.
    ImageGeneration,
    /// `/v1/images/edits`.
    ImageEdit,
    /// `/v1/images/variations`.
    ImageVariation,
    /// `/v1/audio/speech`.
    AudioSpeech,
    /// `/v1/audio/transcriptions`.
    AudioTranscription,
    /// `/v1/audio/translations`.
    AudioTranslation,
    /// `/v1/moderations`.
    Moderations,
    /// `/v1/responses` and its sub-resources, and `/v1/conversations`.
    Responses,
    /// `/v1/files` and `/v1/uploads`.
    Files,
    /// `/v1/batches`.
    Batches,
    /// `/v1/fine_tuning/...`.
    FineTuning,
    /// `/v1/models` and `/v1/models/{model}`.
    Models,
    /// `/v1/realtime/...`.
    Realtime,
    /// `/v1/assistants`, `/v1/threads`, `/v1/vector_stores`.
    Assistants,
    /// `/v1/videos` and its sub-resources.
    Videos,
    /// `/v1/evals` and its runs.
    Evals,
    /// Anything else.
    Other,
}

impl Endpoint {
    /// Whether the endpoint's successful responses report their token usage (what the audit
    /// record prices and a spend cap settles from).
    pub(crate) fn reports_usage(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Embeddings
                | Endpoint::Responses
        )
    }

    /// A stable snake_case name for logs and audit records.
    pub fn as_str(&self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::ImageGeneration => "image_generation",
            Endpoint::ImageEdit => "image_edit",
            Endpoint::ImageVariation => "image_variation",
            Endpoint::AudioSpeech => "audio_speech",
            Endpoint::AudioTranscription => "audio_transcription",
            Endpoint::AudioTranslation => "audio_translation",
            Endpoint::Moderations => "moderations",
            Endpoint::Responses => "responses",
            Endpoint::Files => "files",
            Endpoint::Batches => "batches",
            Endpoint::FineTuning => "fine_tuning",
            Endpoint::Models => "models",
            Endpoint::Realtime => "realtime",
            Endpoint::Assistants => "assistants",
            Endpoint::Videos => "videos",
            Endpoint::Evals => "evals",
            Endpoint::Other => "other",
        }
    }

    /// The feature this endpoint belongs to (`None` for [`Endpoint::Other`]).
    pub fn feature(&self) -> Option<Feature> {
        Some(match self {
            Endpoint::ChatCompletions => Feature::Chat,
            Endpoint::Completions => Feature::Completions,
            Endpoint::Embeddings => Feature::Embeddings,
            Endpoint::ImageGeneration => Feature::ImageGeneration,
            Endpoint::ImageEdit | Endpoint::ImageVariation => Feature::ImageEdits,
            Endpoint::AudioSpeech => Feature::AudioSpeech,
            Endpoint::AudioTranscription | Endpoint::AudioTranslation => {
                Feature::AudioTranscription
            }
            Endpoint::Moderations => Feature::Moderations,
            Endpoint::Responses => Feature::Responses,
            Endpoint::Files => Feature::Files,
            Endpoint::Batches => Feature::Batches,
            Endpoint::FineTuning => Feature::FineTuning,
            Endpoint::Models => Feature::Models,
            Endpoint::Realtime => Feature::Realtime,
            Endpoint::Assistants => Feature::Assistants,
            Endpoint::Videos => Feature::Videos,
            Endpoint::Evals => Feature::Evals,
            Endpoint::Other => return None,
        })
    }
}

/// What the body of a request to a route (sent with `POST`, `PUT` or `PATCH`) means for the
/// model that runs: read by [`LlmRequest`](crate::LlmRequest), checked by the layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BodyModel {
    /// The body selects no model (a sub-resource such as `/v1/responses/{id}/cancel`, files,
    /// vector stores).
    None,
    /// The body must name the model; without one the request is refused.
    Required,
    /// The body may name a model; without one, none runs (modifying an assistant, counting
    /// input tokens, running a grader that needs no model).
    Optional,
    /// A body without a model runs this documented default, which the checks see.
    Default(&'static str),
    /// A body without a model runs one the request does not show: an assistant's (thread
    /// runs), a source video's (remix), a session default the API does not document. A key
    /// with model limits must name the model, or is refused (fail closed).
    Unseen,
    /// The body names an input file of requests (`POST /v1/batches`), each with its own model
    /// and prompt, stored upstream where the policy cannot read it: a layer that limits the key
    /// refuses it.
    Batch,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The result of classifying a request's method and path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// A model named in the path: `GET /v1/models/{model}`, or the `model` query parameter of
    /// `/v1/realtime`.
    pub path_model: Option<String>,
    /// The deployment name of an Azure-style path (`/openai/deployments/{name}/...`).
    pub deployment: Option<String>,
    /// What a body sent here means for the model ([`BodyModel`]).
    pub body_model: BodyModel,
    /// The realtime WebSocket path (`GET /v1/realtime?model=`): the query selects the model.
    query_selects_model: bool,
    /// Why the head is ambiguous and must be refused (see [`Route::refusal`]).
    refusal: Option<&'static str>,
}

impl Route {
    /// Why this request's path or query is ambiguous, if it is: an upstream could read it
    /// otherwise than the policy does, so the layers refuse it (400 `ambiguous_request`) rather
    /// than guess. Percent-encoded `/`, `\` or `.`, a backslash, a NUL, dot segments (`.`,
    /// `..`), and on realtime paths a `model` or `deployment` query parameter sent twice,
    /// with an encoded name, or with an encoded value.
    pub fn refusal(&self) -> Option<&'static str> {
        self.refusal
    }

    /// Whether the query of a `GET` to this route selects the model that runs (the realtime
    /// WebSocket, `?model=`).
    pub fn query_selects_model(&self) -> bool {
        self.query_selects_model
    }

    /// Classifies a request from its URI (the method matters only to whether a body is read:
    /// see [`BodyModel`]).
    pub fn classify(uri: &http::Uri) -> Route {
        let mut route = Self::classify_path(uri);
        if route.refusal.is_none() {
            route.refusal = ambiguous_path(uri.path());
        }
        route
    }

    fn classify_path(uri: &http::Uri) -> Route {
        let path = uri.path();
        // The common case, a plain lowercase path, needs no normalising and no allocation.
        let plain = path.len() <= 128
            && !path.contains("//")
            && path.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'/' | b'_' | b'-')
            });
        if plain {
            let mut buf = [""; 12];
            let mut n = 0;
            for segment in path.split('/').filter(|s| !s.is_empty()) {
                if n == buf.len() {
                    return Self::classify_segments(&normalise(path), uri.query());
                }
                buf[n] = segment;
                n += 1;
            }
            return Self::classify_segments(&buf[..n], uri.query());
        }
        Self::classify_segments(&normalise(path), uri.query())
    }

    fn classify_segments<S: AsRef<str>>(segments: &[S], query: Option<&str>) -> Route {
        let (api, deployment, versioned) = split_api(segments);
        let mut route = Route {
            endpoint: Endpoint::Other,
            path_model: None,
            deployment,
            body_model: BodyModel::Unseen,
            query_selects_model: false,
            refusal: None,
        };
        let Some(first) = api.first() else {
            return route;
        };
        let at = |i: usize| api.get(i).map(|s| s.as_ref());
        let n = api.len();
        use BodyModel as M;
        use Endpoint as E;
        let (endpoint, body_model) = match (first.as_ref(), at(1), n) {
            ("chat", Some("completions"), 2) => (E::ChatCompletions, M::Required),
            // Stored completions: `/chat/completions/{id}` and its messages.
            ("chat", Some("completions"), _) => (E::ChatCompletions, M::None),
            ("completions", None, _) => (E::Completions, M::Required),
            ("embeddings", None, _) => (E::Embeddings, M::Required),
            ("images", Some("generations"), 2) => (E::ImageGeneration, M::Default("dall-e-2")),
            ("images", Some("edits"), 2) => (E::ImageEdit, M::Default("dall-e-2")),
            ("images", Some("variations"), 2) => (E::ImageVariation, M::Default("dall-e-2")),
            ("audio", Some("speech"), 2) => (E::AudioSpeech, M::Required),
            ("audio", Some("transcriptions"), 2) => (E::AudioTranscription, M::Required),
            ("audio", Some("translations"), 2) => (E::AudioTranslation, M::Required),
            // Custom voices and their consents belong to text to speech.
            ("audio", Some("voices" | "voice_consents"), _) => (E::AudioSpeech, M::None),
            ("moderations", None, _) => (E::Moderations, M::Default("omni-moderation-latest")),
            ("responses", None, _) => (E::Responses, M::Required),
            ("responses", Some("compact"), 2) => (E::Responses, M::Required),
            // Counting input tokens names a model but runs none.
            ("responses", Some("input_tokens"), 2) => (E::Responses, M::Optional),
            // A stored response, its cancel and input items; conversations hold Responses API
            // state and run no model.
            ("responses" | "conversations", _, _) => (E::Responses, M::None),
            ("files" | "uploads", _, _) => (E::Files, M::None),
            ("batches", None, _) => (E::Batches, M::Batch),
            ("batches", _, _) => (E::Batches, M::None),
            ("fine_tuning" | "fine-tunes" | "fine_tunes", Some("jobs"), 2) => {
                (E::FineTuning, M::Required)
            }
            ("fine-tunes" | "fine_tunes", None, _) => (E::FineTuning, M::Required),
            // Graders (`/fine_tuning/alpha/graders/run`) name their models inside `grader`.
            ("fine_tuning", Some("alpha"), _) => (E::FineTuning, M::Optional),
            ("fine_tuning" | "fine-tunes" | "fine_tunes", _, _) => (E::FineTuning, M::None),
            ("models", _, _) => {
                if n >= 2 {
                    // Model ids may contain '/', e.g. fine-tuned or provider-prefixed names.
                    let rest: Vec<&str> = api[1..].iter().map(AsRef::as_ref).collect();
                    route.path_model = Some(rest.join("/"));
                }
                (E::Models, M::None)
            }
            ("realtime", None, _) => {
                // The WebSocket: `GET /v1/realtime?model=`, or Azure's
                // `/openai/realtime?deployment=` (only on a path without `/v1`: OpenAI ignores
                // a `deployment` parameter and runs the model it names).
                route.query_selects_model = true;
                let (model, refusal) = strict_query_param(query, "model");
                route.path_model = model;
                route.refusal = refusal;
                if route.deployment.is_none() && !versioned {
                    let (deployment, refusal) = strict_query_param(query, "deployment");
                    route.deployment = deployment;
                    route.refusal = route.refusal.or(refusal);
                }
                (E::Realtime, M::Unseen)
            }
            ("realtime", Some("calls"), 3) => (E::Realtime, M::None),
            ("realtime", Some("calls"), 4) if at(3) != Some("accept") => (E::Realtime, M::None),
            // Sessions, client secrets, calls and their acceptance: the session's model, else
            // a default the API does not document.
            ("realtime", _, _) => (E::Realtime, M::Unseen),
            ("assistants", None, _) => (E::Assistants, M::Required),
            ("assistants", Some(_), 2) => (E::Assistants, M::Optional),
            // A run without `model` runs its assistant's model.
            ("threads", Some("runs"), 2) => (E::Assistants, M::Unseen),
            ("threads", Some(_), 3) if at(2) == Some("runs") => (E::Assistants, M::Unseen),
            ("assistants" | "threads" | "vector_stores", _, _) => (E::Assistants, M::None),
            ("videos", None, _) => (E::Videos, M::Default("sora-2")),
            // Edits, extensions and remixes run the source video's model.
            ("videos", Some("edits" | "extensions"), 2) => (E::Videos, M::Unseen),
            ("videos", Some(_), 3) if at(2) == Some("remix") => (E::Videos, M::Unseen),
            ("videos", _, _) => (E::Videos, M::None),
            // Testing criteria may be model graders; a run's data source names its model.
            ("evals", None, _) => (E::Evals, M::Optional),
            ("evals", Some(_), 3) if at(2) == Some("runs") => (E::Evals, M::Unseen),
            ("evals", _, _) => (E::Evals, M::None),
            // Known endpoints that run no model.
            ("containers" | "skills" | "content_provenance_checks", _, _) => (E::Other, M::None),
            // Anything else (ChatKit sessions run a workflow's models): the model is unseen.
            _ => (E::Other, M::Unseen),
        };
        route.endpoint = endpoint;
        route.body_model = body_model;
        route
    }
}

/// Splits the normalised path into the API part (after `v1`, or after an Azure deployment).
///
/// Whichever of `v1` and `deployments/{name}` comes first decides, so a deployment may be
/// named `v1`. Without either, a leading `openai` segment is a prefix too (Azure's
/// `/openai/realtime`).
///
/// The third value tells whether the path had a `v1` segment.
fn split_api<S: AsRef<str>>(segments: &[S]) -> (&[S], Option<String>, bool) {
    for (i, segment) in segments.iter().enumerate() {
        if segment.as_ref() == "v1" {
            return (&segments[i + 1..], None, true);
        }
        if segment.as_ref() == "deployments" {
            if let Some(name) = segments.get(i + 1) {
                return (&segments[i + 2..], Some(name.as_ref().to_owned()), false);
            }
        }
    }
    match segments.split_first() {
        Some((first, rest)) if first.as_ref() == "openai" => (rest, None, false),
        // A bare path (`/chat/completions`), as some clients use against a base URL without
        // /v1.
        _ => (segments, None, false),
    }
}

/// Why a raw path is ambiguous: the policy classifies the normalised path, and an upstream
/// that decodes or resolves differently would route it elsewhere.
fn ambiguous_path(path: &str) -> Option<&'static str> {
    let bytes = path.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\\' {
            return Some("The request path contains a backslash.");
        }
        if b == b'%' {
            let decoded = bytes
                .get(i + 1..i + 3)
                .and_then(|h| Some(hex_digit(h[0])? << 4 | hex_digit(h[1])?));
            match decoded {
                Some(b'/' | b'\\' | b'.' | 0) => {
                    return Some(
                        "The request path contains a percent-encoded `/`, `\\`, `.` or NUL; send the plain path.",
                    )
                }
                None => return Some("The request path contains a malformed percent-encoding."),
                _ => {}
            }
        }
    }
    if path.split('/').any(|s| s == "." || s == "..") {
        return Some("The request path contains a `.` or `..` segment; send the resolved path.");
    }
    None
}

/// Splits a path into lowercase, percent-decoded segments with dot segments resolved.
fn normalise(path: &str) -> Vec<Cow<'_, str>> {
    let mut out: Vec<Cow<'_, str>> = Vec::with_capacity(6);
    for raw in path.split('/') {
        let seg = decode_segment(raw);
        match seg.as_ref() {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            _ => out.push(seg),
        }
    }
    out
}

fn decode_segment(raw: &str) -> Cow<'_, str> {
    let needs_work = raw.bytes().any(|b| b == b'%' || b.is_ascii_uppercase());
    if !needs_work {
        return Cow::Borrowed(raw);
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex_digit(bytes[i + 1]), hex_digit(bytes[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    let mut s = String::from_utf8_lossy(&out).into_owned();
    s.make_ascii_lowercase();
    Cow::Owned(s)
}

/// The value of one hexadecimal digit.
pub(crate) fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The value of the query parameter `name`, read strictly: a parameter sent twice, whose name
/// is percent-encoded or differs only in case, or whose value is percent-encoded or holds a
/// `+`, is ambiguous (upstreams decode and fold differently) and gives a refusal instead.
fn strict_query_param(query: Option<&str>, name: &str) -> (Option<String>, Option<&'static str>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut found: Option<&str> = None;
    for pair in query.split(['&', ';']) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            if found.is_some() {
                return (
                    None,
                    Some("A query parameter that selects the model is sent twice."),
                );
            }
            found = Some(v);
        } else if decode_segment(&k.replace('+', " ")).trim() == name {
            return (
                None,
                Some(
                    "A query parameter that selects the model is percent-encoded or not lowercase.",
                ),
            );
        }
    }
    match found {
        Some(v) if v.contains(['%', '+']) => (
            None,
            Some("A query parameter that selects the model has a percent-encoded value."),
        ),
        Some("") => (None, None),
        Some(v) => (Some(v.to_owned()), None),
        None => (None, None),
    }
}

/// A feature that can be blocked: one or more endpoints.
///
/// Names (for configuration) are snake_case; the groups `images` (generation, edits and
/// variations) and `audio` (speech, transcription and translation) expand to several features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Feature {
    /// `chat`: chat completions.
    Chat,
    /// `completions`: legacy completions.
    Completions,
    /// `embeddings`.
    Embeddings,
    /// `image_generation`.
    ImageGeneration,
    /// `image_edits`: image edits and variations.
    ImageEdits,
    /// `audio_speech`: text to speech.
    AudioSpeech,
    /// `audio_transcription`: transcriptions and translations.
    AudioTranscription,
    /// `moderations`.
    Moderations,
    /// `responses`: the Responses API.
    Responses,
    /// `files`: files and uploads.
    Files,
    /// `batches`.
    Batches,
    /// `fine_tuning`.
    FineTuning,
    /// `models`: listing and retrieving models.
    Models,
    /// `realtime`.
    Realtime,
    /// `assistants`: assistants, threads and vector stores.
    Assistants,
    /// `videos`: video generation, edits and remixes.
    Videos,
    /// `evals`: evaluations and their runs.
    Evals,
}

impl Feature {
    /// Every feature.
    pub const ALL: [Feature; 17] = [
        Feature::Chat,
        Feature::Completions,
        Feature::Embeddings,
        Feature::ImageGeneration,
        Feature::ImageEdits,
        Feature::AudioSpeech,
        Feature::AudioTranscription,
        Feature::Moderations,
        Feature::Responses,
        Feature::Files,
        Feature::Batches,
        Feature::FineTuning,
        Feature::Models,
        Feature::Realtime,
        Feature::Assistants,
        Feature::Videos,
        Feature::Evals,
    ];

    /// The configuration name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Feature::Chat => "chat",
            Feature::Completions => "completions",
            Feature::Embeddings => "embeddings",
            Feature::ImageGeneration => "image_generation",
            Feature::ImageEdits => "image_edits",
            Feature::AudioSpeech => "audio_speech",
            Feature::AudioTranscription => "audio_transcription",
            Feature::Moderations => "moderations",
            Feature::Responses => "responses",
            Feature::Files => "files",
            Feature::Batches => "batches",
            Feature::FineTuning => "fine_tuning",
            Feature::Models => "models",
            Feature::Realtime => "realtime",
            Feature::Assistants => "assistants",
            Feature::Videos => "videos",
            Feature::Evals => "evals",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`Feature`]s, parsed from names and group names.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FeatureSet(u32);

impl FeatureSet {
    /// The empty set.
    pub const fn empty() -> Self {
        FeatureSet(0)
    }

    /// Whether the set holds `feature`.
    pub fn contains(&self, feature: Feature) -> bool {
        self.0 & feature.bit() != 0
    }

    /// Adds a feature.
    pub fn insert(&mut self, feature: Feature) {
        self.0 |= feature.bit();
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// The union of two sets.
    #[must_use]
    pub fn union(self, other: FeatureSet) -> FeatureSet {
        FeatureSet(self.0 | other.0)
    }

    /// The features in the set.
    pub fn iter(&self) -> impl Iterator<Item = Feature> + '_ {
        Feature::ALL.into_iter().filter(|f| self.contains(*f))
    }

    /// Adds a feature or group by name (see [`Feature`]).
    pub fn insert_name(&mut self, name: &str) -> Result<(), UnknownFeature> {
        let name = name.trim().to_ascii_lowercase().replace('-', "_");
        let group: &[Feature] = match name.as_str() {
            "images" | "image" => &[Feature::ImageGeneration, Feature::ImageEdits],
            "audio" => &[Feature::AudioSpeech, Feature::AudioTranscription],
            "image_variations" => &[Feature::ImageEdits],
            "speech" => &[Feature::AudioSpeech],
            "audio_transcriptions" | "audio_translation" | "audio_translations" => {
                &[Feature::AudioTranscription]
            }
            "chat_completions" => &[Feature::Chat],
            other => {
                let found = Feature::ALL
                    .into_iter()
                    .find(|f| f.as_str() == other)
                    .ok_or_else(|| UnknownFeature(other.to_owned()))?;
                self.insert(found);
                return Ok(());
            }
        };
        for f in group {
            self.insert(*f);
        }
        Ok(())
    }
}

impl FromIterator<Feature> for FeatureSet {
    fn from_iter<I: IntoIterator<Item = Feature>>(iter: I) -> Self {
        let mut set = FeatureSet::empty();
        for f in iter {
            set.insert(f);
        }
        set
    }
}

impl fmt::Debug for FeatureSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl FromStr for FeatureSet {
    type Err = UnknownFeature;

    /// Parses a comma-separated list of feature names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut set = FeatureSet::empty();
        for name in s.split(',').filter(|n| !n.trim().is_empty()) {
            set.insert_name(name)?;
        }
        Ok(set)
    }
}

impl<'de> serde::Deserialize<'de> for FeatureSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        let mut set = FeatureSet::empty();
        for name in &names {
            set.insert_name(name).map_err(serde::de::Error::custom)?;
        }
        Ok(set)
    }
}

impl serde::Serialize for FeatureSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(|f| f.as_str()))
    }
}

/// A feature name that is not known.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown feature `{0}` (known: chat, completions, embeddings, images, image_generation, image_edits, audio, audio_speech, audio_transcription, moderations, responses, files, batches, fine_tuning, models, realtime, assistants, videos, evals)")]
pub struct UnknownFeature(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str) -> Route {
        Route::classify(&path.parse().unwrap())
    }

    #[test]
    fn every_route_has_its_endpoint_and_body_model() {
        use BodyModel as M;
        use Endpoint as E;
        let cases: &[(&str, Endpoint, BodyModel)] = &[
            ("/v1/chat/completions", E::ChatCompletions, M::Required),
            ("/v1/chat/completions/c1", E::ChatCompletions, M::None),
            (
                "/v1/chat/completions/c1/messages",
                E::ChatCompletions,
                M::None,
            ),
            ("/v1/completions", E::Completions, M::Required),
            ("/v1/embeddings", E::Embeddings, M::Required),
            (
                "/v1/images/generations",
                E::ImageGeneration,
                M::Default("dall-e-2"),
            ),
            ("/v1/images/edits", E::ImageEdit, M::Default("dall-e-2")),
            (
                "/v1/images/variations",
                E::ImageVariation,
                M::Default("dall-e-2"),
            ),
            ("/v1/audio/speech", E::AudioSpeech, M::Required),
            (
                "/v1/audio/transcriptions",
                E::AudioTranscription,
                M::Required,
            ),
            ("/v1/audio/translations", E::AudioTranslation, M::Required),
            ("/v1/audio/voices", E::AudioSpeech, M::None),
            ("/v1/audio/voice_consents/v1", E::AudioSpeech, M::None),
            (
                "/v1/moderations",
                E::Moderations,
                M::Default("omni-moderation-latest"),
            ),
            ("/v1/responses", E::Responses, M::Required),
            ("/v1/responses/compact", E::Responses, M::Required),
            ("/v1/responses/input_tokens", E::Responses, M::Optional),
            ("/v1/responses/r1/cancel", E::Responses, M::None),
            ("/v1/conversations", E::Responses, M::None),
            ("/v1/files", E::Files, M::None),
            ("/v1/uploads/u1/parts", E::Files, M::None),
            ("/v1/batches", E::Batches, M::Batch),
            ("/v1/batches/b1/cancel", E::Batches, M::None),
            ("/v1/fine_tuning/jobs", E::FineTuning, M::Required),
            ("/v1/fine-tunes", E::FineTuning, M::Required),
            (
                "/v1/fine_tuning/alpha/graders/run",
                E::FineTuning,
                M::Optional,
            ),
            ("/v1/fine_tuning/jobs/j1/cancel", E::FineTuning, M::None),
            ("/v1/models", E::Models, M::None),
            ("/v1/realtime", E::Realtime, M::Unseen),
            ("/v1/realtime/client_secrets", E::Realtime, M::Unseen),
            ("/v1/realtime/calls", E::Realtime, M::Unseen),
            ("/v1/realtime/calls/c1", E::Realtime, M::None),
            ("/v1/realtime/calls/c1/accept", E::Realtime, M::Unseen),
            ("/v1/realtime/calls/c1/hangup", E::Realtime, M::None),
            ("/v1/assistants", E::Assistants, M::Required),
            ("/v1/assistants/a1", E::Assistants, M::Optional),
            ("/v1/threads", E::Assistants, M::None),
            ("/v1/threads/runs", E::Assistants, M::Unseen),
            ("/v1/threads/t1/runs", E::Assistants, M::Unseen),
            ("/v1/threads/t1/messages", E::Assistants, M::None),
            ("/v1/threads/t1/runs/r1/cancel", E::Assistants, M::None),
            ("/v1/vector_stores", E::Assistants, M::None),
            ("/v1/videos", E::Videos, M::Default("sora-2")),
            ("/v1/videos/edits", E::Videos, M::Unseen),
            ("/v1/videos/extensions", E::Videos, M::Unseen),
            ("/v1/videos/v1/remix", E::Videos, M::Unseen),
            ("/v1/videos/v1", E::Videos, M::None),
            ("/v1/evals", E::Evals, M::Optional),
            ("/v1/evals/e1/runs", E::Evals, M::Unseen),
            ("/v1/evals/e1", E::Evals, M::None),
            ("/v1/containers", E::Other, M::None),
            ("/v1/skills/s1", E::Other, M::None),
            ("/v1/chatkit/sessions", E::Other, M::Unseen),
            ("/v1/something/new", E::Other, M::Unseen),
        ];
        for (path, endpoint, body_model) in cases {
            let r = route(path);
            assert_eq!(
                (r.endpoint, r.body_model),
                (*endpoint, *body_model),
                "{path}"
            );
            assert_eq!(r.refusal(), None, "{path}");
        }
        assert!(route("/v1/realtime?model=m").query_selects_model());
        assert!(!route("/v1/realtime/client_secrets").query_selects_model());
    }

    #[test]
    fn names_are_stable_and_displayed() {
        for (endpoint, name) in [
            (Endpoint::ChatCompletions, "chat_completions"),
            (Endpoint::AudioTranslation, "audio_translation"),
            (Endpoint::Videos, "videos"),
            (Endpoint::Evals, "evals"),
            (Endpoint::Other, "other"),
        ] {
            assert_eq!(endpoint.as_str(), name);
            assert_eq!(endpoint.to_string(), name);
        }
        for feature in Feature::ALL {
            let set: FeatureSet = feature.as_str().parse().unwrap();
            assert_eq!(set.iter().collect::<Vec<_>>(), [feature]);
            assert_eq!(feature.to_string(), feature.as_str());
        }
        assert_eq!(Endpoint::Videos.feature(), Some(Feature::Videos));
        assert_eq!(Endpoint::Evals.feature(), Some(Feature::Evals));
        assert_eq!(Endpoint::Other.feature(), None);
    }

    #[test]
    fn ambiguous_paths_and_queries_have_a_refusal() {
        for path in [
            "/v1/chat%2Fcompletions",
            "/v1/chat%2fcompletions",
            "/v1/chat/%2E%2E/x",
            "/v1/chat/completions%5C",
            "/v1/chat/completions%00",
            "/v1/chat/completions%zz",
            "/v1/chat/completions%2",
            "/v1/./chat/completions",
            "/v1/x/../chat/completions",
            "/v1\\chat",
            "/v1/realtime?model=a&model=b",
            "/v1/realtime?model=a;model=b",
            "/v1/realtime?MODEL=a",
            "/v1/realtime?m%6Fdel=a",
            "/v1/realtime?model=a%2Db",
            "/v1/realtime?model=a+b",
            "/openai/realtime?deployment=a&deployment=b",
        ] {
            assert!(route(path).refusal().is_some(), "{path}");
        }
        for path in [
            "/v1/models/ft%3Agpt-4o",
            "/v1/realtime?model=gpt-realtime&api-version=1",
            "/v1/realtime?model=",
            "/v1/chat/completions?x=%2F",
            "/v1/models/gpt-4.1",
        ] {
            assert_eq!(route(path).refusal(), None, "{path}");
        }
        // `deployment` is Azure's only on paths without /v1.
        assert_eq!(route("/v1/realtime?deployment=a").deployment, None);
        assert_eq!(
            route("/openai/realtime?deployment=a").deployment.as_deref(),
            Some("a")
        );
        assert_eq!(route("/v1/realtime?model=").path_model, None);
        assert_eq!(
            route("/v1/realtime?x=1&model=m").path_model.as_deref(),
            Some("m")
        );
    }
}
