//! The paper's rank table on real corpora: for a prose and a code corpus, with the same token
//! budget for every run, train a next-token model, then n = 4 heads of rank r = 1, 2, 4, 8 from
//! scratch, and head-only fine-tunes of the next-token backbone with the same ranks. For each:
//! validation joint and next-token loss, mean accepted tokens per pass (greedy, and sampling at
//! temperature 1), acceptance rate per draft position, and speed against autoregressive decoding.
//!
//! Writes RUN_DIR/results.jsonl, RUN_DIR/table.md and RUN_DIR/rank-table.svg; with
//! `RANK_TABLE_DOCS=1` also `docs/rank-table.jsonl` (the rows), `docs/rank-table.svg`, and the
//! table into docs/results.md between the `rank-table` markers. Run from the repository root
//! (it reads `examples/prompts` and writes `docs/` there) through `scripts/rank-table.sh`, which
//! fetches the corpora and prepares the data first.
//!
//! cargo run --release --example rank_table -- RUN_DIR STEPS MODEL SEQ BATCH CORPUS=DATA_DIR...
//! (with RANK_TABLE_RENDER_ONLY=1 it only redraws from RUN_DIR/results.jsonl)
//!
//! For the study at GPU scale, through the environment:
//! - `RANK_TABLE_DEVICE=cuda` trains and decodes on the GPU, `RANK_TABLE_PRECISION=bf16` trains
//!   in that precision (decoding stays f32);
//! - `RANK_TABLE_SEEDS=K` trains every cell with seeds 1337 … 1337 + K − 1 (each head-only run
//!   on the next-token model of its own seed);
//! - `RANK_TABLE_PROMPTS=P` decodes after the first P of the committed held-out prompts of the
//!   corpus (`examples/prompts/prose.jsonl` and `code.jsonl`, 24 each, cut from the end of the
//!   corpus that validation holds out by `scripts/held-out-prompts.py`), and reports medians;
//! - `RANK_TABLE_DEADLINE_S=S` starts no cell that would end more than S seconds after the
//!   study started, as judged from the same kind and rank in the rows already written (for a
//!   machine lent for a fixed time: no cell is cut off midway and lost).
//!
//! Each finished cell is written to RUN_DIR/results.jsonl at once, and a cell already there is
//! not run again: a study stopped anywhere (a device session ending) continues where it stopped
//! when started again with the same arguments.

use std::path::{Path, PathBuf};

use multitoken::bench::bench_decode;
use multitoken::data::tokenizer;
use multitoken::decode::{Draft, SamplingConfig};
use multitoken::device::{DeviceKind, Precision};
use multitoken::train::{self, checkpoint, RunOptions, TrainSettings};
use plotters::prelude::*;
use serde_json::{json, Value};

const RANKS: [usize; 4] = [1, 2, 4, 8];
const HORIZON: usize = 4;
/// Tokens of each prompt, and new tokens decoded after it.
const PROMPT_TOKENS: usize = 64;
const NEW_TOKENS: usize = 128;
/// Validations per run: the study measures each run at its best one (early stopping).
const VALIDATIONS: u64 = 6;
/// Seconds beyond training that a cell's measurements take at most (validation, decoding of
/// the prompts), for `RANK_TABLE_DEADLINE_S`.
const MEASURE_ALLOWANCE_S: f64 = 30.0;
/// The committed held-out prompts, and where the table and plot go, from the repository root.
const PROMPTS_DIR: &str = "examples/prompts";
const DOCS_DIR: &str = "docs";

/// What the environment asks of the study (see the top of this file).
struct Study {
    device: DeviceKind,
    precision: Precision,
    seeds: u64,
    prompts: usize,
    deadline_s: Option<f64>,
}

impl Study {
    fn from_env() -> anyhow::Result<Self> {
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        let device = DeviceKind::parse(&var("RANK_TABLE_DEVICE", "cpu"))?;
        let precision = Precision::parse(&var("RANK_TABLE_PRECISION", "f32"), device)?;
        let seeds: u64 = var("RANK_TABLE_SEEDS", "1").parse()?;
        let prompts: usize = var("RANK_TABLE_PROMPTS", "1").parse()?;
        anyhow::ensure!(seeds >= 1 && prompts >= 1, "RANK_TABLE_SEEDS and RANK_TABLE_PROMPTS must be at least 1");
        let deadline_s = std::env::var("RANK_TABLE_DEADLINE_S").ok().map(|s| s.parse()).transpose()?;
        Ok(Study { device, precision, seeds, prompts, deadline_s })
    }
}

/// The cell a results row belongs to: corpus, training, rank, seed.
fn cell_of(row: &Value) -> (String, String, u64, u64) {
    let text = |key: &str| row[key].as_str().unwrap_or_default().to_string();
    (text("corpus"), text("kind"), row["rank"].as_u64().unwrap_or(0), row["seed"].as_u64().unwrap_or(1337))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() >= 6, "usage: rank_table RUN_DIR STEPS MODEL SEQ BATCH CORPUS=DATA_DIR...");
    let run_dir = PathBuf::from(&args[0]);
    let (steps, model, seq, batch): (u64, String, usize, usize) = (args[1].parse()?, args[2].clone(), args[3].parse()?, args[4].parse()?);
    let corpora: Vec<(String, PathBuf)> = args[5..]
        .iter()
        .map(|a| {
            a.split_once('=')
                .map(|(n, d)| (n.to_string(), PathBuf::from(d)))
                .ok_or_else(|| anyhow::anyhow!("expected NAME=DATA_DIR, got {a}"))
        })
        .collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(
        Path::new(PROMPTS_DIR).is_dir() && Path::new(DOCS_DIR).is_dir(),
        "{PROMPTS_DIR} and {DOCS_DIR} are not here: run this from the repository root (scripts/rank-table.sh does)"
    );
    std::fs::create_dir_all(&run_dir)?;
    let study = Study::from_env()?;
    let started = std::time::Instant::now();
    // the cells finished before: kept, and not run again
    let results_path = run_dir.join("results.jsonl");
    let mut rows: Vec<Value> = match std::fs::read_to_string(&results_path) {
        Ok(text) => text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?,
        Err(_) => Vec::new(),
    };
    // what every run of this study shares; a row of another study is not this one's to skip
    let budget = json!({ "model": model, "steps": steps, "seq": seq, "batch": batch });
    if let Some(other) = rows.iter().find(|row| row.get("budget").is_some_and(|b| *b != budget)) {
        anyhow::bail!("{} holds a study of {} (this one: {budget}); choose another RUN_DIR", results_path.display(), other["budget"]);
    }
    let render_only = std::env::var("RANK_TABLE_RENDER_ONLY").is_ok_and(|v| v == "1");
    anyhow::ensure!(!render_only || !rows.is_empty(), "{} holds no results to render", results_path.display());
    // seed by seed, so that a study stopped early holds every corpus
    let cells = (0..study.seeds).filter(|_| !render_only).flat_map(|k| corpora.iter().map(move |corpus| (corpus, 1337 + k)));
    'cells: for ((corpus, data), seed) in cells {
        let base = TrainSettings {
            model: model.clone(),
            steps,
            batch,
            seq,
            eval_every: (steps / VALIDATIONS).max(1),
            save_every: 0,
            lr: 3e-3,
            seed,
            precision: study.precision,
            ..TrainSettings::default()
        };
        // the first seed keeps the directory names of single-seed tables
        let tag = if seed == 1337 { String::new() } else { format!("-seed{seed}") };
        let ntp_dir = run_dir.join(format!("{corpus}-ntp{tag}"));
        let mut variants = vec![("next-token".to_string(), 1, ntp_dir.clone(), TrainSettings { horizon: 1, rank: 1, ..base.clone() })];
        for r in RANKS {
            variants.push((
                "scratch".into(),
                r,
                run_dir.join(format!("{corpus}-n4-r{r}{tag}")),
                TrainSettings { horizon: HORIZON, rank: r, ..base.clone() },
            ));
        }
        for r in RANKS {
            // on the next-token model's best weights
            let settings = TrainSettings {
                horizon: HORIZON,
                rank: r,
                init_from: checkpoint::best_path(&ntp_dir),
                freeze_backbone: true,
                ..base.clone()
            };
            variants.push(("head-only".into(), r, run_dir.join(format!("{corpus}-ft-r{r}{tag}")), settings));
        }
        let finished = |rows: &[Value], kind: &str, rank: usize| {
            rows.iter().any(|row| cell_of(row) == (corpus.clone(), kind.into(), rank as u64, seed))
        };
        // a rank above 1 is measured at equal tokens and at r = 1's time, each a row
        let cell_done = |rows: &[Value], kind: &str, rank: usize| {
            finished(rows, kind, rank) && (rank == 1 || kind == "next-token" || finished(rows, &format!("{kind}, r=1's time"), rank))
        };
        // the next-token model is trained again (bit for bit the same) when a head-only run
        // still needs its best weights and a new device session no longer holds them
        let ntp_best = checkpoint::best_path(&ntp_dir).filter(|best| checkpoint::exists(best));
        let ntp_needed = RANKS.iter().any(|&r| !cell_done(&rows, "head-only", r)) && ntp_best.is_none();
        for (kind, rank, out, settings) in variants {
            // the equal-wall-clock view: a rank above 1 is also measured at the time its r = 1
            // run took (that run is measured first: the ranks go in increasing order)
            let timed_kind = format!("{kind}, r=1's time");
            let r1_seconds = rows
                .iter()
                .find(|row| cell_of(row) == (corpus.clone(), kind.clone(), 1, seed))
                .and_then(|row| row["train_seconds"].as_f64())
                .filter(|_| rank > 1 && kind != "next-token");
            let full_done = finished(&rows, &kind, rank);
            let timed_done = r1_seconds.is_none() || finished(&rows, &timed_kind, rank);
            if full_done && timed_done && !(kind == "next-token" && ntp_needed) {
                continue;
            }
            if let Some(deadline) = study.deadline_s {
                // a full run as long as the longest of its kind and rank so far; a timed-only
                // redo as long as r = 1's run
                let full_s = rows
                    .iter()
                    .filter(|row| row["kind"] == kind.as_str() && row["rank"] == rank)
                    .filter_map(|row| row["train_seconds"].as_f64())
                    .fold(0.0, f64::max);
                let trains_in_full = !full_done || kind == "next-token";
                let expected = if trains_in_full { full_s } else { r1_seconds.unwrap_or(0.0) } + MEASURE_ALLOWANCE_S;
                if started.elapsed().as_secs_f64() + expected > deadline {
                    eprintln!("== stopping before {corpus}: {kind} r={rank} seed {seed}: about {expected:.0} s would pass the deadline");
                    break 'cells;
                }
            }
            let at = started.elapsed().as_secs();
            eprintln!("== {corpus}: {kind} n={} r={rank} seed {seed} ({at} s into this session of the study)", settings.horizon);
            let equal_time = run_dir.join(format!("{}-at-r1-time", out.file_name().unwrap_or_default().to_string_lossy()));
            // a cell stopped midway starts again, its best weights too
            for dir in [&out, &equal_time].into_iter().flat_map(|dir| std::iter::once(dir.clone()).chain(checkpoint::best_path(dir))) {
                let _ = std::fs::remove_dir_all(dir);
            }
            let options = RunOptions { show_progress: true, device: study.device, ..Default::default() };
            let mut new_rows = Vec::new();
            let summary = match r1_seconds.filter(|_| !timed_done) {
                None => Some(train::train(data, &out, settings.clone(), &options)?),
                Some(seconds) => {
                    // first only for r = 1's time; then on to the same number of tokens (a
                    // resumed run ends bit for bit as an uninterrupted one)
                    let timed = RunOptions { stop_after_seconds: Some(seconds), ..options.clone() };
                    let stopped = match train::train(data, &out, settings.clone(), &timed) {
                        Ok(summary) => Some(summary), // finished within r = 1's time: the views agree
                        Err(multitoken::error::Error::Interrupted { .. }) => None,
                        Err(e) => return Err(e.into()),
                    };
                    let best = checkpoint::best_path(&out).zip(checkpoint::best_path(&equal_time));
                    for (from, to) in std::iter::once((out.clone(), equal_time.clone())).chain(best) {
                        if from.exists() {
                            copy_dir(&from, &to)?;
                        }
                    }
                    let (training, chosen) = match &stopped {
                        Some(summary) => (Training::of(summary), best_validation(&equal_time)?),
                        None => measure_stopped(&equal_time, data, seconds, &study)?,
                    };
                    new_rows.push(decode_row(corpus, &timed_kind, seed, &chosen, &training, &study, &budget)?);
                    match stopped {
                        Some(summary) => Some(summary),
                        // measured at equal tokens before: only its equal-time row was missing
                        None if full_done => None,
                        None => {
                            let rest = train::train(data, &out, settings.clone(), &RunOptions { resume: true, ..options.clone() })?;
                            Some(train::TrainSummary { elapsed_s: seconds + rest.elapsed_s, ..rest })
                        }
                    }
                }
            };
            if let Some(summary) = summary {
                new_rows.insert(0, decode_row(corpus, &kind, seed, &best_validation(&out)?, &Training::of(&summary), &study, &budget)?);
            }
            for row in new_rows {
                eprintln!("{row}");
                rows.retain(|other| cell_of(other) != cell_of(&row));
                rows.push(row);
            }
            // every finished cell is on disk at once, the file replaced whole (a redone cell
            // replaces its row)
            let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
            multitoken::data::write_atomically(&results_path, text.as_bytes())?;
        }
    }
    // read in the study's order, whatever order the cells were measured in
    let kinds = ["next-token", "scratch", "scratch, r=1's time", "head-only", "head-only, r=1's time"];
    rows.sort_by_key(|row| {
        let (corpus, kind, rank, seed) = cell_of(row);
        let corpus_at = corpora.iter().position(|(name, _)| *name == corpus).unwrap_or(usize::MAX);
        let kind_at = kinds.iter().position(|name| *name == kind).unwrap_or(usize::MAX);
        (corpus_at, kind_at, rank, seed)
    });
    let (table, svg) = (markdown(&rows, steps, &model, seq, batch), plot(&rows));
    std::fs::write(run_dir.join("table.md"), &table)?;
    std::fs::write(run_dir.join("rank-table.svg"), &svg)?;
    // docs/ holds one study, the one its text reads: written only when asked for
    if std::env::var("RANK_TABLE_DOCS").is_ok_and(|v| v == "1") {
        let docs = Path::new(DOCS_DIR);
        std::fs::write(docs.join("rank-table.svg"), &svg)?;
        // the rows themselves, for a reader to check the table against
        std::fs::copy(&results_path, docs.join("rank-table.jsonl"))?;
        update_results(&docs.join("results.md"), &table)?;
    }
    println!("{table}");
    Ok(())
}

/// The median of `values`: the middle one, or the mean of the two middle ones of an even count
/// (over two seeds, their mean).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        len if len % 2 == 1 => values[len / 2],
        len => (values[len / 2 - 1] + values[len / 2]) / 2.0,
    }
}

/// The upper median of `values`, the ⌊len/2⌋-th smallest (0-based): a value some prompt reached,
/// as the medians over prompts are.
fn upper_median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The element-wise upper median of equal-length lists (acceptance by position over prompts).
fn upper_median_lists(lists: &[Vec<f64>]) -> Vec<f64> {
    let len = lists.first().map_or(0, Vec::len);
    (0..len).map(|i| upper_median(lists.iter().map(|l| l[i]).collect())).collect()
}

/// How long a run trained, and how fast.
struct Training {
    steps: u64,
    seconds: f64,
    tokens_per_s: f64,
}

impl Training {
    fn of(summary: &train::TrainSummary) -> Self {
        Training { steps: summary.steps, seconds: summary.elapsed_s, tokens_per_s: summary.tokens_per_s }
    }
}

/// The weights a run is measured at, and the validation (a metrics.jsonl row: step, losses,
/// gate statistics) that chose them.
struct Chosen {
    weights: PathBuf,
    validation: Value,
}

/// Early stopping: the run's weights with the lowest validation joint loss (its `-best`
/// sibling) and the validation that chose them. Every run sees the same tokens, but a small
/// corpus seen many times over is overfitted well before the end, the next-token model most.
fn best_validation(dir: &Path) -> anyhow::Result<Chosen> {
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl"))?;
    let validation = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|row| row["val_joint_loss"].is_f64())
        .min_by(|a, b| a["val_joint_loss"].as_f64().unwrap_or(f64::NAN).total_cmp(&b["val_joint_loss"].as_f64().unwrap_or(f64::NAN)))
        .ok_or_else(|| anyhow::anyhow!("{} holds no validation", dir.display()))?;
    let weights = checkpoint::best_path(dir)
        .filter(|best| checkpoint::exists(best))
        .ok_or_else(|| anyhow::anyhow!("{} has no best weights", dir.display()))?;
    Ok(Chosen { weights, validation })
}

/// A run stopped at `seconds` (its checkpoint in `dir`), measured as [`best_validation`] would
/// had it validated where it stopped: its stopped weights when they beat its best validation
/// so far, else that validation's weights.
fn measure_stopped(dir: &Path, data: &Path, seconds: f64, study: &Study) -> anyhow::Result<(Training, Chosen)> {
    let ckpt = checkpoint::load_for_resume(dir)?;
    let state = ckpt.resume.as_ref().ok_or_else(|| anyhow::anyhow!("{} has no training state", dir.display()))?;
    let dataset = train::Dataset::load(data)?;
    // the validation rows and precision of the run's own validations, to compare with them
    let settings = &state.settings;
    let batches = settings.eval_batches * settings.grad_accum;
    let val = multitoken::data::batches::validation_batches(&dataset.val, settings.batch, settings.seq, ckpt.config.horizon, batches)?;
    let device = study.device.open(settings.precision)?;
    let params = train::params_to_device(&ckpt.config, &ckpt.params, &device)?;
    let losses = train::evaluate::evaluate_batches(&ckpt.config, &params, &val)?;
    let metrics: Vec<Value> =
        std::fs::read_to_string(dir.join("metrics.jsonl"))?.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let tokens_per_s = metrics.iter().rev().find_map(|r| r["tokens_per_s"].as_f64()).unwrap_or(f64::NAN);
    let training = Training { steps: state.step, seconds, tokens_per_s };
    let stopped = Chosen {
        weights: dir.into(),
        validation: json!({
            "step": state.step,
            "val_joint_loss": losses.joint_loss,
            "val_ntp_loss": losses.ntp_loss,
            "val_head_losses": losses.head_losses,
            "gate_entropy": losses.gate_entropy,
            "expert_fraction": losses.expert_fraction,
        }),
    };
    let chosen = match best_validation(dir) {
        Ok(best) if best.validation["val_joint_loss"].as_f64().is_some_and(|b| b <= losses.joint_loss) => best,
        _ => stopped,
    };
    Ok((training, chosen))
}

/// Copies a checkpoint directory (files only), replacing `to`.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// The study's prompts for `corpus`: the first `count` of the committed held-out prompts in
/// examples/prompts/CORPUS.jsonl (cut from the end of the corpus that validation holds out, by
/// scripts/held-out-prompts.py), each at most [`PROMPT_TOKENS`] tokens.
fn prompts_for(corpus: &str, tok: &tokenizers::Tokenizer, count: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let committed = Path::new(PROMPTS_DIR).join(format!("{corpus}.jsonl"));
    let text = std::fs::read_to_string(&committed)
        .map_err(|e| anyhow::anyhow!("cannot read the prompts of corpus {corpus}, {}: {e}", committed.display()))?;
    let texts: Vec<String> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    anyhow::ensure!(texts.len() >= count, "{} holds {} prompts, fewer than the {count} asked for", committed.display(), texts.len());
    texts[..count]
        .iter()
        .map(|t| {
            let ids = tokenizer::encode(tok, t)?;
            Ok(ids[ids.len().saturating_sub(PROMPT_TOKENS)..].to_vec())
        })
        .collect()
}

/// Decoding measurements of one trained checkpoint, after `study.prompts` prompts from the
/// validation split (medians over them), with its training's loss, time and gate statistics.
#[allow(clippy::too_many_arguments)]
fn decode_row(
    corpus: &str,
    kind: &str,
    seed: u64,
    chosen: &Chosen,
    training: &Training,
    study: &Study,
    budget: &Value,
) -> anyhow::Result<Value> {
    let ckpt = checkpoint::load(&chosen.weights)?;
    let tok = tokenizer::from_json(ckpt.tokenizer_json.as_deref().unwrap_or_default(), &chosen.weights)?;
    let prompts = prompts_for(corpus, &tok, study.prompts)?;
    let sampled_config = SamplingConfig { greedy: false, temperature: 1.0, top_k: 0, top_p: 1.0 };
    let (mut greedy, mut sampled) = (Vec::new(), Vec::new());
    for prompt in &prompts {
        let _ = tokenizer::decode(&tok, prompt)?;
        let run = |sampling: &SamplingConfig| {
            bench_decode(&ckpt.config, &ckpt.params, prompt, NEW_TOKENS, sampling, 0, 1, study.device, Draft::Mixture, 1, Precision::F32)
        };
        greedy.push(run(&SamplingConfig::greedy())?);
        sampled.push(run(&sampled_config)?);
    }
    let of = |runs: &[multitoken::bench::BenchDecodeResult], key: fn(&multitoken::bench::BenchDecodeResult) -> f64| {
        upper_median(runs.iter().map(key).collect())
    };
    let acceptance = |runs: &[multitoken::bench::BenchDecodeResult]| {
        upper_median_lists(&runs.iter().map(|r| r.acceptance_rates.clone()).collect::<Vec<_>>())
    };
    let validation = &chosen.validation;
    Ok(json!({
        "corpus": corpus,
        "kind": kind,
        "seed": seed,
        "horizon": ckpt.config.horizon,
        "rank": ckpt.config.rank,
        "val_joint_loss": validation["val_joint_loss"],
        "val_ntp_loss": validation["val_ntp_loss"],
        "val_head_losses": validation["val_head_losses"],
        "measured_step": validation["step"],
        "steps": training.steps,
        "train_seconds": training.seconds,
        "train_tokens_per_s": training.tokens_per_s,
        "gate_entropy": validation["gate_entropy"],
        "expert_fraction": validation["expert_fraction"],
        "budget": budget,
        "vocab_size": ckpt.config.vocab_size,
        "prompts": prompts.len(),
        "greedy_mean_accepted": of(&greedy, |r| r.mean_accepted),
        "greedy_acceptance": acceptance(&greedy),
        "greedy_speedup": of(&greedy, |r| r.speedup),
        "greedy_identical": greedy.iter().all(|r| r.identical_output != Some(false)),
        "sampled_mean_accepted": of(&sampled, |r| r.mean_accepted),
        "sampled_acceptance": acceptance(&sampled),
        "sampled_speedup": of(&sampled, |r| r.speedup),
        "ar_tokens_per_s": of(&greedy, |r| r.ar_tokens_per_s),
        "spec_tokens_per_s": of(&greedy, |r| r.spec_tokens_per_s),
        "step_cost_ratio": of(&greedy, |r| r.step_cost_ratio),
        "device": study.device,
        "precision": study.precision,
    }))
}

fn fmt_list(v: &Value) -> String {
    v.as_array().map(|a| a.iter().map(|x| format!("{:.2}", x.as_f64().unwrap_or(0.0))).collect::<Vec<_>>().join(" ")).unwrap_or_default()
}

fn markdown(rows: &[Value], steps: u64, model: &str, seq: usize, batch: usize) -> String {
    let prompts = rows.iter().filter_map(|r| r["prompts"].as_u64()).max().unwrap_or(1);
    let mut out = format!(
        "Model `{model}`, {steps} steps of B = {batch}, T = {seq} ({} tokens per run), n = {HORIZON}, validated every {} steps; each run is measured at its weights of lowest validation joint loss (at the step shown). Decoding: {NEW_TOKENS} new tokens after each of {prompts} held-out prompt(s) of at most {PROMPT_TOKENS} tokens (examples/prompts; upper medians over them, the ⌊P/2⌋-th smallest from 0 of P).\n\n",
        steps as usize * batch * seq,
        (steps / VALIDATIONS).max(1)
    );
    out += "| corpus | training | r | seed | step | val joint | val next-token | val by horizon | greedy accepted/pass | greedy acceptance by draft position | sampled (T=1) accepted/pass | sampled acceptance by draft position | greedy speed-up | spec pass / AR pass | gate entropy | expert shares | training tokens/s | training s |\n";
    out += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    let at_r1_time = |r: &&Value| r["kind"].as_str().is_some_and(|k| k.ends_with("r=1's time"));
    for r in rows.iter().filter(|r| !at_r1_time(r)) {
        out += &format!(
            "| {} | {} | {} | {} | {} | {:.3} | {:.3} | {} | {:.2} | {} | {:.2} | {} | {:.2}× | {:.2} | {} | {} | {:.0} | {:.0} |\n",
            r["corpus"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or(""),
            r["rank"],
            r["seed"].as_u64().unwrap_or(1337),
            r["measured_step"],
            r["val_joint_loss"].as_f64().unwrap_or(f64::NAN),
            r["val_ntp_loss"].as_f64().unwrap_or(f64::NAN),
            fmt_list(&r["val_head_losses"]),
            r["greedy_mean_accepted"].as_f64().unwrap_or(f64::NAN),
            fmt_list(&r["greedy_acceptance"]),
            r["sampled_mean_accepted"].as_f64().unwrap_or(f64::NAN),
            fmt_list(&r["sampled_acceptance"]),
            r["greedy_speedup"].as_f64().unwrap_or(f64::NAN),
            r["step_cost_ratio"].as_f64().unwrap_or(f64::NAN),
            r["gate_entropy"].as_f64().map_or(String::new(), |e| format!("{e:.2}")),
            fmt_list(&r["expert_fraction"]),
            r["train_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            r["train_seconds"].as_f64().unwrap_or(f64::NAN),
        );
    }
    out += &over_seeds(rows);
    let timed: Vec<&Value> = rows.iter().filter(at_r1_time).collect();
    if !timed.is_empty() {
        out += "\nEqual wall-clock: each rank above 1 stopped at the training time of its r = 1 run (same corpus, training and seed), beside the same run at equal tokens.\n\n";
        out += "| corpus | training | r | seed | tokens seen at r = 1's time | val next-token: equal time / equal tokens | greedy accepted/pass: equal time / equal tokens | sampled accepted/pass: equal time / equal tokens |\n";
        out += "| --- | --- | --- | --- | --- | --- | --- | --- |\n";
        for t in timed {
            let kind = t["kind"].as_str().unwrap_or_default().trim_end_matches(", r=1's time");
            let same = |r: &&Value| r["corpus"] == t["corpus"] && r["kind"] == kind && r["rank"] == t["rank"] && r["seed"] == t["seed"];
            let Some(full) = rows.iter().find(same) else { continue };
            let pair = |key: &str, digits: usize| {
                format!("{:.digits$} / {:.digits$}", t[key].as_f64().unwrap_or(f64::NAN), full[key].as_f64().unwrap_or(f64::NAN))
            };
            out += &format!(
                "| {} | {kind} | {} | {} | {} of {} | {} | {} | {} |\n",
                t["corpus"].as_str().unwrap_or(""),
                t["rank"],
                t["seed"].as_u64().unwrap_or(1337),
                t["steps"].as_u64().unwrap_or(0) as usize * batch * seq,
                steps as usize * batch * seq,
                pair("val_ntp_loss", 3),
                pair("greedy_mean_accepted", 2),
                pair("sampled_mean_accepted", 2),
            );
        }
    }
    out
}

/// Medians over seeds with their spread (lowest to highest), one row per corpus, training and
/// rank; empty when every cell has one seed.
fn over_seeds(rows: &[Value]) -> String {
    let mut cells: Vec<(String, String, u64)> = Vec::new();
    for row in rows {
        let (corpus, kind, rank, _) = cell_of(row);
        if !cells.contains(&(corpus.clone(), kind.clone(), rank)) {
            cells.push((corpus, kind, rank));
        }
    }
    let seeded = |cell: &(String, String, u64)| -> Vec<&Value> {
        rows.iter().filter(|r| (cell_of(r).0, cell_of(r).1, cell_of(r).2) == *cell).collect()
    };
    if cells.iter().all(|cell| seeded(cell).len() < 2) {
        return String::new();
    }
    let spread = |of: &[&Value], key: &str, digits: usize| {
        let values: Vec<f64> = of.iter().filter_map(|r| r[key].as_f64()).collect();
        let (low, high) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        format!("{:.digits$} ({low:.digits$}–{high:.digits$})", median(values.clone()))
    };
    let mut out = String::from("\nOver seeds: the median, and the lowest to the highest in brackets.\n\n");
    out += "| corpus | training | r | seeds | val joint | val next-token | greedy accepted/pass | sampled accepted/pass | training tokens/s | training s |\n";
    out += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for cell in &cells {
        let of = seeded(cell);
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            cell.0,
            cell.1,
            cell.2,
            of.len(),
            spread(&of, "val_joint_loss", 3),
            spread(&of, "val_ntp_loss", 3),
            spread(&of, "greedy_mean_accepted", 2),
            spread(&of, "sampled_mean_accepted", 2),
            spread(&of, "train_tokens_per_s", 0),
            spread(&of, "train_seconds", 0),
        );
    }
    out
}

/// The median over seeds of `key` at each rank, for one corpus and training.
fn by_rank(rows: &[Value], corpus: &str, kind: &str, key: &str) -> Vec<(f64, f64)> {
    RANKS
        .iter()
        .filter_map(|&r| {
            let values: Vec<f64> = rows
                .iter()
                .filter(|row| row["corpus"] == corpus && row["kind"] == kind && row["rank"].as_u64() == Some(r as u64))
                .filter_map(|row| row[key].as_f64())
                .collect();
            (!values.is_empty()).then(|| (r as f64, median(values)))
        })
        .collect()
}

/// One plotted series; only a labelled one has a legend entry.
struct Line {
    label: Option<String>,
    color: RGBColor,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

/// Two panels against rank, medians over seeds, one colour per corpus and training: mean
/// accepted tokens per pass (greedy solid, sampled at T = 1 dashed), and the validation joint
/// loss as a change from r = 1's.
fn plot(rows: &[Value]) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 480)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let (left, right) = root.split_horizontally(600);
        let corpora: Vec<String> = rows.iter().filter_map(|r| r["corpus"].as_str().map(String::from)).fold(Vec::new(), |mut v, c| {
            if !v.contains(&c) {
                v.push(c);
            }
            v
        });
        let series: Vec<(String, &str, RGBColor)> = corpora
            .iter()
            .flat_map(|c| ["scratch", "head-only"].map(|k| (c.clone(), k)))
            .zip([BLUE, RED, GREEN, MAGENTA, CYAN, BLACK].into_iter().cycle())
            .map(|((c, k), color)| (c, k, color))
            .collect();

        let accepted: Vec<Line> = series
            .iter()
            .flat_map(|(c, k, color)| {
                [
                    Line {
                        label: Some(format!("{c} {k}")),
                        color: *color,
                        dashed: false,
                        points: by_rank(rows, c, k, "greedy_mean_accepted"),
                    },
                    Line { label: None, color: *color, dashed: true, points: by_rank(rows, c, k, "sampled_mean_accepted") },
                ]
            })
            .collect();
        let top = accepted.iter().flat_map(|l| l.points.iter().map(|p| p.1)).fold(2.0f64, f64::max);
        let caption = "Mean accepted tokens per pass (n = 4): greedy solid, sampled dashed";
        panel(&left, caption, "tokens per pass", 0.9..top + 0.4 * (top - 0.9), accepted, SeriesLabelPosition::UpperLeft);

        let change: Vec<Line> = series
            .iter()
            .map(|(c, k, color)| {
                let points = by_rank(rows, c, k, "val_joint_loss");
                let at_r1 = points.first().filter(|p| p.0 == 1.0).map(|p| p.1);
                let relative = at_r1.map_or(Vec::new(), |base| points.iter().map(|&(r, v)| (r, 100.0 * (v / base - 1.0))).collect());
                Line { label: Some(format!("{c} {k}")), color: *color, dashed: false, points: relative }
            })
            .collect();
        let low = change.iter().flat_map(|l| l.points.iter().map(|p| p.1)).fold(-2.0f64, f64::min);
        let high = change.iter().flat_map(|l| l.points.iter().map(|p| p.1)).fold(0.0f64, f64::max);
        let caption = "Validation joint loss, change from r = 1";
        panel(&right, caption, "%", (low - 1.0)..(high + 1.0), change, SeriesLabelPosition::UpperRight);
        let _ = root.present();
    }
    svg
}

/// One panel of [`plot`]: `lines` against rank over `y_range`.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    y_desc: &str,
    y_range: std::ops::Range<f64>,
    lines: Vec<Line>,
    legend_at: SeriesLabelPosition,
) {
    let Ok(mut chart) = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(0.8f64..8.5f64, y_range)
    else {
        return;
    };
    let _ = chart.configure_mesh().x_desc("rank r").y_desc(y_desc).draw();
    for Line { label, color, dashed, points } in lines {
        let style = color.stroke_width(2);
        let drawn = if dashed {
            chart.draw_series(DashedLineSeries::new(points.clone(), 6, 4, style))
        } else {
            chart.draw_series(LineSeries::new(points.clone(), style))
        };
        if let (Ok(drawn), Some(label)) = (drawn, label) {
            drawn.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        }
        let _ = chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())));
    }
    let _ = chart.configure_series_labels().position(legend_at).background_style(WHITE.mix(0.8)).border_style(BLACK).draw();
}

/// Replaces the text between the rank-table markers of docs/results.md.
fn update_results(path: &Path, table: &str) -> anyhow::Result<()> {
    let (start, end) = ("<!-- rank-table:start -->", "<!-- rank-table:end -->");
    let text = std::fs::read_to_string(path)?;
    let (Some(a), Some(b)) = (text.find(start), text.find(end)) else {
        anyhow::bail!("{} lacks the rank-table markers", path.display());
    };
    let updated = format!("{}{start}\n{table}\n![mean accepted against rank](rank-table.svg)\n\n{}", &text[..a], &text[b..]);
    std::fs::write(path, updated)?;
    Ok(())
}
