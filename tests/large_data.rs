//! Data larger than memory: `data prepare` streams its input and `train` reads token files
//! through a memory map, so their peak memory does not grow with the corpus and stays well
//! below it.
//!
//! The allocator is told to return freed memory at once (`MIMALLOC_PURGE_DELAY=0`,
//! `MIMALLOC_ARENA_EAGER_COMMIT=0`), so that the peak measures what the program holds rather
//! than what the allocator keeps for later; with its defaults the peaks are higher (120–150 MB
//! for `data prepare`) and vary by tens of MB from run to run, whatever the corpus.

mod common;

use std::io::Write;
use std::path::Path;

use common::cli::*;
use multitoken::tensor::Rng;

/// Pseudo-English of `bytes` bytes, written in pieces (the test itself stays small).
fn write_corpus_of(path: &Path, bytes: usize) {
    let words = ["the", "whale", "ship", "sea", "captain", "white", "ocean", "harpoon", "sailor", "deck", "and", "of", "to", "a"];
    let mut rng = Rng::new(9);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut written = 0;
    while written < bytes {
        let mut line = String::new();
        for _ in 0..5 + rng.below(10) {
            line += words[rng.below(words.len())];
            line.push(' ');
        }
        line += ".\n";
        file.write_all(line.as_bytes()).unwrap();
        written += line.len();
    }
}

#[test]
fn preparing_and_training_take_memory_that_does_not_grow_with_the_corpus() {
    let ws = workspace("large");
    let tokenizer = ws.data.join("tokenizer.json");
    let peaks = |megabytes: usize| {
        let corpus = ws.root.join(format!("corpus-{megabytes}.txt"));
        write_corpus_of(&corpus, megabytes << 20);
        let data = ws.root.join(format!("data-{megabytes}"));
        let measured = |args: &[&str]| {
            let out = output_within(
                binary().args(args).arg("--json").env("MIMALLOC_PURGE_DELAY", "0").env("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
                300,
            );
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        };
        let prepared = measured(&["data", "prepare", "--tokenizer", s(&tokenizer), "--input", s(&corpus), "--out", s(&data)]);
        let ckpt = ws.root.join(format!("ckpt-{megabytes}"));
        let tiny = ["--model", "tiny", "--batch", "4", "--seq", "32", "--steps", "3", "--eval-every", "3", "--threads", "2"];
        let trained = measured(&[&["train", "--data", s(&data), "--out", s(&ckpt)][..], &tiny].concat());
        std::fs::remove_file(&corpus).unwrap();
        let mb = |v: &serde_json::Value| v["peak_rss_bytes"].as_u64().unwrap() as f64 / (1 << 20) as f64;
        println!("{megabytes} MB corpus: data prepare peaks at {:.0} MB, train at {:.0} MB", mb(&prepared), mb(&trained));
        (mb(&prepared), mb(&trained), prepared["train_tokens"].as_u64().unwrap())
    };
    let (prepare_small, train_small, tokens_small) = peaks(8);
    let (prepare_large, train_large, tokens_large) = peaks(64);
    assert!(tokens_large > 7 * tokens_small);
    // eight times the corpus, 56 MB more text: the peaks hardly move, and stay well below it
    assert!(prepare_large < prepare_small + 12.0, "data prepare: {prepare_small:.0} MB, then {prepare_large:.0} MB");
    assert!(train_large < train_small + 12.0, "train: {train_small:.0} MB, then {train_large:.0} MB");
    assert!(
        prepare_large < 48.0 && train_large < 48.0,
        "a 64 MB corpus: data prepare held {prepare_large:.0} MB, train {train_large:.0} MB"
    );
}
