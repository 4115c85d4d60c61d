//! A careless user against the command line: each case gets a one-line error that says what to
//! do, a non-zero exit, and no existing file changed (docs/failures.md lists them).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::cli::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// A workspace with a trained tiny checkpoint (n = 2, r = 2) and a note of its files' bytes.
struct Trained {
    ws: Workspace,
    ckpt: PathBuf,
    before: BTreeMap<String, Vec<u8>>,
}

fn trained(tag: &str) -> Trained {
    let ws = workspace(tag);
    let ckpt = ws.root.join("ckpt");
    run_json(&train_args(&ws, &ckpt, "4", &["--horizon", "2", "--rank", "2"]));
    let before = files(&ckpt);
    Trained { ws, ckpt, before }
}

/// Every file of a directory, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), read(&e.path())))
        .collect()
}

impl Trained {
    /// Asserts that the checkpoint is byte for byte as trained, apart from `edited` files.
    fn unchanged_but(&self, edited: &[&str]) {
        let now = files(&self.ckpt);
        for (name, bytes) in &self.before {
            if !edited.contains(&name.as_str()) {
                assert!(now.get(name) == Some(bytes), "{name} changed");
            }
        }
    }

    /// Puts the checkpoint back as trained.
    fn restore(&self) {
        for (name, bytes) in &self.before {
            std::fs::write(self.ckpt.join(name), bytes).unwrap();
        }
    }

    fn eval_error(&self) -> String {
        run_error(&["eval", "--checkpoint", s(&self.ckpt), "--text-file", s(&self.ws.corpus)])
    }

    fn sample_error(&self) -> String {
        run_error(&["sample", "--checkpoint", s(&self.ckpt), "--prompt", "the", "--max-new-tokens", "4"])
    }

    fn resume_error(&self) -> String {
        run_error(&["train", "--data", s(&self.ws.data), "--out", s(&self.ckpt), "--resume"])
    }

    fn edit_json(&self, file: &str, edit: impl FnOnce(&mut Value)) {
        let path = self.ckpt.join(file);
        let mut value: Value = serde_json::from_slice(&read(&path)).unwrap();
        edit(&mut value);
        std::fs::write(path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
    }
}

/// A safetensors file's f32 tensors by name: (shape, values).
type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Rewrites a safetensors file of f32 tensors through `edit`, which may change, add or drop
/// tensors.
fn edit_tensors(path: &Path, edit: impl FnOnce(&mut Tensors)) {
    let bytes = read(path);
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Tensors = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect();
    edit(&mut tensors);
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(name, (shape, data))| (name, shape, data.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views: Vec<(String, TensorView)> =
        raw.iter().map(|(name, shape, bytes)| (name.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn inference_refuses_a_tokenizer_that_does_not_match_the_model() {
    let t = trained("tokenizer-size");
    // one token more than the model has rows for: eval used to panic on it
    t.edit_json("tokenizer.json", |tok| tok["model"]["vocab"]["zzzq"] = 300.into());
    assert!(t.eval_error().contains("301 tokens but the model's vocabulary is 300"));
    assert!(t.sample_error().contains("301 tokens"));
    t.restore();
    // one token fewer: the model would make an id the tokenizer cannot print
    t.edit_json("tokenizer.json", |tok| {
        let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
        let last = vocab.iter().find(|(_, id)| id.as_u64() == Some(299)).map(|(k, _)| k.clone()).unwrap();
        vocab.remove(&last);
        tok["model"]["merges"].as_array_mut().unwrap().retain(|m| {
            let merged = m
                .as_array()
                .map(|p| p.iter().filter_map(Value::as_str).collect::<String>())
                .or_else(|| m.as_str().map(|p| p.replace(' ', "")));
            merged.as_deref() != Some(last.as_str())
        });
    });
    assert!(t.sample_error().contains("cannot print"));
    t.restore();
    // the right number of tokens, but an id past them (it would name a row the model lacks)
    t.edit_json("tokenizer.json", |tok| {
        let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
        let last = vocab.iter().find(|(_, id)| id.as_u64() == Some(299)).map(|(k, _)| k.clone()).unwrap();
        vocab[&last] = 100_000.into();
    });
    assert!(t.eval_error().contains("has id 100000"));
    t.unchanged_but(&["tokenizer.json"]);
}

#[test]
fn resume_refuses_saved_settings_that_cannot_work() {
    let t = trained("resume-settings");
    let cases: [(&str, Value, &str); 6] = [
        ("seq", 4096.into(), "n_positions"),
        ("seq", 0.into(), "--seq 0"),
        ("batch", 0.into(), "--batch"),
        ("eval_batches", 0.into(), "validation"),
        ("lr", (-1.0).into(), "--lr"),
        ("horizon", 3.into(), "n = 3"),
    ];
    for (field, value, expected) in cases {
        t.edit_json("train_state.json", |state| state["settings"][field] = value.clone());
        let message = t.resume_error();
        assert!(message.contains("saved settings") && message.contains(expected), "{field} = {value}: {message}");
        t.unchanged_but(&["train_state.json"]);
        t.restore();
    }
    // a field missing, or one the program does not know
    t.edit_json("train_state.json", |state| {
        state.as_object_mut().unwrap().remove("step");
    });
    assert!(t.resume_error().contains("missing field `step`"));
    t.restore();
    t.edit_json("train_state.json", |state| state["settings"]["lr_typo"] = 1.into());
    assert!(t.resume_error().contains("unknown field `lr_typo`"));
    t.restore();
    t.edit_json("train_state.json", |state| state["step"] = 99.into());
    assert!(t.resume_error().contains("inconsistent"));
    t.restore();
    t.edit_json("train_state.json", |state| state["adamw"]["beta2"] = 1.5.into());
    assert!(t.resume_error().contains("betas"));
    t.restore();
    // the precision is the run's: kept by --resume, never switched silently
    assert_eq!(serde_json::from_slice::<Value>(&read(&t.ckpt.join("train_state.json"))).unwrap()["settings"]["precision"], "f32");
    t.edit_json("train_state.json", |state| state["settings"]["precision"] = "tf32".into());
    let extend = ["train", "--data", s(&t.ws.data), "--out", s(&t.ckpt), "--resume", "--steps", "8"];
    assert!(run_error(&extend).contains("--precision tf32, which needs --device cuda"));
    t.edit_json("train_state.json", |state| state["settings"]["precision"] = "bf16".into());
    assert!(run_error(&extend).contains("--precision bf16, which needs --device cuda"));
    t.unchanged_but(&["train_state.json"]);
}

#[test]
fn config_json_is_read_strictly_and_within_limits() {
    let t = trained("config");
    let cases: [(&str, Value, &str); 9] = [
        ("n_embd", Value::from(u64::MAX / 2), "larger than this program allows"),
        ("n_layer", 1_000_000_000.into(), "n_layer 1000000000 is larger"),
        ("vocab_size", Value::from(u32::MAX), "vocabulary size"),
        ("mtp_rank", 1_000_000.into(), "rank r"),
        ("n_layer", 1.into(), "does not describe"), // the file has two layers
        ("n_head", "4".into(), "'n_head' must be a non-negative integer"),
        ("layer_norm_epsilon", "tiny".into(), "'layer_norm_epsilon' must be a number"),
        ("scale_attn_by_inverse_layer_idx", true.into(), "scale_attn_by_inverse_layer_idx"),
        ("scale_attn_weights", false.into(), "scale_attn_weights"),
    ];
    for (field, value, expected) in cases {
        t.edit_json("config.json", |config| config[field] = value.clone());
        let message = t.eval_error();
        assert!(message.contains(expected), "{field} = {value}: {message}");
        t.restore();
    }
    // the head's fields missing while the file holds the head: it is not dropped silently
    t.edit_json("config.json", |config| {
        let fields = config.as_object_mut().unwrap();
        fields.remove("mtp_horizon");
        fields.remove("mtp_rank");
    });
    assert!(t.eval_error().contains("describes no head"));
    for not_an_object in ["null", "[]", "3"] {
        std::fs::write(t.ckpt.join("config.json"), not_an_object).unwrap();
        assert!(t.eval_error().contains("JSON object"), "{not_an_object}");
    }
    t.unchanged_but(&["config.json"]);
}

#[test]
fn every_tensor_in_the_model_file_is_accounted_for_and_finite() {
    let t = trained("tensors");
    let model = t.ckpt.join("model.safetensors");
    let eval_ok = || run_json(&["eval", "--checkpoint", s(&t.ckpt), "--text-file", s(&t.ws.corpus)]);
    let reference = eval_ok();
    // what published GPT-2 files carry: mask buffers and lm_head.weight equal to wte; accepted
    edit_tensors(&model, |tensors| {
        let wte = tensors["transformer.wte.weight"].clone();
        tensors.insert("lm_head.weight".into(), wte);
        tensors.insert("transformer.h.0.attn.bias".into(), (vec![1, 1, 4, 4], vec![1.0; 16]));
        tensors.insert("h.1.attn.masked_bias".into(), (vec![], vec![-1e4]));
    });
    assert_eq!(eval_ok()["joint_loss"], reference["joint_loss"]);
    t.restore();
    let refused = |edit: &dyn Fn(&mut Tensors), expected: &str| {
        edit_tensors(&model, edit);
        let message = t.eval_error();
        assert!(message.contains(expected), "{message}");
        assert!(t.sample_error().contains(expected));
        t.restore();
    };
    refused(&|tensors| tensors.get_mut("transformer.wte.weight").unwrap().1[7] = f32::NAN, "holds NaN");
    // finite, but overflowing once used: eval and sample say so instead of printing NaN
    edit_tensors(&model, |tensors| tensors.get_mut("transformer.ln_f.weight").unwrap().1.fill(3e38));
    assert!(t.eval_error().contains("not finite"));
    assert!(t.sample_error().contains("not finite"));
    t.restore();
    refused(&|tensors| tensors.get_mut("mtp.expand.weight").unwrap().1[0] = f32::INFINITY, "holds inf");
    refused(
        &|tensors| {
            let mut other = tensors["transformer.wte.weight"].clone();
            other.1[0] += 1.0;
            tensors.insert("lm_head.weight".into(), other);
        },
        "lm_head.weight differs from wte",
    );
    refused(
        &|tensors| {
            tensors.insert("transformer.h.7.attn.bias".into(), (vec![1], vec![1.0]));
        },
        "transformer.h.7.attn.bias",
    );
    refused(
        &|tensors| {
            tensors.insert("notes".into(), (vec![1], vec![1.0]));
        },
        "'notes'",
    );
    t.unchanged_but(&["model.safetensors"]);
}

#[test]
fn inference_reads_neither_the_optimizer_nor_the_train_state() {
    let t = trained("inference-only");
    std::fs::write(t.ckpt.join("optimizer.safetensors"), b"garbage").unwrap();
    std::fs::write(t.ckpt.join("train_state.json"), b"{").unwrap();
    run_json(&["eval", "--checkpoint", s(&t.ckpt), "--text-file", s(&t.ws.corpus)]);
    run_json(&["sample", "--checkpoint", s(&t.ckpt), "--prompt", "the", "--max-new-tokens", "4", "--speculative"]);
    run_json(&["bench", "decode", "--checkpoint", s(&t.ckpt), "--prompt", "the", "--max-new-tokens", "4", "--repeats", "1"]);
    // --resume needs them, and says which is wrong
    assert!(t.resume_error().contains("train_state.json"));
    t.restore();
    std::fs::remove_file(t.ckpt.join("train_state.json")).unwrap();
    let message = t.resume_error();
    assert!(message.contains("has no train_state.json"), "{message}");
    t.restore();
    std::fs::write(t.ckpt.join("optimizer.safetensors"), b"garbage").unwrap();
    assert!(t.resume_error().contains("optimizer.safetensors"));
    t.restore();
    edit_tensors(&t.ckpt.join("optimizer.safetensors"), |tensors| {
        tensors.get_mut("exp_avg_sq.transformer.wpe.weight").unwrap().1[3] = -1.0
    });
    assert!(t.resume_error().contains("negative"));
    t.unchanged_but(&["optimizer.safetensors"]);
}

#[test]
fn decoding_sizes_and_seeds_are_checked_before_anything_is_allocated() {
    let t = trained("decode-sizes");
    let sample = |extra: &[&str]| {
        let mut args = vec!["sample", "--checkpoint", s(&t.ckpt), "--prompt", "the", "--max-new-tokens", "4"];
        args.extend_from_slice(extra);
        run_error(&args)
    };
    let bench = |extra: &[&str]| {
        let mut args = vec!["bench", "decode", "--checkpoint", s(&t.ckpt), "--prompt", "the", "--max-new-tokens", "4", "--repeats", "1"];
        args.extend_from_slice(extra);
        run_error(&args)
    };
    // more samples than their results could be kept for, more sequences at once than their KV
    // caches fit in (the process was killed for memory before)
    if multitoken::bench::total_memory_bytes().is_some() {
        let message = sample(&["--num-samples", "100000000000"]);
        assert!(message.contains("lower --num-samples"), "{message}");
        let message = bench(&["--batch", "100000000"]);
        assert!(message.contains("KV caches") && message.contains("lower --batch"), "{message}");
    }
    // seeds past the largest: they wrapped round to repeat other samples
    let message = sample(&["--seed", "18446744073709551615", "--num-samples", "3"]);
    assert!(message.contains("would pass the largest seed"), "{message}");
    let message = bench(&["--seed", "18446744073709551615", "--batch", "2"]);
    assert!(message.contains("would pass the largest seed"), "{message}");
    // nothing to generate is a mistake for sample as for bench decode
    let message = run_error(&["sample", "--checkpoint", s(&t.ckpt), "--prompt", "the", "--max-new-tokens", "0"]);
    assert!(message.contains("--max-new-tokens") && message.contains("at least 1"), "{message}");
    // a checkpoint without its config.json names that file, not "no checkpoint"
    std::fs::remove_file(t.ckpt.join("config.json")).unwrap();
    let message = t.resume_error();
    assert!(message.contains("config.json") && message.contains("missing"), "{message}");
    t.restore();
    t.unchanged_but(&[]);
}

#[test]
fn a_failed_resume_leaves_the_metrics_as_they_were() {
    let t = trained("resume-metrics");
    // a kill -9 after the last save leaves rows past the checkpoint's step
    let metrics = t.ckpt.join("metrics.jsonl");
    let mut text = std::fs::read_to_string(&metrics).unwrap();
    text += "{\"step\":7,\"train_loss\":1.0}\n";
    std::fs::write(&metrics, &text).unwrap();
    // data whose validation split is too short for the run's batches: found after loading
    let short = t.ws.root.join("short.txt");
    std::fs::write(&short, "the whale and the sea. ".repeat(20)).unwrap();
    let short_data = t.ws.root.join("short-data");
    run_json(&["data", "prepare", "--tokenizer", s(&t.ckpt.join("tokenizer.json")), "--input", s(&short), "--out", s(&short_data)]);
    run_error(&["train", "--data", s(&short_data), "--out", s(&t.ckpt), "--resume"]);
    assert_eq!(std::fs::read_to_string(&metrics).unwrap(), text);
}

#[test]
fn sizes_from_flags_and_token_files_are_bounded() {
    let ws = workspace("sizes");
    let out = ws.root.join("never");
    for (flag, value, expected) in [("--rank", "1000000", "rank r"), ("--horizon", "1000000", "horizon n")] {
        let message = run_error(&train_args(&ws, &out, "2", &[flag, value]));
        assert!(message.contains(expected), "{flag} {value}: {message}");
    }
    let huge_batch = ["train", "--data", s(&ws.data), "--out", s(&out), "--model", "tiny", "--batch", "100000000", "--seq", "128"];
    assert!(run_error(&huge_batch).contains("tokens per step"));
    // without --seq, the model's n_positions is the sequence
    assert!(
        run_error(&["train", "--data", s(&ws.data), "--out", s(&out), "--model", "tiny", "--batch", "1000000"]).contains("tokens per step")
    );
    assert!(run_error(&["bench", "train", "--model", "tiny", "--batch", "100000000", "--seq", "128"]).contains("tokens per step"));
    // within every limit, but more than this machine's memory: refused before allocating
    if let Some(total) = multitoken::bench::total_memory_bytes().filter(|&t| t < 100 << 30) {
        let layers = ((total as f64 / 16.0 / (12.0 * 1600.0 * 1600.0)) as usize + 1).to_string();
        let message = run_error(&train_args(&ws, &out, "2", &["--n-embd", "1600", "--n-head", "25", "--n-layer", &layers]));
        assert!(message.contains("more than this machine's"), "{message}");
    }
    // a tokenizer is never written over a file: here the corpus itself
    let corpus_before = read(&ws.corpus);
    let message = run_error(&["tokenizer", "train", "--input", s(&ws.corpus), "--vocab-size", "300", "--out", s(&ws.corpus)]);
    assert!(message.contains("never written over a file"), "{message}");
    assert_eq!(read(&ws.corpus), corpus_before);
    let message =
        run_error(&["tokenizer", "train", "--input", s(&ws.corpus), "--vocab-size", "1000000000", "--out", s(&ws.root.join("t.json"))]);
    assert!(message.contains("larger than this program allows"), "{message}");
    assert!(run_error(&["--threads", "10000", "eval", "--checkpoint", "x", "--text-file", "y"]).contains("--threads 10000"));
    assert!(run_error(&["train", "--data", s(&ws.data), "--out", s(&out), "--lr", "-1"]).contains("--lr must be a positive number"));
    assert!(run_error(&["sample", "--checkpoint", "x", "--prompt", "a", "--top-p", "-0.5"]).contains("--top-p"));
    assert!(run_error(&["train", "--data", s(&ws.data), "--out", s(&out), "--steps", "-1"]).contains("invalid value '-1' for '--steps"));
    assert!(!out.exists());

    // a token file's header: a vocabulary of 2^32 - 1, and one that is not the tokenizer's
    let bad_data = ws.root.join("bad-data");
    std::fs::create_dir_all(&bad_data).unwrap();
    for f in ["train.bin", "val.bin", "tokenizer.json"] {
        std::fs::copy(ws.data.join(f), bad_data.join(f)).unwrap();
    }
    for (vocab, expected) in [(u32::MAX, "vocabulary size 4294967295"), (301, "differs from tokenizer.json's (300)")] {
        for file in ["train.bin", "val.bin"] {
            let mut bytes = read(&bad_data.join(file));
            bytes[8..12].copy_from_slice(&vocab.to_le_bytes());
            std::fs::write(bad_data.join(file), bytes).unwrap();
        }
        let message = run_error(
            &train_args(&ws, &out, "2", &[]).iter().map(|a| if *a == s(&ws.data) { s(&bad_data) } else { a }).collect::<Vec<_>>(),
        );
        assert!(message.contains(expected), "{message}");
    }
    assert!(!out.exists());
}

#[test]
fn pipes_and_devices_are_refused_instead_of_read() {
    let t = trained("special-files");
    let model = t.ckpt.join("model.safetensors");
    std::fs::remove_file(&model).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &model).unwrap();
    assert!(t.eval_error().contains("not a regular file"));
    std::fs::remove_file(&model).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&model).status().unwrap();
    assert!(made.success());
    assert!(t.eval_error().contains("not a regular file"));
    let text = t.ws.root.join("text.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&text).status().unwrap().success());
    std::fs::remove_file(&model).unwrap();
    t.restore();
    assert!(run_error(&["eval", "--checkpoint", s(&t.ckpt), "--text-file", s(&text)]).contains("not a regular file"));
}

#[test]
fn text_that_is_not_utf8_is_refused_by_eval() {
    let t = trained("utf8");
    let text = t.ws.root.join("latin1.txt");
    let mut bytes = read(&t.ws.corpus);
    bytes[100] = 0xE9; // é in Latin-1, not UTF-8
    std::fs::write(&text, &bytes).unwrap();
    let message = run_error(&["eval", "--checkpoint", s(&t.ckpt), "--text-file", s(&text)]);
    assert!(message.contains("not UTF-8 text (the first invalid byte is at offset 100)"), "{message}");
}

#[test]
fn the_output_directory_is_checked_and_locked_before_the_first_step() {
    let ws = workspace("out-dir");
    // `--out .` in an empty directory: a save would replace the working directory (with or
    // without a name, "." or "../empty")
    let empty = ws.root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let mut args = train_args(&ws, Path::new("."), "2", &[]);
    args.push("--json");
    let out = output_within(binary().args(&args).current_dir(&empty), 300);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("a directory of its own"), "{stderr}");
    let mut args = train_args(&ws, Path::new("../empty"), "2", &[]);
    args.push("--json");
    let out = output_within(binary().args(&args).current_dir(&empty), 300);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("is the current directory"), "{stderr}");
    assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0, "nothing written");

    // a checkpoint that cannot be written beside the directory (here: its hidden staging name
    // is longer than a file name may be) is found before any step is spent
    // (249 bytes: the lock's name fits, the staging folder's does not, so the probe fails)
    let long = ws.root.join("c".repeat(249));
    let message = run_error(&train_args(&ws, &long, "2", &[]));
    assert!(message.contains("cannot be written here"), "{message}");

    // a run stopped by a mistake creates nothing: no folders, no lock
    let nested = ws.root.join("new/sub/ckpt");
    assert!(run_error(&train_args(&ws, &nested, "2", &["--n-embd", "50"])).contains("not divisible"));
    assert!(run_error(&train_args(&ws, &nested, "2", &["--n-positions", "16"])).contains("n_positions"));
    assert!(!ws.root.join("new").exists());

    // --out as a link to a directory: a save would replace the link
    let target = ws.root.join("target-dir");
    std::fs::create_dir_all(&target).unwrap();
    let link = ws.root.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    assert!(run_error(&train_args(&ws, &link, "2", &[])).contains("symbolic link"));
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);

    // a second run on the same --out is refused while the first holds it, and said so even once
    // the first has written files there (which would otherwise read as "not empty")
    let busy = ws.root.join("busy");
    let mut first =
        binary().args(train_args(&ws, &busy, "100000", &["--save-every", "0"])).stderr(std::process::Stdio::null()).spawn().unwrap();
    for _ in 0..3000 {
        if std::fs::read_dir(&busy).is_ok_and(|mut d| d.next().is_some()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let message = run_error(&train_args(&ws, &busy, "2", &[]));
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(message.contains("another run is writing to it"), "{message}");

    // staging folders that a kill during a save left behind (of the checkpoint and of its best
    // weights) are removed by the next run
    let ckpt = ws.root.join("ckpt");
    let stale = [ws.root.join(".ckpt.staging-999999"), ws.root.join(".ckpt-best.staging-999998")];
    for dir in &stale {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"half").unwrap();
    }
    run_json(&train_args(&ws, &ckpt, "2", &[]));
    assert!(stale.iter().all(|dir| !dir.exists()));

    // --resume where a save would delete someone's file, or the best weights' place is taken:
    // refused before the first step, not at the first save
    let resume = ["train", "--data", s(&ws.data), "--out", s(&ckpt), "--resume", "--steps", "4"];
    std::fs::write(ckpt.join("notes.txt"), "mine").unwrap();
    assert!(run_error(&resume).contains("holds files other than a checkpoint's"));
    std::fs::remove_file(ckpt.join("notes.txt")).unwrap();
    let best = ws.root.join("ckpt-best");
    std::fs::remove_dir_all(&best).unwrap();
    std::fs::write(&best, "a file").unwrap();
    assert!(run_error(&resume).contains("is a file"));
    std::fs::remove_file(&best).unwrap();
    // a pipe where the metrics are: refused, not waited on
    std::fs::remove_file(ckpt.join("metrics.jsonl")).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(ckpt.join("metrics.jsonl")).status().unwrap().success());
    assert!(run_error(&resume).contains("not a regular file"));
    std::fs::remove_file(ckpt.join("metrics.jsonl")).unwrap();
    // a finished run has nothing to do
    run_json(&resume);
    assert!(run_error(&resume).contains("the run is finished"));
}

#[test]
fn data_prepare_keeps_data_made_with_another_tokenizer() {
    let ws = workspace("prepare-other");
    let other = ws.root.join("other.json");
    run_json(&["tokenizer", "train", "--input", s(&ws.corpus), "--vocab-size", "280", "--out", s(&other)]);
    let before = files(&ws.data);
    let message = run_error(&["data", "prepare", "--tokenizer", s(&other), "--input", s(&ws.corpus), "--out", s(&ws.data)]);
    assert!(message.contains("another tokenizer"), "{message}");
    assert_eq!(files(&ws.data), before);
    // the same tokenizer may prepare it again
    run_json(&["data", "prepare", "--tokenizer", s(&ws.data.join("tokenizer.json")), "--input", s(&ws.corpus), "--out", s(&ws.data)]);
    // a pipe where the data's tokenizer is: refused, not waited on
    let piped = ws.root.join("piped");
    std::fs::create_dir_all(&piped).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(piped.join("tokenizer.json")).status().unwrap().success());
    let message = run_error(&["data", "prepare", "--tokenizer", s(&other), "--input", s(&ws.corpus), "--out", s(&piped)]);
    assert!(message.contains("not a regular file"), "{message}");
}

#[test]
fn a_missing_cuda_library_is_named_before_anything_is_written() {
    let ws = workspace("cuda-libraries");
    let out = ws.root.join("gpu-run");
    let library_dir = ws.root.join("cuda-libraries");
    std::fs::create_dir_all(&library_dir).unwrap();
    let train_with = |dir: &Path| {
        let out = output_within(binary().args(train_args(&ws, &out, "2", &["--device", "cuda"])).env("MULTITOKEN_CUDA_LIB_DIR", dir), 300);
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).trim().to_string()
    };
    let message = train_with(&library_dir);
    assert!(message.starts_with("error: the CUDA driver (libcuda.so.1) could not be loaded"), "{message}");
    assert_eq!(message.lines().count(), 1);
    // a driver, but no cuBLAS: an empty shared library stands in for libcuda
    let source = ws.root.join("empty.c");
    std::fs::write(&source, "").unwrap();
    let built = std::process::Command::new("cc")
        .args(["-shared", "-o"])
        .arg(library_dir.join("libcuda.so.1"))
        .arg(&source)
        .status()
        .expect("a C compiler (cc), as Rust's linker needs");
    assert!(built.success());
    let message = train_with(&library_dir);
    assert!(message.starts_with("error: cuBLAS (libcublas.so.13) could not be loaded"), "{message}");
    assert!(!message.contains("internal error"));
    assert!(!out.exists());
}

#[test]
fn several_gpus_are_asked_for_consistently() {
    let ws = workspace("gpus");
    let out = ws.root.join("ckpt");
    let cases: [(&[&str], &str); 6] = [
        (&["--gpus", "2"], "needs --device cuda"),
        (&["--gpus", "0", "--device", "cuda"], "--gpus and --nnodes must be at least 1"),
        (&["--gpus", "3", "--device", "cuda"], "--batch 4 is the global batch and must divide among the 3 GPUs"),
        (&["--gpus", "2", "--nnodes", "2", "--node-rank", "2", "--device", "cuda"], "--node-rank 2 must be below --nnodes 2"),
        (&["--gpus", "2", "--master-port", "70000"], "--master-port"),
        (&["--gpus", "-1"], "--gpus"),
    ];
    for (extra, expected) in cases {
        let mut args = train_args(&ws, &out, "2", &[]);
        args.extend(extra);
        let message = run_error(&args);
        assert!(message.contains(expected), "{extra:?}: {message}");
    }
    let message = run_error(&["bench", "train", "--model", "tiny", "--gpus", "2", "--batch", "4"]);
    assert!(message.contains("needs --device cuda"), "{message}");
    if !multitoken_cuda_driver_present() {
        // the launcher checks the host before it starts anything
        let args = train_args(&ws, &out, "2", &["--gpus", "2", "--device", "cuda"]);
        let message = run_error(&args);
        assert!(message.contains("no CUDA driver found"), "{message}");
        // a resumed run's batch is its saved one: the default --batch is not held against --gpus
        let args = ["train", "--data", s(&ws.data), "--out", s(&out), "--resume", "--gpus", "3", "--device", "cuda"];
        let message = run_error(&args);
        assert!(!message.contains("must divide"), "{message}");
    }
    assert!(!out.exists(), "nothing written");
}
