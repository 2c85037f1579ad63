//! The request view over any bytes: the first four bytes pick the method, the path, the
//! content type and the policy; the rest is the body. Never panics; when the parse succeeds,
//! the view's invariants hold (see `checks::check_request_view`).
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tower_llm_policy_fuzz::checks::{self, CONTENT_TYPES, METHODS, PATHS};

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let method = METHODS[head[0] as usize % METHODS.len()];
    let path = PATHS[head[1] as usize % PATHS.len()];
    let content_type = CONTENT_TYPES[head[2] as usize % CONTENT_TYPES.len()];
    let policy = checks::policy(head[3] & 1 == 1);
    let parts = checks::request_parts(method, path, content_type).expect("a valid head");
    checks::check_request_view(&parts, Bytes::copy_from_slice(body), &policy);
});
