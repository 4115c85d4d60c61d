//! The command line as a user drives it: the whole pipeline on a small synthetic corpus,
//! `--resume` bit for bit, signals, and one-line errors for bad input.

mod common;

use std::path::Path;
use std::process::Command;

use common::cli::*;
use serde_json::Value;

#[test]
fn pipeline_trains_evaluates_and_samples_with_the_spec_json_keys() {
    let ws = workspace("pipeline");
    let ckpt = ws.root.join("ckpt");
    let summary = run_json(&train_args(&ws, &ckpt, "30", &["--lr", "3e-3"]));
    for key in ["steps", "train_loss", "val_joint_loss", "val_ntp_loss", "tokens_per_s"] {
        assert!(summary.get(key).is_some(), "train JSON lacks {key}: {summary}");
    }
    assert_eq!(summary["steps"], 30);
    // 300-way uniform guessing costs ln 300 = 5.70 nats; the structured corpus is far easier
    assert!(summary["val_ntp_loss"].as_f64().unwrap() < 4.5, "{summary}");
    for file in
        ["config.json", "model.safetensors", "tokenizer.json", "optimizer.safetensors", "train_state.json", "metrics.jsonl", "loss.svg"]
    {
        assert!(ckpt.join(file).is_file(), "checkpoint lacks {file}");
    }
    let config: Value = serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["activation_function"], "gelu_new");
    assert_eq!((config["mtp_horizon"].as_u64(), config["mtp_rank"].as_u64()), (Some(1), Some(1)));

    let eval = run_json(&["eval", "--checkpoint", s(&ckpt), "--text-file", s(&ws.corpus)]);
    for key in ["joint_loss", "ntp_loss", "head_losses", "tokens"] {
        assert!(eval.get(key).is_some(), "eval JSON lacks {key}");
    }
    assert_eq!(eval["joint_loss"], eval["ntp_loss"]);

    let sample = run_json(&["sample", "--checkpoint", s(&ckpt), "--prompt", "the whale", "--max-new-tokens", "12", "--greedy"]);
    for key in ["text", "tokens", "tokens_per_s", "forward_passes", "mean_accepted"] {
        assert!(sample.get(key).is_some(), "sample JSON lacks {key}");
    }
    assert_eq!(sample["tokens"].as_array().unwrap().len(), 12);
    assert_eq!(sample["precision"], "f32");
    let again = run_json(&["sample", "--checkpoint", s(&ckpt), "--prompt", "the whale", "--max-new-tokens", "12", "--greedy"]);
    assert_eq!(sample["tokens"], again["tokens"], "greedy decoding is deterministic");
    let seeded = |seed: &str| {
        run_json(&["sample", "--checkpoint", s(&ckpt), "--prompt", "the", "--max-new-tokens", "8", "--top-k", "20", "--seed", seed])
            ["tokens"]
            .clone()
    };
    assert_eq!(seeded("5"), seeded("5"), "a seed fixes sampling");
}

#[test]
fn a_checkpoint_without_optimizer_state_decodes_like_one_from_another_program() {
    let ws = workspace("foreign");
    let ckpt = ws.root.join("ckpt");
    run_json(&train_args(&ws, &ckpt, "4", &["--horizon", "3", "--rank", "2"]));
    // what another program writes: config, weights, tokenizer; no optimizer state, no metrics
    for extra in ["optimizer.safetensors", "train_state.json", "metrics.jsonl", "loss.svg"] {
        std::fs::remove_file(ckpt.join(extra)).unwrap();
    }
    let spec =
        run_json(&["sample", "--checkpoint", s(&ckpt), "--prompt", "the whale", "--max-new-tokens", "20", "--greedy", "--speculative"]);
    let plain = run_json(&["sample", "--checkpoint", s(&ckpt), "--prompt", "the whale", "--max-new-tokens", "20", "--greedy"]);
    assert_eq!(spec["tokens"], plain["tokens"], "greedy speculative output equals greedy autoregressive output");
    let mean_accepted = spec["mean_accepted"].as_f64().unwrap();
    assert!((1.0..=3.0).contains(&mean_accepted), "{mean_accepted}");
    let bench = run_json(&[
        "bench",
        "decode",
        "--checkpoint",
        s(&ckpt),
        "--prompt",
        "the whale",
        "--max-new-tokens",
        "20",
        "--greedy",
        "--repeats",
        "1",
    ]);
    for key in ["ar_tokens_per_s", "spec_tokens_per_s", "speedup", "mean_accepted"] {
        assert!(bench.get(key).is_some(), "bench decode JSON lacks {key}");
    }
    assert_eq!(bench["precision"], "f32");
    // every weight a speculative pass reads, in f32: all parameters but wpe's table
    let config = multitoken::model::ModelConfig::preset("tiny", 300, 3, 2).unwrap();
    let expected_bytes = 4 * (config.parameter_count() - (config.n_positions * config.n_embd) as u128);
    assert_eq!(bench["weight_bytes_per_pass"].as_u64().map(u128::from), Some(expected_bytes));
    for key in ["achieved_bandwidth_bytes_per_s", "copy_bandwidth_bytes_per_s"] {
        assert!(bench[key].as_f64().is_some_and(|b| b > 1e6), "{key}: {}", bench[key]);
    }
    assert_eq!(bench["identical_output"], true);
    // three copies together: all their tokens counted, and each decoder's the same as alone
    let args = ["bench", "decode", "--checkpoint", s(&ckpt), "--prompt", "the whale", "--max-new-tokens", "20", "--greedy"];
    let batched = run_json(&[&args[..], &["--repeats", "1", "--batch", "3"]].concat());
    assert_eq!((batched["batch"].as_u64(), batched["identical_output"].as_bool()), (Some(3), Some(true)));
    let passes = |b: &Value| b["forward_passes"].as_u64().unwrap();
    assert_eq!(passes(&batched), 3 * passes(&bench), "greedy copies: three times one copy's passes");
    assert_eq!(batched["mean_accepted"], bench["mean_accepted"]);
    assert!(run_error(&["train", "--data", s(&ws.data), "--out", s(&ckpt), "--resume"]).contains("no optimizer state"));
}

#[test]
fn head_only_fine_tuning_trains_the_head_and_leaves_the_backbone_untouched() {
    let ws = workspace("finetune");
    let base = ws.root.join("base");
    run_json(&train_args(&ws, &base, "6", &[]));
    let tuned = ws.root.join("tuned");
    let summary = run_json(&train_args(&ws, &tuned, "6", &["--init-from", s(&base), "--freeze-backbone", "--horizon", "3", "--rank", "2"]));
    assert_eq!(summary["val_head_losses"].as_array().unwrap().len(), 3);
    let (before, after) = (tensors(&base.join("model.safetensors")), tensors(&tuned.join("model.safetensors")));
    for (name, bytes) in &before {
        assert_eq!(Some(bytes), after.get(name), "{name} changed during head-only fine-tuning");
    }
    let initial_gate_bias = vec![0u8; 2 * 4]; // g starts at zero
    assert!(after.contains_key("mtp.expand.weight") && after.contains_key("mtp.gate.weight"));
    assert_ne!(after["mtp.gate.bias"], initial_gate_bias, "the gate was trained");
    // without --init-from, freezing makes no sense
    assert!(run_error(&train_args(&ws, &ws.root.join("x"), "2", &["--freeze-backbone", "--horizon", "2"])).contains("--init-from"));
}

#[test]
fn resume_after_an_interruption_ends_bit_for_bit_like_an_uninterrupted_run() {
    let ws = workspace("resume");
    let straight = ws.root.join("straight");
    let resumed = ws.root.join("resumed");
    run_json(&train_args(&ws, &straight, "12", &[]));
    let out = binary().args(train_args(&ws, &resumed, "12", &["--stop-after-steps", "6"])).output().unwrap();
    assert_eq!(out.status.code(), Some(130), "an interrupted run exits non-zero");
    let state: Value = serde_json::from_str(&std::fs::read_to_string(resumed.join("train_state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 6);
    run_json(&["train", "--data", s(&ws.data), "--out", s(&resumed), "--resume", "--threads", "2"]);
    assert!(read(&straight.join("model.safetensors")) == read(&resumed.join("model.safetensors")), "weights differ after resuming");
    assert!(
        read(&straight.join("optimizer.safetensors")) == read(&resumed.join("optimizer.safetensors")),
        "optimizer state differs after resuming"
    );
    let metrics = |dir: &Path| std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines().filter(|l| l.contains("val_")).count();
    assert_eq!(metrics(&straight), metrics(&resumed), "resumed metrics log repeats or loses rows");
}

#[test]
fn sigterm_writes_a_checkpoint_and_kill_9_resumes_from_the_last_one() {
    let ws = workspace("signals");
    let straight = ws.root.join("straight");
    run_json(&train_args(&ws, &straight, "40", &["--save-every", "5"]));

    let killed = ws.root.join("killed");
    let wait_for_step = |dir: &Path, at_least: u64| {
        for _ in 0..600 {
            let step = std::fs::read_to_string(dir.join("train_state.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .and_then(|v| v["step"].as_u64());
            if step.is_some_and(|s| s >= at_least) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("training never reached step {at_least}");
    };
    // SIGTERM: the run finishes its step, saves and exits non-zero
    let mut child =
        binary().args(train_args(&ws, &killed, "40", &["--save-every", "5"])).stderr(std::process::Stdio::null()).spawn().unwrap();
    wait_for_step(&killed, 5);
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "SIGTERM must exit non-zero");
    assert!(killed.join("model.safetensors").is_file());
    // kill -9 during a later stretch: resume continues from the last checkpoint written
    let mut child = binary()
        .args(["train", "--data", s(&ws.data), "--out", s(&killed), "--resume", "--threads", "2"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_step(&killed, 15);
    child.kill().unwrap();
    child.wait().unwrap();
    run_json(&["train", "--data", s(&ws.data), "--out", s(&killed), "--resume", "--threads", "2"]);
    assert!(
        read(&straight.join("model.safetensors")) == read(&killed.join("model.safetensors")),
        "weights differ after SIGTERM and kill -9"
    );
}

#[test]
fn bad_input_gets_a_one_line_error_and_leaves_files_alone() {
    let ws = workspace("errors");
    let ckpt = ws.root.join("ckpt");
    run_json(&train_args(&ws, &ckpt, "2", &[]));
    let weights = read(&ckpt.join("model.safetensors"));

    // bad flags and values
    assert!(run_error(&["train", "--data", s(&ws.data), "--out", "x", "--bogus"]).contains("--bogus"));
    assert!(run_error(&["train", "--data", s(&ws.data), "--out", "x", "--steps", "many"]).contains("many"));
    assert!(run_error(&["train", "--data", s(&ws.data), "--out", s(&ws.root.join("y")), "--model", "huge"]).contains("preset"));
    assert!(run_error(&["train", "--data", s(&ws.data), "--out", s(&ws.root.join("z")), "--device", "tpu"]).contains("device"));
    assert!(run_error(&["bench", "train", "--precision", "tf32", "--steps", "1"]).contains("--device cuda"));
    assert!(run_error(&["bench", "train", "--precision", "bf16", "--steps", "1"]).contains("--precision bf16 needs --device cuda"));
    let (x, text) = (ws.root.join("x"), s(&ws.corpus));
    assert!(run_error(&["train", "--data", s(&ws.data), "--out", s(&x), "--precision", "bf16"]).contains("needs --device cuda"));
    assert!(!x.exists());
    assert!(run_error(&["eval", "--checkpoint", s(&ckpt), "--text-file", text, "--precision", "bf16"]).contains("needs --device cuda"));
    assert!(run_error(&["eval", "--checkpoint", s(&ckpt), "--text-file", text, "--precision", "fp8"]).contains("use f32, tf32 or bf16"));
    assert!(run_error(&["bench", "decode", "--checkpoint", s(&ckpt), "--prompt", "a", "--draft", "best"])
        .contains("use mixture or top-component"));
    assert!(run_error(&["sample", "--checkpoint", s(&ckpt), "--prompt", "a", "--draft", "top-component"]).contains("add --speculative"));
    // decoding's precision: bf16 on a GPU only, tf32 never, said before the checkpoint is read
    // (here one that does not exist)
    let missing = ws.root.join("no-such-checkpoint");
    let missing = s(&missing);
    assert!(run_error(&["sample", "--checkpoint", missing, "--prompt", "a", "--precision", "bf16"])
        .contains("--precision bf16 needs --device cuda"));
    let tf32 = ["bench", "decode", "--checkpoint", missing, "--prompt", "a", "--device", "cuda", "--precision", "tf32"];
    assert!(run_error(&tf32).contains("tf32 is for training"));
    assert!(run_error(&["sample", "--checkpoint", missing, "--prompt", "a", "--precision", "fp8"]).contains("use f32 or bf16"));
    for flag in ["--max-new-tokens", "--repeats", "--batch"] {
        assert!(run_error(&["bench", "decode", "--checkpoint", s(&ckpt), "--prompt", "a", flag, "0"]).contains("at least 1"));
    }
    if !multitoken_cuda_driver_present() {
        assert!(run_error(&["sample", "--checkpoint", s(&ckpt), "--prompt", "a", "--device", "cuda"]).contains("--device cpu"));
        // no GPU here: --device cuda is refused with a one-line error, and nothing is written
        let out = ws.root.join("gpu-run");
        assert!(run_error(&train_args(&ws, &out, "2", &["--device", "cuda"])).contains("--device cpu"));
        assert!(!out.exists());
    }
    // missing files
    assert!(run_error(&["train", "--data", s(&ws.root.join("nowhere")), "--out", s(&ws.root.join("w"))]).contains("data prepare"));
    assert!(run_error(&["eval", "--checkpoint", s(&ws.root.join("nowhere")), "--text-file", s(&ws.corpus)]).contains("no such checkpoint"));
    assert!(run_error(&["eval", "--checkpoint", s(&ckpt), "--text-file", s(&ws.root.join("missing.txt"))]).contains("missing.txt"));
    // an existing checkpoint is not overwritten by a new run
    assert!(run_error(&train_args(&ws, &ckpt, "2", &[])).contains("--resume"));
    assert_eq!(read(&ckpt.join("model.safetensors")), weights);
    // a directory holding other files is never used as a checkpoint directory
    let occupied = ws.root.join("occupied");
    std::fs::create_dir_all(&occupied).unwrap();
    std::fs::write(occupied.join("notes.txt"), "mine").unwrap();
    assert!(run_error(&train_args(&ws, &occupied, "2", &[])).contains("holds files other than a checkpoint's"));
    assert_eq!(std::fs::read_to_string(occupied.join("notes.txt")).unwrap(), "mine");
    // --resume cannot change settings
    assert!(run_error(&["train", "--data", s(&ws.data), "--out", s(&ckpt), "--resume", "--lr", "1"]).contains("--lr"));

    // empty corpus
    let empty = ws.root.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    assert!(run_error(&["tokenizer", "train", "--input", s(&empty), "--vocab-size", "300", "--out", s(&ws.root.join("t.json"))])
        .contains("empty"));
    assert!(run_error(&[
        "data",
        "prepare",
        "--tokenizer",
        s(&ckpt.join("tokenizer.json")),
        "--input",
        s(&empty),
        "--out",
        s(&ws.root.join("d"))
    ])
    .contains("tokens"));

    // token ids outside the vocabulary
    let bad_data = ws.root.join("bad-data");
    std::fs::create_dir_all(&bad_data).unwrap();
    for f in ["train.bin", "val.bin", "tokenizer.json"] {
        std::fs::copy(ws.data.join(f), bad_data.join(f)).unwrap();
    }
    let mut tokens = read(&bad_data.join("train.bin"));
    tokens[16..18].copy_from_slice(&999u16.to_le_bytes());
    std::fs::write(bad_data.join("train.bin"), tokens).unwrap();
    assert!(run_error(&["train", "--data", s(&bad_data), "--out", s(&ws.root.join("v"))]).contains("outside the vocabulary"));

    // corrupt checkpoint, and one whose shapes disagree with its config
    let corrupt = ws.root.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(ckpt.join(f), corrupt.join(f)).unwrap();
    }
    std::fs::write(corrupt.join("model.safetensors"), b"not safetensors").unwrap();
    let message = run_error(&["eval", "--checkpoint", s(&corrupt), "--text-file", s(&ws.corpus)]);
    assert!(message.contains("not a valid safetensors file") && message.contains("restore it or train again"), "{message}");
    std::fs::copy(ckpt.join("model.safetensors"), corrupt.join("model.safetensors")).unwrap();
    let config = std::fs::read_to_string(ckpt.join("config.json")).unwrap().replace("\"n_embd\": 64", "\"n_embd\": 32");
    std::fs::write(corrupt.join("config.json"), config).unwrap();
    assert!(run_error(&["eval", "--checkpoint", s(&corrupt), "--text-file", s(&ws.corpus)]).contains("shape"));

    // a loss that blows up: stop, name the step, keep the last good checkpoint
    let blown = ws.root.join("blown");
    let message = run_error(&train_args(&ws, &blown, "30", &["--lr", "1e6", "--warmup", "10", "--save-every", "1"]));
    assert!(message.contains("at step"), "{message}");
    let state: Value = serde_json::from_str(&std::fs::read_to_string(blown.join("train_state.json")).unwrap()).unwrap();
    assert!(state["step"].as_u64().unwrap() >= 1, "a checkpoint from before the blow-up is kept");
    let reloaded = run_json(&["eval", "--checkpoint", s(&blown), "--text-file", s(&ws.corpus)]);
    assert!(reloaded["ntp_loss"].as_f64().unwrap().is_finite(), "the kept checkpoint is a good one");
}
