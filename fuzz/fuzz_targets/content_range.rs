//! cargo fuzz target `content_range`: see `flotilla_fuzz::checks::content_range` for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::checks::content_range(data));
