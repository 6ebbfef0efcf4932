//! Replays, on stable and without instrumentation, every committed input through its target:
//! the seed corpus (`corpus/<target>/`) and the crash inputs fuzzing found (`regressions/
//! <target>/`, each kept after its fix so that the bug cannot come back).

use std::path::{Path, PathBuf};

use super::seeds::seeds;

/// Every target, by the name of its folders and its `fuzz_targets/<name>.rs`.
const TARGETS: [(&str, fn(&[u8])); 6] = [
    ("presented_key", super::presented_key),
    ("page_token", super::page_token),
    ("jwt", super::jwt),
    ("requests", super::requests),
    ("webhook_target", super::webhook_target),
    ("grpc_server", super::grpc_server),
];

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a readable folder").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

fn replay(folder: &str) -> usize {
    let mut replayed = 0;
    for (target, run) in TARGETS {
        for file in files(&crate_dir().join(folder).join(target)) {
            let bytes = std::fs::read(&file).expect("a readable input");
            eprintln!("replaying {}", file.display());
            run(&bytes);
            replayed += 1;
        }
    }
    replayed
}

#[test]
fn seed_corpus_matches_the_seeds() {
    let write = std::env::var_os("FUZZ_WRITE_SEEDS").is_some();
    for seed in seeds() {
        let dir = crate_dir().join("corpus").join(seed.target);
        let path = dir.join(&seed.name);
        if write {
            std::fs::create_dir_all(&dir).expect("a corpus folder");
            std::fs::write(&path, &seed.bytes).expect("a written seed");
            continue;
        }
        let committed = std::fs::read(&path).unwrap_or_default();
        assert!(
            committed == seed.bytes,
            "{} differs from its seed: run FUZZ_WRITE_SEEDS=1 cargo test",
            path.display()
        );
    }
}

#[test]
fn seed_corpus_replays() {
    let replayed = replay("corpus");
    assert!(replayed >= seeds().len(), "only {replayed} seeds replayed");
}

#[test]
fn regressions_replay() {
    replay("regressions");
}

#[test]
fn every_target_has_seeds() {
    for (target, _) in TARGETS {
        assert!(
            seeds().iter().any(|seed| seed.target == target),
            "{target} has no seed"
        );
        assert!(
            crate_dir()
                .join("fuzz_targets")
                .join(format!("{target}.rs"))
                .is_file()
        );
    }
}
