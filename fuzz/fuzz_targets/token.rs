//! cargo fuzz target `token`: see `flotilla_fuzz::checks::token` for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::checks::token(data));
