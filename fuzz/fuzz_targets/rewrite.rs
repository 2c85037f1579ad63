//! The body rewriter: the first byte picks the edits, the next eight the output limit; the
//! rest is the body. The output is JSON meaning the input plus the edits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_llm_policy::rewrite::Edits;
use tower_llm_policy_fuzz::checks;

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<9>() else {
        return;
    };
    let mut edits = Edits::default();
    edits.include_usage = head[0] & 1 == 1;
    if head[0] & 2 == 2 {
        let limit = u64::from_le_bytes(head[1..9].try_into().expect("eight bytes"));
        // Mostly small limits, as a policy sets them.
        edits.clamp_output = Some(if head[0] & 4 == 4 {
            limit
        } else {
            limit % 5000
        });
    }
    checks::check_rewrite(body, &edits);
});
