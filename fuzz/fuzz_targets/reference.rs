//! cargo fuzz target `reference`: see `flotilla_fuzz::checks::reference` for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::checks::reference(data));
