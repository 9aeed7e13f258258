//! The fuzz targets' bodies, kept in `checks` so the stable test suite can replay the
//! corpus through exactly the same code (`tests/fuzz_corpus.rs` includes that file).

pub mod checks;
