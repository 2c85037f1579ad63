//! The multipart reader, through the request view: structured forms (fields the view reads,
//! file parts, odd names and data, bare LFs, a missing closing delimiter, preamble and
//! epilogue). Never panics; a well-formed form is read as it was written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tower_llm_policy_fuzz::{checks, ArbForm};

fuzz_target!(|input: ArbForm| {
    let policy = checks::policy(input.aliases);
    checks::check_multipart(&input.into_form(), &policy);
});
