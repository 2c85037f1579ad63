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

use http::Method;

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
    /// Anything else.
    Other,
}

impl Endpoint {
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
            Endpoint::Other => return None,
        })
    }

    /// Whether a request to this endpoint with this method may carry a body with a `model` (and
    /// prompt) that the policy layers read: every `POST` to an inference endpoint, and `POST`s
    /// to realtime sessions, fine-tuning jobs and assistants/threads/runs, whose bodies may
    /// name a model too.
    pub fn has_model_body(&self, method: &Method) -> bool {
        *method == Method::POST
            && (self.model_required()
                || matches!(
                    self,
                    Endpoint::ImageGeneration
                        | Endpoint::ImageEdit
                        | Endpoint::ImageVariation
                        | Endpoint::Moderations
                        | Endpoint::Realtime
                        | Endpoint::FineTuning
                        | Endpoint::Assistants
                ))
    }

    /// Whether a `POST` to this endpoint must name a model (no documented default): a request
    /// without one is refused by the model checks rather than passed on.
    pub fn model_required(&self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions
                | Endpoint::Completions
                | Endpoint::Embeddings
                | Endpoint::AudioSpeech
                | Endpoint::AudioTranscription
                | Endpoint::AudioTranslation
                | Endpoint::Responses
        )
    }

    /// Whether the body is `multipart/form-data` (the model is a form field).
    pub fn is_multipart(&self) -> bool {
        matches!(
            self,
            Endpoint::ImageEdit
                | Endpoint::ImageVariation
                | Endpoint::AudioTranscription
                | Endpoint::AudioTranslation
        )
    }

    /// The model OpenAI documents as the default when a request omits `model`.
    pub fn default_model(&self) -> Option<&'static str> {
        match self {
            Endpoint::ImageGeneration | Endpoint::ImageEdit | Endpoint::ImageVariation => {
                Some("dall-e-2")
            }
            Endpoint::Moderations => Some("omni-moderation-latest"),
            _ => None,
        }
    }
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
}

impl Route {
    /// Classifies a request from its URI (the method matters only to
    /// [`Endpoint::has_model_body`]).
    pub fn classify(uri: &http::Uri) -> Route {
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
        let (api, deployment) = split_api(segments);
        let mut route = Route {
            endpoint: Endpoint::Other,
            path_model: None,
            deployment,
        };
        let Some(first) = api.first() else {
            return route;
        };
        let second = api.get(1).map(|s| s.as_ref());
        route.endpoint = match (first.as_ref(), second, api.len()) {
            ("chat", Some("completions"), _) => Endpoint::ChatCompletions,
            ("completions", None, _) => Endpoint::Completions,
            ("embeddings", None, _) => Endpoint::Embeddings,
            ("images", Some("generations"), 2) => Endpoint::ImageGeneration,
            ("images", Some("edits"), 2) => Endpoint::ImageEdit,
            ("images", Some("variations"), 2) => Endpoint::ImageVariation,
            ("audio", Some("speech"), 2) => Endpoint::AudioSpeech,
            ("audio", Some("transcriptions"), 2) => Endpoint::AudioTranscription,
            ("audio", Some("translations"), 2) => Endpoint::AudioTranslation,
            ("moderations", None, _) => Endpoint::Moderations,
            // Conversations hold Responses API state.
            ("responses" | "conversations", _, _) => Endpoint::Responses,
            ("files" | "uploads", _, _) => Endpoint::Files,
            ("batches", _, _) => Endpoint::Batches,
            ("fine_tuning" | "fine-tunes" | "fine_tunes", _, _) => Endpoint::FineTuning,
            ("models", _, _) => {
                if api.len() >= 2 {
                    // Model ids may contain '/', e.g. fine-tuned or provider-prefixed names.
                    let rest: Vec<&str> = api[1..].iter().map(AsRef::as_ref).collect();
                    route.path_model = Some(rest.join("/"));
                }
                Endpoint::Models
            }
            ("realtime", _, _) => {
                route.path_model = query_param(query, "model");
                if route.deployment.is_none() {
                    // Azure OpenAI names the deployment in the query:
                    // `/openai/realtime?api-version=...&deployment={name}`.
                    route.deployment = query_param(query, "deployment");
                }
                Endpoint::Realtime
            }
            ("assistants" | "threads" | "vector_stores", _, _) => Endpoint::Assistants,
            _ => Endpoint::Other,
        };
        route
    }
}

/// Splits the normalised path into the API part (after `v1`, or after an Azure deployment).
///
/// Whichever of `v1` and `deployments/{name}` comes first decides, so a deployment may be
/// named `v1`. Without either, a leading `openai` segment is a prefix too (Azure's
/// `/openai/realtime`).
fn split_api<S: AsRef<str>>(segments: &[S]) -> (&[S], Option<String>) {
    for (i, segment) in segments.iter().enumerate() {
        if segment.as_ref() == "v1" {
            return (&segments[i + 1..], None);
        }
        if segment.as_ref() == "deployments" {
            if let Some(name) = segments.get(i + 1) {
                return (&segments[i + 2..], Some(name.as_ref().to_owned()));
            }
        }
    }
    match segments.split_first() {
        Some((first, rest)) if first.as_ref() == "openai" => (rest, None),
        // A bare path (`/chat/completions`), as some clients use against a base URL without
        // /v1.
        _ => (segments, None),
    }
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

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| decode_query_value(v))
    })
}

fn decode_query_value(v: &str) -> String {
    let replaced = v.replace('+', " ");
    decode_segment(&replaced).into_owned()
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
}

impl Feature {
    /// Every feature.
    pub const ALL: [Feature; 15] = [
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
#[error("unknown feature `{0}` (known: chat, completions, embeddings, images, image_generation, image_edits, audio, audio_speech, audio_transcription, moderations, responses, files, batches, fine_tuning, models, realtime, assistants)")]
pub struct UnknownFeature(pub String);
