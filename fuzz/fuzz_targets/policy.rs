//! cargo fuzz target `policy`: see `flotilla_fuzz::checks::policy` for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::checks::policy(data));
