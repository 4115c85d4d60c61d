//! Driving the `multitoken` binary as a user does: commands that must succeed with one JSON
//! object, commands that must fail with one line, and a small prepared workspace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use multitoken::tensor::Rng;
use serde_json::Value;

use super::temp_dir;

/// The binary under test: this build's, or `MULTITOKEN_BINARY` (a test binary carried to a
/// GPU machine with the release binary beside it).
pub fn binary() -> Command {
    Command::new(std::env::var_os("MULTITOKEN_BINARY").unwrap_or_else(|| env!("CARGO_BIN_EXE_multitoken").into()))
}

pub fn run(args: &[&str]) -> Output {
    output_within(binary().args(args), 300)
}

/// Runs a command to its end, failing the test if it takes longer than `seconds` (a read that
/// blocks must show up as a failure, not as a test that never ends).
pub fn output_within(command: &mut Command, seconds: u64) -> Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("runs");
    // drain both pipes as the child writes, so a full pipe never stalls it
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waits") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{command:?} was still running after {seconds} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// Runs a command that must succeed with `--json`; returns its JSON object.
pub fn run_json(args: &[&str]) -> Value {
    let out = output_within(binary().args(args).arg("--json"), 300);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?} failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "--json prints one line: {stdout}");
    serde_json::from_str(stdout.trim()).expect("stdout is one JSON object")
}

/// Runs a command that must fail; returns its stderr, checked to be one line without a panic.
pub fn run_error(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{args:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected a one-line error, got: {stderr}");
    assert!(lines[0].starts_with("error"), "{stderr}");
    lines[0].to_string()
}

/// Whether this machine has a CUDA driver (then `--device cuda` runs instead of failing).
pub fn multitoken_cuda_driver_present() -> bool {
    multitoken_cuda::driver_present()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Pseudo-English with some structure to learn: about 60 KB.
pub fn write_corpus(path: &Path) {
    let words = [
        "the", "whale", "ship", "sea", "captain", "white", "ocean", "harpoon", "sailor", "deck", "wind", "storm", "and", "of", "to", "a",
        "in", "was", "he", "his", "that", "with", "old", "man", "boat", "water", "night", "day", "called", "me",
    ];
    let mut rng = Rng::new(42);
    let mut text = String::new();
    while text.len() < 60_000 {
        let n = 5 + rng.below(10);
        let sentence: Vec<&str> = (0..n).map(|i| if i % 3 == 0 { "the" } else { words[rng.below(words.len())] }).collect();
        text += &sentence.join(" ");
        text += if rng.below(5) == 0 { ".\n" } else { ". " };
    }
    std::fs::write(path, text).unwrap();
}

pub struct Workspace {
    pub _dir: tempfile::TempDir,
    pub root: PathBuf,
    pub corpus: PathBuf,
    pub data: PathBuf,
}

/// A corpus, a tokenizer of 300 tokens and a prepared data directory.
pub fn workspace(tag: &str) -> Workspace {
    let dir = temp_dir(tag);
    let root = dir.path().to_path_buf();
    let corpus = root.join("corpus.txt");
    write_corpus(&corpus);
    let tokenizer = root.join("tokenizer.json");
    let summary = run_json(&["tokenizer", "train", "--input", s(&corpus), "--vocab-size", "300", "--out", s(&tokenizer)]);
    assert_eq!(summary["vocab_size"], 300);
    assert!(summary["bytes_per_token"].as_f64().unwrap() > 1.0);
    let data = root.join("data");
    let prepared = run_json(&["data", "prepare", "--tokenizer", s(&tokenizer), "--input", s(&corpus), "--out", s(&data)]);
    assert!(prepared["train_tokens"].as_u64().unwrap() > 10 * prepared["val_tokens"].as_u64().unwrap());
    Workspace { _dir: dir, root, corpus, data }
}

pub const TINY: [&str; 10] = ["--model", "tiny", "--batch", "4", "--seq", "32", "--eval-every", "4", "--threads", "2"];

pub fn train_args<'a>(ws: &'a Workspace, out: &'a Path, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--data", s(&ws.data), "--out", s(out), "--steps", steps];
    args.extend(TINY);
    args.extend(extra);
    args
}

/// Every tensor of a safetensors file, as raw bytes by name.
pub fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let bytes = read(path);
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors().into_iter().map(|(name, view)| (name, view.data().to_vec())).collect()
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}
