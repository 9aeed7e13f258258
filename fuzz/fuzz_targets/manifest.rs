//! cargo fuzz target `manifest`: see `flotilla_fuzz::checks::manifest` for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::checks::manifest(data));
