//! A property test over mutated files, run for a bounded time: whatever bytes the checkpoint
//! and token-file readers (in memory and through a memory map) are given, they return the model or an error, never panic, never
//! hand back a weight that is not finite, and never allocate more than the files justify.
//!
//! Stable Rust's stand-in for `cargo fuzz` (which needs nightly): each case takes a valid file
//! and mutates it the ways files break (flipped bits, overwritten or inserted bytes, cut ends,
//! numbers in the JSON headers replaced by extreme ones). `MULTITOKEN_FUZZ_SECONDS` sets the
//! budget (default 20); a failing input is written under `target/fuzz-failures/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use multitoken::data::tokens;
use multitoken::model::{gpt2, ModelConfig};
use multitoken::tensor::{Rng, Tensor};
use multitoken::train::adamw::{AdamW, AdamWConfig};
use multitoken::train::checkpoint::{self, Checkpoint, ResumeState};
use multitoken::train::TrainSettings;

/// A small checkpoint with its resume state: the files mutations start from.
fn write_seed_checkpoint(dir: &Path) {
    let config = ModelConfig { vocab_size: 16, n_positions: 8, n_embd: 8, n_layer: 2, n_head: 2, horizon: 2, rank: 2 };
    let params = gpt2::init_params::<f32>(&config, &mut Rng::new(3));
    let refs: Vec<&Tensor<f32>> = params.named().into_iter().map(|(_, t)| t).collect();
    let optimizer = AdamW::new(AdamWConfig::default(), &refs);
    let settings = TrainSettings { horizon: 2, rank: 2, seq: 8, steps: 10, ..TrainSettings::default() };
    let resume = ResumeState { optimizer, step: 0, settings, best_val_joint_loss: Some(4.5) };
    let checkpoint = Checkpoint { config, params, tokenizer_json: None, resume: Some(resume) };
    checkpoint::save(dir, &checkpoint, &vec![]).unwrap();
}

/// Numbers that break sizes and offsets: zero, negative, past 32 and 64 bits, not a number.
const EXTREME_NUMBERS: [&str; 8] =
    ["0", "-1", "4294967295", "4294967296", "18446744073709551615", "99999999999999999999999", "1e308", "NaN"];

/// One mutation of `bytes`, chosen by `rng`.
fn mutate(bytes: &mut Vec<u8>, rng: &mut Rng) {
    let len = bytes.len().max(1);
    // most damage lands in the first bytes, where the headers and sizes are
    let position = |rng: &mut Rng| if rng.below(2) == 0 { rng.below(len.min(256)) } else { rng.below(len) };
    match rng.below(6) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = position(rng).min(bytes.len().saturating_sub(1));
                if let Some(b) = bytes.get_mut(i) {
                    *b ^= 1 << rng.below(8);
                }
            }
        }
        1 => {
            let start = position(rng).min(bytes.len());
            let end = (start + 1 + rng.below(16)).min(bytes.len());
            for b in &mut bytes[start..end] {
                *b = rng.below(256) as u8;
            }
        }
        2 => bytes.truncate(rng.below(len)),
        3 => {
            let at = position(rng).min(bytes.len());
            let inserted: Vec<u8> = (0..1 + rng.below(16)).map(|_| rng.below(256) as u8).collect();
            bytes.splice(at..at, inserted);
        }
        4 => {
            // a run of digits (a size, an offset, a setting) becomes an extreme number
            let digits: Vec<usize> = (0..bytes.len()).filter(|&i| bytes[i].is_ascii_digit()).collect();
            if let Some(&start) = digits.get(rng.below(digits.len().max(1))) {
                let end = (start..bytes.len()).find(|&i| !bytes[i].is_ascii_digit()).unwrap_or(bytes.len());
                let number = EXTREME_NUMBERS[rng.below(EXTREME_NUMBERS.len())];
                bytes.splice(start..end, number.bytes());
            }
        }
        _ => {
            // the 8-byte header length of a safetensors file, or a token file's header field
            let field = rng.below(2) * 8;
            if bytes.len() >= field + 8 {
                let value = [0u64, 1, u32::MAX as u64, u64::MAX, bytes.len() as u64, (bytes.len() + 1) as u64][rng.below(6)];
                bytes[field..field + 8].copy_from_slice(&value.to_le_bytes());
            }
        }
    }
}

/// Peak resident memory of this process, from /proc (Linux), in bytes.
fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn save_failure(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn mutated_checkpoints_and_token_files_load_or_fail_cleanly() {
    let budget = std::env::var("MULTITOKEN_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(20.0);
    let dir = tempfile::tempdir().unwrap();
    let pristine = dir.path().join("pristine");
    write_seed_checkpoint(&pristine);
    let token_bytes = tokens::encode(300, &(0..500).map(|i| (i * 37) % 300).collect::<Vec<u32>>());
    let targets = [checkpoint::CONFIG_FILE, checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE, checkpoint::TRAIN_STATE_FILE, "tokens"];
    let originals: Vec<Vec<u8>> = targets
        .iter()
        .map(|name| if *name == "tokens" { token_bytes.clone() } else { std::fs::read(pristine.join(name)).unwrap() })
        .collect();
    let subject = dir.path().join("subject");
    let copy_pristine = || {
        let _ = std::fs::remove_dir_all(&subject);
        std::fs::create_dir_all(&subject).unwrap();
        for name in &targets[..4] {
            std::fs::copy(pristine.join(name), subject.join(name)).unwrap();
        }
    };

    let mut rng = Rng::new(2026);
    let started = Instant::now();
    let (mut cases, mut loaded) = (0u64, 0u64);
    std::panic::set_hook(Box::new(|_| {})); // a panic is reported below, with its input
    while started.elapsed() < Duration::from_secs_f64(budget) {
        let which = rng.below(targets.len());
        let mut bytes = originals[which].clone();
        for _ in 0..1 + rng.below(3) {
            mutate(&mut bytes, &mut rng);
        }
        cases += 1;
        let outcome = if targets[which] == "tokens" {
            // both readers: the whole file in memory, and the memory map training uses
            let mapped_path = dir.path().join("tokens.bin");
            std::fs::write(&mapped_path, &bytes).unwrap();
            std::panic::catch_unwind(|| {
                let mapped = tokens::MappedTokens::open(&mapped_path);
                tokens::decode(Path::new("tokens.bin"), &bytes).map(|file| {
                    assert!(file.tokens.iter().all(|&t| t < file.vocab_size), "an id outside the vocabulary was accepted");
                    let mapped = mapped.as_ref().expect("the memory map refused a file the other reader took");
                    let mut ids = vec![0; mapped.len()];
                    mapped.copy_into(0, &mut ids);
                    assert_eq!(ids, file.tokens, "the two readers disagree");
                })
            })
        } else {
            copy_pristine();
            std::fs::write(subject.join(targets[which]), &bytes).unwrap();
            std::panic::catch_unwind(|| {
                checkpoint::load_for_resume(&subject).map(|ckpt| {
                    ckpt.config.validate().unwrap();
                    for (name, tensor) in ckpt.params.named() {
                        assert!(tensor.data().iter().all(|x| x.is_finite()), "{name} holds a value that is not finite");
                    }
                })
            })
        };
        match outcome {
            Ok(Ok(())) => loaded += 1,
            Ok(Err(error)) => {
                let message = error.to_string();
                assert!(!message.contains('\n'), "a multi-line error: {message}");
            }
            Err(panic) => {
                let _ = std::panic::take_hook();
                let what = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                let path = save_failure(&format!("case-{cases}-{}", targets[which]), &bytes);
                panic!("case {cases}: reading a mutated {} panicked ({what:?}); input saved to {}", targets[which], path.display());
            }
        }
    }
    let _ = std::panic::take_hook();
    println!("{cases} mutated files in {budget} s; {loaded} still loaded, the rest were refused with an error");
    assert!(cases > 100, "the budget ran only {cases} cases");
    if let Some(peak) = peak_resident_bytes() {
        assert!(peak < 1 << 30, "reading files of a few kilobytes took {peak} bytes");
    }
}
