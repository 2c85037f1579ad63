//! Crate-private pieces exposed for the fuzz targets in `fuzz/` and the property tests (feature
//! `fuzzing`, hidden from the docs). Not part of the public API: no semver guarantees.

use bytes::Bytes;

use crate::error::PolicyError;
use crate::rewrite::Edits;

/// The body rewriter: `body` (a JSON object) with `edits` applied, as the layers apply them
/// before the request goes on.
pub fn rewrite_apply(body: &[u8], edits: &Edits) -> Result<Bytes, PolicyError> {
    crate::rewrite::apply(body, edits)
}

/// Response guards: `guard_response` with a plan made of these parts.
#[cfg(feature = "guards")]
pub use crate::guard::response::{guard_response_with, GuardBody};
