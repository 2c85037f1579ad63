#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod alert;
pub mod audit;
pub mod body;
#[macro_use]
mod check;
pub mod body_limit;
pub mod client_ip;
pub mod endpoint;
pub mod error;
pub mod feature_block;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "guards")]
#[cfg_attr(docsrs, doc(cfg(feature = "guards")))]
pub mod guard;
pub mod key_auth;
pub mod keys;
#[cfg(feature = "metrics")]
#[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
pub mod metrics;
pub mod model;
pub mod model_allow_list;
pub mod policy;
#[cfg(feature = "postgres")]
#[cfg_attr(docsrs, doc(cfg(feature = "postgres")))]
pub mod postgres;
pub mod prompt_limit;
pub mod quota;
pub mod request;
pub mod rewrite;
pub mod tokens;

pub use audit::{AuditHandle, AuditLayer, AuditRecord, LogSink};
pub use body::{PolicyBody, ResponseBody};
pub use body_limit::{BodyLimit, BodyLimitLayer};
pub use client_ip::{ForwardedHeader, ResolveClientIp, ResolveClientIpLayer, TrustedProxies};
pub use endpoint::{Endpoint, Feature, FeatureSet, Route};
pub use error::{LayerName, PolicyError, Rejection};
pub use feature_block::{FeatureBlock, FeatureBlockLayer};
pub use key_auth::{ClientIp, KeyAuth, KeyAuthLayer};
pub use keys::{ApiKey, KeyDigest, KeyStore, MemoryKeyStore};
pub use model::{ModelAliases, ModelList, ModelName};
pub use model_allow_list::{ModelAllowList, ModelAllowListLayer};
pub use policy::Policy;
pub use prompt_limit::{OutputLimitMode, PromptLimit, PromptLimitLayer, PromptLimits};
pub use quota::{Quota, QuotaLayer};
pub use request::{BodyOptions, LlmRequest, Role};
