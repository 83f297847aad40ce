//! Replaying a fuzz corpus as a regular test: compiled into each crate's
//! `tests/fuzz_corpus.rs` with `#[path]`, next to that crate's checks.

use std::path::Path;

/// Runs `check` on every file of `fuzz/corpus/<target>/`, in name order, naming each
/// file on stderr first so a failing one can be fed to the target.
pub fn replay(manifest_dir: &str, target: &str, mut check: impl FnMut(&[u8])) {
    // The root package has fuzz/ beside its manifest; rules/ and proxy/ one level up.
    let manifest = Path::new(manifest_dir);
    let fuzz = if manifest.join("fuzz").is_dir() {
        manifest.join("fuzz")
    } else {
        manifest.join("../fuzz")
    };
    let dir = fuzz.join("corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus in {}", dir.display());
    for file in files {
        let data = std::fs::read(&file).unwrap();
        eprintln!("{}", file.display());
        check(&data);
    }
}
