//! tower-llm-policy: security and cost policy for OpenAI-compatible LLM APIs, as tower middleware.

pub mod pricing;
pub mod usage;
