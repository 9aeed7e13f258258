//! cargo fuzz target `digest`: see `flotilla_fuzz::checks::digest` for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::checks::digest(data));
