//! The usage scanner: the first byte picks the mode (SSE or JSON) and the usage bound, the
//! next eight give cut points; the rest is the response body. The usage found (and `[DONE]`)
//! is the same whether the body comes in one chunk, in those chunks, or byte by byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_llm_policy::audit::usage::ScanMode;
use tower_llm_policy_fuzz::checks;

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<9>() else {
        return;
    };
    let mode = if head[0] & 1 == 0 {
        ScanMode::Sse
    } else {
        ScanMode::Json
    };
    let max_usage = match (head[0] >> 1) & 3 {
        0 | 1 => None,
        2 => Some(64),
        _ => Some(usize::from(head[0] >> 3)),
    };
    let cuts: Vec<usize> = head[1..]
        .chunks(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
        .collect();
    checks::check_usage_chunking(mode, max_usage, body, &cuts);
});
