//! cargo fuzz target `htpasswd`: see `flotilla_fuzz::checks::htpasswd` for what it asserts.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::checks::htpasswd(data));
