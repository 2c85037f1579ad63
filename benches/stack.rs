//! Benchmarks of the policy stack (filled in below).
fn main() {}
