//! The fuzz corpus (`fuzz/corpus/<target>/`) replayed as an ordinary test, through the same
//! checks the cargo-fuzz targets run (`fuzz/src/checks.rs`, included verbatim), so CI needs
//! no nightly and every input a fuzzer once found interesting stays a regression test.

#[allow(dead_code, unreachable_pub)]
#[path = "../fuzz/src/checks.rs"]
mod checks;

#[test]
fn every_corpus_file_passes_its_target() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, check) in checks::TARGETS {
        let dir = root.join(name);
        let files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        assert!(!files.is_empty(), "corpus {} is empty", dir.display());
        for f in &files {
            let data = std::fs::read(f).expect("corpus file");
            let r = std::panic::catch_unwind(|| check(&data));
            assert!(r.is_ok(), "{name}: {} fails its check", f.display());
        }
        eprintln!("{name}: {} corpus inputs replayed", files.len());
    }
}
