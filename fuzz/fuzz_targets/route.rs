//! cargo fuzz target `route`: see `flotilla_fuzz::checks::route` for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::checks::route(data));
