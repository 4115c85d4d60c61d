//! Training: AdamW, the schedule, the loop, checkpoints, metrics and the loss plot.

pub mod adamw;
pub mod checkpoint;
pub mod evaluate;
pub mod plot;
pub mod schedule;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use self::adamw::{clip_scale, grad_norm, AdamW, AdamWConfig};
use self::checkpoint::{Checkpoint, ResumeState};
use crate::autograd::Tape;
use crate::data::{self, batches, tokens, Batch};
use crate::device::{DeviceKind, Precision};
use crate::distributed::{DataParallel, Replica};
use crate::error::{Error, Result};
use crate::invalid;
use crate::model::config::ShapeOverrides;
use crate::model::{gpt2, model_loss, ModelConfig, ModelParams};
use crate::tensor::{Device, Float, Rng, Tensor};

/// Set by a Ctrl-C or SIGTERM handler: the loop finishes its step, saves and stops.
pub static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Everything that determines a run; saved in train_state.json so `--resume` continues it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// the `--model` preset (ignored with `init_from`, whose backbone is used)
    pub model: String,
    /// n, tokens predicted per position
    pub horizon: usize,
    /// r, mixture components of the CP head
    pub rank: usize,
    /// λ, the weight of the load-balancing term (always off when r = 1)
    pub aux_coef: f64,
    /// optimisation steps of the whole run
    pub steps: u64,
    /// B, rows per batch
    pub batch: usize,
    /// T, positions per row; 0 asks for the model's n_positions (a saved run holds the value used)
    pub seq: usize,
    /// the peak learning rate
    pub lr: f64,
    /// where the cosine decay ends, as a fraction of `lr`
    pub min_lr_ratio: f64,
    /// linear warm-up steps; `None` asks for [`default_warmup`] (a saved run holds the value used)
    pub warmup_steps: Option<u64>,
    /// the global gradient-norm limit
    pub grad_clip: f64,
    /// validate every this many steps (and after the last)
    pub eval_every: u64,
    /// validation batches, fixed, from the start of val.bin
    pub eval_batches: usize,
    /// write the checkpoint every this many steps (and after the last); 0: only at the end
    pub save_every: u64,
    /// seeds the initialisation and the batches
    pub seed: u64,
    /// a checkpoint whose backbone the run starts from, with a fresh head
    pub init_from: Option<PathBuf>,
    /// train only the head (W, G, g); needs `init_from`
    pub freeze_backbone: bool,
    /// sizes that replace the preset's (not with `init_from`)
    #[serde(default)]
    pub shape: ShapeOverrides,
    /// AdamW's β2, the decay of the second moment
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    /// AdamW's decoupled weight decay (on matrices)
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// K, micro-batches of `batch` rows whose gradients one step sums (a step sees B·K rows)
    #[serde(default = "default_grad_accum")]
    pub grad_accum: usize,
    /// the matrix products' precision; a resumed run keeps it (runs saved before it was
    /// recorded read as f32)
    #[serde(default)]
    pub precision: Precision,
}

// runs saved before these settings existed used these values
fn default_beta2() -> f64 {
    AdamWConfig::default().beta2
}
fn default_weight_decay() -> f64 {
    AdamWConfig::default().weight_decay
}
fn default_grad_accum() -> usize {
    1
}

impl Default for TrainSettings {
    fn default() -> Self {
        TrainSettings {
            model: "small".into(),
            horizon: 1,
            rank: 1,
            aux_coef: 0.01,
            steps: 1000,
            batch: 8,
            seq: 0,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: None,
            grad_clip: 1.0,
            eval_every: 100,
            eval_batches: 8,
            save_every: 250,
            seed: 1337,
            init_from: None,
            freeze_backbone: false,
            shape: ShapeOverrides::default(),
            beta2: default_beta2(),
            weight_decay: default_weight_decay(),
            grad_accum: 1,
            precision: Precision::F32,
        }
    }
}

impl TrainSettings {
    /// AdamW's constants for this run.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig { beta2: self.beta2, weight_decay: self.weight_decay, ..AdamWConfig::default() }
    }
}

/// What `train` reports (docs/cli.md, `train`; the first five keys are the contract).
#[derive(Debug, Serialize)]
pub struct TrainSummary {
    /// steps done
    pub steps: u64,
    /// the objective of the last step
    pub train_loss: f64,
    /// the last validation's joint loss
    pub val_joint_loss: f64,
    /// the last validation's next-token loss
    pub val_ntp_loss: f64,
    /// B·K·T tokens per step over the time spent in steps
    pub tokens_per_s: f64,
    /// the last validation's loss of each horizon s = 0..n−1
    pub val_head_losses: Vec<f64>,
    /// wall-clock seconds of this call's training loop (a resumed run counts from the resume)
    pub elapsed_s: f64,
    /// the checkpoint directory (`--out`)
    pub checkpoint: PathBuf,
    /// the process's peak resident memory, in bytes (Linux; 0 elsewhere)
    pub peak_rss_bytes: u64,
    /// on a GPU: the most device memory the pool held
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_gpu_bytes: Option<u64>,
}

/// The training split, the validation split and the tokenizer of a `data prepare` directory.
/// The splits are read through memory maps: a corpus larger than memory trains.
pub struct Dataset {
    /// the tokens of train.bin
    pub train: tokens::MappedTokens,
    /// the tokens of val.bin
    pub val: tokens::MappedTokens,
    /// V, from the token files' headers
    pub vocab_size: usize,
    /// the text of tokenizer.json
    pub tokenizer_json: String,
}

impl Dataset {
    /// Opens the token files and reads the tokenizer of a directory written by `data prepare`.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::bad_file(dir, "no such data directory (make one with `multitoken data prepare`)"));
        }
        let train = tokens::MappedTokens::open(&dir.join(data::TRAIN_FILE))?;
        let val = tokens::MappedTokens::open(&dir.join(data::VAL_FILE))?;
        if train.vocab_size() != val.vocab_size() {
            return Err(Error::bad_file(dir, "train.bin and val.bin disagree on the vocabulary size; run `multitoken data prepare` again"));
        }
        let tokenizer_path = dir.join(data::TOKENIZER_FILE);
        let (tokenizer, tokenizer_json) = data::tokenizer::load_with_json(&tokenizer_path)?;
        let tokenizer_size = tokenizer.get_vocab_size(true);
        if tokenizer_size != train.vocab_size() as usize {
            return Err(Error::bad_file(
                dir,
                format!(
                    "the token files' vocabulary ({}) differs from tokenizer.json's ({tokenizer_size}); run `multitoken data prepare` again",
                    train.vocab_size()
                ),
            ));
        }
        Ok(Dataset { vocab_size: train.vocab_size() as usize, train, val, tokenizer_json })
    }
}

/// The knobs of one optimisation step.
#[derive(Clone, Copy, Debug)]
pub struct StepConfig {
    /// the learning rate of this step
    pub lr: f64,
    /// global gradient-norm limit
    pub grad_clip: f64,
    /// λ, the load-balancing coefficient
    pub aux_coef: f64,
}

/// Runs one training step: forward, backward, clipping, AdamW, on the device where `params`
/// (and the optimizer's moments) live. Returns (objective, gradient norm before clipping); a
/// step whose objective or norm is not finite changes nothing.
pub fn train_step<T: Float>(
    config: &ModelConfig,
    params: &mut ModelParams<Tensor<T>>,
    optimizer: &mut AdamW<T>,
    batch: &Batch,
    step: StepConfig,
    trainable: &dyn Fn(&str) -> bool,
) -> Result<(f64, f64)> {
    train_step_accumulated(config, params, optimizer, std::slice::from_ref(batch), step, trainable)
}

/// One training step over K micro-batches (gradient accumulation): each is a forward and a
/// backward on its own tape, their gradients are summed, and the update uses the mean, as one
/// step over all their rows would (apart from the load-balancing term, which each micro-batch
/// computes over its own rows). The objective returned is the micro-batches' mean.
pub fn train_step_accumulated<T: Float>(
    config: &ModelConfig,
    params: &mut ModelParams<Tensor<T>>,
    optimizer: &mut AdamW<T>,
    micro_batches: &[Batch],
    step: StepConfig,
    trainable: &dyn Fn(&str) -> bool,
) -> Result<(f64, f64)> {
    let (objective, grad_sums) = accumulate_gradients(config, params, micro_batches, step.aux_coef, trainable)?;
    if !objective.is_finite() {
        return Ok((objective, f64::NAN));
    }
    let norm = apply_gradients(params, optimizer, &grad_sums, micro_batches.len(), step)?;
    Ok((objective, norm))
}

/// The forward and backward passes of a step over K micro-batches: the micro-batches' mean
/// objective, and each parameter's gradient summed over them (None where it is frozen).
pub fn accumulate_gradients<T: Float>(
    config: &ModelConfig,
    params: &ModelParams<Tensor<T>>,
    micro_batches: &[Batch],
    aux_coef: f64,
    trainable: &dyn Fn(&str) -> bool,
) -> Result<(f64, Vec<Option<Tensor<T>>>)> {
    let parts = micro_batches.len() as f64;
    let mut objective = 0.0;
    let mut grad_sums: Vec<Option<Tensor<T>>> = Vec::new();
    for batch in micro_batches {
        let mut tape = Tape::new();
        let vars = gpt2::params_on_tape(&mut tape, config, params, trainable);
        let out = model_loss(&mut tape, config, &vars, batch, aux_coef)?;
        objective += tape.value(out.objective).item().as_f64() / parts;
        let mut grads = tape.backward(out.objective)?;
        let grad_list: Vec<Option<Tensor<T>>> = vars.named().into_iter().map(|(_, v)| grads.take(*v)).collect();
        if grad_sums.is_empty() {
            grad_sums = grad_list;
        } else {
            for (sum, grad) in grad_sums.iter_mut().zip(&grad_list) {
                if let (Some(sum), Some(grad)) = (sum, grad) {
                    sum.add_assign(grad)?;
                }
            }
        }
    }
    Ok((objective, grad_sums))
}

/// The update from gradients summed over `parts` micro-batches: the global norm of their mean
/// (returned), clipping by it, and AdamW. Nothing changes when the norm is not finite.
pub fn apply_gradients<T: Float>(
    params: &mut ModelParams<Tensor<T>>,
    optimizer: &mut AdamW<T>,
    grad_sums: &[Option<Tensor<T>>],
    parts: usize,
    step: StepConfig,
) -> Result<f64> {
    let parts = parts as f64;
    // the mean gradient is the sum / K: its norm, and the update's scale, carry the 1/K
    let norm = grad_norm(grad_sums)? / parts;
    if norm.is_finite() {
        let grad_refs: Vec<Option<&Tensor<T>>> = grad_sums.iter().map(Option::as_ref).collect();
        optimizer.step(&mut params.values_mut(), &grad_refs, step.lr, clip_scale(norm, step.grad_clip) / parts)?;
    }
    Ok(norm)
}

/// The parameters on `device`.
pub fn params_to_device<T: Float>(
    config: &ModelConfig,
    params: &ModelParams<Tensor<T>>,
    device: &Device,
) -> Result<ModelParams<Tensor<T>>> {
    let mut moved = Vec::new();
    for (_, tensor) in params.named() {
        moved.push(tensor.to_device(device)?);
    }
    let mut moved = moved.into_iter();
    Ok(params.map(config, |_, _| moved.next().expect("one tensor per parameter")))
}

/// A run in progress: model, optimizer, settings and the metrics logged so far.
struct Run {
    out_dir: PathBuf,
    /// whether this process writes the run's files: always, but for the ranks other than 0 of
    /// a multi-GPU run
    writes: bool,
    settings: TrainSettings,
    config: ModelConfig,
    params: ModelParams<Tensor<f32>>,
    optimizer: AdamW<f32>,
    tokenizer_json: String,
    metrics: Vec<Value>,
    step: u64,
    best_val_joint_loss: Option<f64>,
}

impl Run {
    fn log(&mut self, row: Value) {
        let path = self.out_dir.join("metrics.jsonl");
        if self.writes {
            if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                let _ = writeln!(file, "{row}");
            }
        }
        self.metrics.push(row);
    }

    fn plot(&self) -> String {
        let curve = |key: &str| -> Vec<(f64, f64)> {
            self.metrics.iter().filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(key)?.as_f64()?))).collect()
        };
        let curves = vec![
            ("train loss".to_string(), curve("train_loss")),
            ("val joint loss".to_string(), curve("val_joint_loss")),
            ("val next-token loss".to_string(), curve("val_ntp_loss")),
        ];
        let title = format!("{} n={} r={}", self.settings.model, self.config.horizon, self.config.rank);
        plot::loss_curves_svg(&title, &curves)
    }

    /// Writes the checkpoint (parameters and optimizer brought to the host), unless the weights
    /// have diverged: a checkpoint is written only if `probe` (a validation batch) still has a
    /// finite loss under its weights, so the last one on disk is always usable.
    fn save(&self, probe: &Batch) -> Result<()> {
        if !self.writes {
            return Ok(());
        }
        let probe_loss = evaluate::evaluate_batches(&self.config, &self.params, std::slice::from_ref(probe))?.joint_loss;
        let params = params_to_device(&self.config, &self.params, &Device::Cpu)?;
        let finite = params.named().iter().all(|(_, t)| t.data().iter().all(|x| x.is_finite()));
        if !(finite && probe_loss.is_finite()) {
            return Err(Error::NonFiniteLoss { step: self.step, value: if finite { probe_loss } else { f64::NAN } });
        }
        let metrics: String = self.metrics.iter().map(|r| format!("{r}\n")).collect();
        let checkpoint = Checkpoint {
            config: self.config.clone(),
            params,
            tokenizer_json: Some(self.tokenizer_json.clone()),
            resume: Some(ResumeState {
                optimizer: self.optimizer.to_device(&Device::Cpu)?,
                step: self.step,
                settings: self.settings.clone(),
                best_val_joint_loss: self.best_val_joint_loss,
            }),
        };
        let extra = vec![("metrics.jsonl".to_string(), metrics.into_bytes()), ("loss.svg".to_string(), self.plot().into_bytes())];
        checkpoint::save(&self.out_dir, &checkpoint, &extra)
    }

    /// Keeps the weights in the `-best` sibling of the output directory when `val_joint_loss`
    /// is the lowest so far (the model only: for `eval`, `sample` and `--init-from`).
    fn keep_if_best(&mut self, val_joint_loss: f64) -> Result<()> {
        if !self.writes || !val_joint_loss.is_finite() || self.best_val_joint_loss.is_some_and(|best| best <= val_joint_loss) {
            return Ok(());
        }
        let dir = checkpoint::best_path(&self.out_dir).ok_or_else(|| Error::bad_file(&self.out_dir, "not a directory path"))?;
        let checkpoint = Checkpoint {
            config: self.config.clone(),
            params: params_to_device(&self.config, &self.params, &Device::Cpu)?,
            tokenizer_json: Some(self.tokenizer_json.clone()),
            resume: None,
        };
        checkpoint::save(&dir, &checkpoint, &vec![])?;
        self.best_val_joint_loss = Some(val_joint_loss);
        Ok(())
    }
}

/// The most tokens one step may hold, B·T: far beyond what any machine here trains on, and a
/// bound on what a batch allocates.
pub const MAX_TOKENS_PER_STEP: usize = 1 << 24;

/// The warm-up when `--warmup` is not given: a tenth of the run, at most 100 steps.
pub fn default_warmup(steps: u64) -> u64 {
    (steps / 10).min(100)
}

/// The most micro-batches one step may add up.
pub const MAX_GRAD_ACCUM: usize = 1 << 16;

/// Checks settings that do not depend on the model (for a fresh run, and again for the saved
/// settings of a resumed one, which a hand edit may have broken).
fn check_settings(s: &TrainSettings) -> Result<()> {
    if s.steps == 0 || s.batch == 0 {
        return invalid!("--steps and --batch must be at least 1");
    }
    check_tokens_per_step(s)?;
    if !(s.lr > 0.0 && s.lr.is_finite()) {
        return invalid!("--lr must be a positive number");
    }
    if !(s.aux_coef >= 0.0 && s.aux_coef.is_finite()) {
        return invalid!("--aux-coef must be a non-negative number");
    }
    if !(0.0..=1.0).contains(&s.min_lr_ratio) {
        return invalid!("--min-lr must lie between 0 and --lr");
    }
    if !(s.grad_clip > 0.0 && s.grad_clip.is_finite()) {
        return invalid!("--grad-clip must be a positive number");
    }
    if !(0.0..1.0).contains(&s.beta2) {
        return invalid!("--beta2 {} must lie in [0, 1)", s.beta2);
    }
    if !(s.weight_decay >= 0.0 && s.weight_decay.is_finite()) {
        return invalid!("--weight-decay {} must be a non-negative number", s.weight_decay);
    }
    if s.eval_batches == 0 {
        return invalid!("validation needs at least one batch");
    }
    if s.grad_accum == 0 || s.grad_accum > MAX_GRAD_ACCUM {
        return invalid!("--grad-accum {} must lie between 1 and {MAX_GRAD_ACCUM}", s.grad_accum);
    }
    s.adamw().validate()?;
    if s.init_from.is_some() && s.shape.any() {
        return invalid!(
            "--n-embd, --n-layer, --n-head and --n-positions cannot be used with --init-from, whose backbone has its own shape"
        );
    }
    if s.freeze_backbone && s.init_from.is_none() {
        return invalid!("--freeze-backbone trains only the head; pass --init-from CKPT with a trained backbone");
    }
    if s.freeze_backbone && s.horizon == 1 && s.rank == 1 {
        return invalid!("--freeze-backbone trains only the head, and n = r = 1 has none; pass --horizon or --rank above 1");
    }
    Ok(())
}

/// Checks that a run's model is the one its settings describe (a preset and the sizes given
/// beside it, unless the backbone came from `--init-from`).
fn check_settings_shape(s: &TrainSettings, config: &ModelConfig) -> Result<()> {
    if s.init_from.is_none() {
        let described = ModelConfig::shaped(&s.model, &s.shape, config.vocab_size, s.horizon, s.rank)?;
        if &described != config {
            return invalid!("the model '{}' with sizes {:?} is not the one in config.json", s.model, s.shape);
        }
    }
    Ok(())
}

/// Refuses a step of more than [`MAX_TOKENS_PER_STEP`] tokens; with `seq` 0 (not yet resolved)
/// only the rows count.
fn check_tokens_per_step(s: &TrainSettings) -> Result<()> {
    if s.batch.saturating_mul(s.grad_accum).saturating_mul(s.seq.max(1)) > MAX_TOKENS_PER_STEP {
        return invalid!(
            "--batch {} × --grad-accum {} × --seq {} is more than {MAX_TOKENS_PER_STEP} tokens per step",
            s.batch,
            s.grad_accum,
            s.seq
        );
    }
    Ok(())
}

/// How much longer than the collective time limit the other ranks of a data-parallel run wait in
/// the all-reduce after `step`: rank 0 writes while they go on, after a step where it validated
/// (the best weights, 4 bytes a parameter) or saved (weights and both AdamW moments, 12), and
/// they allow it the time that takes at 200 MB/s.
fn write_allowance(s: &TrainSettings, parameters: u128, step: u64) -> Duration {
    let validated = step.is_multiple_of(s.eval_every.max(1));
    let saved = s.save_every > 0 && step.is_multiple_of(s.save_every);
    let bytes_per_parameter = if validated { 4.0 } else { 0.0 } + if saved { 12.0 } else { 0.0 };
    Duration::from_secs_f64(parameters as f64 * bytes_per_parameter / 200e6)
}

/// Checks settings against the model they train: the sequence fits its positions, the head is
/// the one the settings name, a step's tokens are bounded.
fn check_settings_fit(s: &TrainSettings, config: &ModelConfig) -> Result<()> {
    if s.seq == 0 || s.seq > config.n_positions {
        return invalid!("--seq {} must lie between 1 and the model's n_positions {}", s.seq, config.n_positions);
    }
    check_tokens_per_step(s)?;
    if (s.horizon, s.rank) != (config.horizon, config.rank) {
        return invalid!(
            "the settings' n = {}, r = {} differ from the model's n = {}, r = {}",
            s.horizon,
            s.rank,
            config.horizon,
            config.rank
        );
    }
    Ok(())
}

/// The settings a resumed run continues with: the saved ones, with the flags given again
/// compared against them. `--eval-every` and `--save-every` may change, `--steps` may move the
/// end (not below the step reached); any other flag must repeat the saved value.
fn resumed_settings(saved: &TrainSettings, given: &TrainSettings, explicit: &[(&str, &str)], step: u64) -> Result<TrainSettings> {
    let (saved_json, given_json) = (serde_json::to_value(saved).expect("json"), serde_json::to_value(given).expect("json"));
    let show = |v: Option<&Value>| v.map_or("none".to_string(), |v| v.to_string());
    for &(flag, pointer) in explicit {
        let (old, new) = match flag {
            "--eval-every" | "--save-every" | "--steps" => continue,
            // the end of the decay as a rate, whatever --lr it came with
            "--min-lr" => (Some(Value::from(saved.min_lr_ratio * saved.lr)), Some(Value::from(given.min_lr_ratio * given.lr))),
            // the directory, however its path is spelled
            "--init-from" => {
                let place = |p: &Option<PathBuf>| {
                    p.as_ref().map(|p| Value::from(p.canonicalize().unwrap_or(p.clone()).to_string_lossy().into_owned()))
                };
                (place(&saved.init_from), place(&given.init_from))
            }
            _ => (saved_json.pointer(pointer).cloned(), given_json.pointer(pointer).cloned()),
        };
        debug_assert!(saved_json.pointer(pointer).is_some(), "{flag}: {pointer} names no setting");
        // integers, strings and paths exactly; rates (floats) up to rounding
        let float = |v: &Option<Value>| v.as_ref().filter(|v| v.is_f64()).and_then(Value::as_f64);
        let same = match (float(&old), float(&new)) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * a.abs().max(b.abs()),
            _ => old == new,
        };
        if !same {
            return invalid!(
                "{flag} {} differs from the checkpoint's {}; a resumed run keeps its settings (repeat them, leave the flag out, or start a new --out)",
                show(new.as_ref()),
                show(old.as_ref())
            );
        }
    }
    let given_flag = |flag: &str| explicit.iter().any(|(f, _)| *f == flag);
    let mut settings = saved.clone();
    if given_flag("--eval-every") {
        settings.eval_every = given.eval_every;
    }
    if given_flag("--save-every") {
        settings.save_every = given.save_every;
    }
    if given_flag("--steps") {
        if given.steps < step {
            return invalid!("--steps {} is below the {step} steps the checkpoint has done", given.steps);
        }
        settings.steps = given.steps;
    }
    if step >= settings.steps {
        return invalid!("the run is finished ({step} of {} steps); pass a larger --steps with --resume to extend it", settings.steps);
    }
    Ok(settings)
}

/// Starts a run: fresh, from `--init-from`, or resumed from the checkpoint in `out_dir` (with
/// `explicit`, the flags given on the command line: (flag, where in the settings' JSON)).
/// Checks and reads; writes nothing.
fn start_run(data: &Dataset, out_dir: &Path, settings: TrainSettings, options: &RunOptions) -> Result<Run> {
    if options.resume {
        if !checkpoint::exists(out_dir) {
            if [checkpoint::MODEL_FILE, checkpoint::OPTIMIZER_FILE, checkpoint::TRAIN_STATE_FILE].iter().any(|f| out_dir.join(f).exists()) {
                return Err(Error::bad_file(
                    out_dir.join(checkpoint::CONFIG_FILE),
                    "missing, so this checkpoint cannot be resumed; restore it (the -best sibling holds the same file) or start a new run with another --out",
                ));
            }
            return Err(Error::bad_file(out_dir, "no checkpoint to resume (start a run without --resume)"));
        }
        let saved = checkpoint::load_for_resume(out_dir)?;
        let state = saved.resume.expect("load_for_resume reads the resume state");
        let state_path = out_dir.join(checkpoint::TRAIN_STATE_FILE);
        check_settings(&state.settings)
            .and_then(|()| check_settings_fit(&state.settings, &saved.config))
            .and_then(|()| check_settings_shape(&state.settings, &saved.config))
            .map_err(|e| Error::bad_file(&state_path, format!("the saved settings are not usable: {e}")))?;
        let settings = resumed_settings(&state.settings, &settings, &options.explicit, state.step)?;
        if saved.config.vocab_size != data.vocab_size {
            return invalid!("the checkpoint's vocabulary ({}) differs from the data's ({})", saved.config.vocab_size, data.vocab_size);
        }
        // Keep the metrics up to the checkpoint's step: later rows belong to steps being redone.
        // (`train` writes them back only once the run is about to start.)
        let metrics_path = out_dir.join("metrics.jsonl");
        let metrics_text = if metrics_path.exists() { crate::data::read_file(&metrics_path)? } else { Vec::new() };
        let metrics: Vec<Value> = String::from_utf8_lossy(&metrics_text)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|r| r.get("step").and_then(Value::as_u64).is_some_and(|s| s <= state.step))
            .collect();
        let tokenizer_json = saved.tokenizer_json.unwrap_or_else(|| data.tokenizer_json.clone());
        return Ok(Run {
            out_dir: out_dir.into(),
            writes: options.writes(),
            settings,
            config: saved.config,
            params: saved.params,
            optimizer: state.optimizer,
            tokenizer_json,
            metrics,
            step: state.step,
            best_val_joint_loss: state.best_val_joint_loss,
        });
    }
    check_settings(&settings)?;
    // rank 0 of a multi-GPU run has checked the directory, and may have written to it already
    if options.writes() && checkpoint::exists(out_dir) {
        return Err(Error::bad_file(out_dir, "already holds a checkpoint; pass --resume to continue it, or choose another --out"));
    }
    if options.writes() && out_dir.exists() && std::fs::read_dir(out_dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::bad_file(out_dir, "exists and is not empty; choose another --out"));
    }
    if let Some(best) = checkpoint::best_path(out_dir).filter(|b| options.writes() && b.exists()) {
        return Err(Error::bad_file(best, "exists, from an earlier run with this --out; remove it or choose another --out"));
    }
    let mut config = ModelConfig::shaped(&settings.model, &settings.shape, data.vocab_size, settings.horizon, settings.rank)?;
    let init = match &settings.init_from {
        Some(init_from) => {
            let init = checkpoint::load(init_from)?;
            if init.config.vocab_size != data.vocab_size {
                return invalid!(
                    "--init-from has a vocabulary of {}, the data {}; prepare the data with that checkpoint's tokenizer",
                    init.config.vocab_size,
                    data.vocab_size
                );
            }
            config = ModelConfig { horizon: settings.horizon, rank: settings.rank, ..init.config.clone() };
            config.validate()?;
            Some(init)
        }
        None => None,
    };
    // the defaults that depend on the model or the run are saved resolved, so a resumed or
    // extended run keeps them
    let seq = if settings.seq == 0 { config.n_positions } else { settings.seq };
    let warmup_steps = Some(settings.warmup_steps.unwrap_or_else(|| default_warmup(settings.steps)));
    let settings = TrainSettings { seq, warmup_steps, ..settings };
    check_settings_fit(&settings, &config)?;
    check_memory(&config, options.device)?;
    let mut rng = Rng::new(settings.seed);
    let mut params = gpt2::init_params::<f32>(&config, &mut rng);
    if let Some(init) = init {
        let head = params.head.take();
        params = ModelParams { head, ..init.params };
    }
    let refs: Vec<&Tensor<f32>> = params.named().into_iter().map(|(_, t)| t).collect();
    let optimizer = AdamW::new(settings.adamw(), &refs);
    Ok(Run {
        out_dir: out_dir.into(),
        writes: options.writes(),
        settings,
        config,
        params,
        optimizer,
        tokenizer_json: data.tokenizer_json.clone(),
        metrics: Vec::new(),
        step: 0,
        best_val_joint_loss: None,
    })
}

/// Refuses, before anything is allocated, a model whose training state cannot fit this
/// machine's memory: on the CPU, four f32 copies of the parameters (weights, gradients and
/// AdamW's two moments) against the memory the system reports. (A GPU's memory is checked by
/// its pool, which reports running out as an error.)
pub(crate) fn check_memory(config: &ModelConfig, device: DeviceKind) -> Result<()> {
    if device != DeviceKind::Cpu {
        return Ok(());
    }
    let needed = config.parameter_count() * 16;
    if let Some(total) = crate::bench::memory_short_of(needed) {
        return invalid!(
            "training this model ({} parameters) needs at least {:.1} GiB for its weights, gradients and AdamW's moments, more than this machine's {:.1} GiB; choose a smaller model",
            config.parameter_count(),
            crate::bench::gib(needed),
            crate::bench::gib(total as u128)
        );
    }
    Ok(())
}

/// How a run is driven, apart from its settings.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// continue the checkpoint in the output directory
    pub resume: bool,
    /// draw a progress bar on stderr
    pub show_progress: bool,
    /// Behave as if interrupted once this many steps are done (tests of `--resume` use it).
    pub stop_after_steps: Option<u64>,
    /// Behave as if interrupted once this many seconds of the training loop have passed: the
    /// rank study's equal-wall-clock checkpoints.
    pub stop_after_seconds: Option<f64>,
    /// where the run computes
    pub device: DeviceKind,
    /// With `resume`: the setting flags given on the command line, as (flag, JSON pointer into
    /// the settings), each checked against the saved run.
    pub explicit: Vec<(&'static str, &'static str)>,
    /// This process's place in a multi-GPU run (`train --gpus N`); None for one device.
    pub replica: Option<Replica>,
}

impl RunOptions {
    /// Whether this process writes the run's files: rank 0 only, in a multi-GPU run.
    fn writes(&self) -> bool {
        self.replica.as_ref().is_none_or(Replica::writes)
    }
}

/// What a run reads and checks before anything is written.
struct Prepared {
    data: Dataset,
    run: Run,
    val_batches: Vec<Batch>,
}

/// Everything `train` checks before its first write, reading only: a mistake creates nothing,
/// not even the lock. The launcher of a multi-GPU run calls it before it starts the ranks.
fn prepare(data_dir: &Path, out_dir: &Path, settings: TrainSettings, options: &RunOptions) -> Result<Prepared> {
    crate::device::check_available(options.device)?;
    // the flags before the corpus is read
    if !options.resume {
        check_settings(&settings)?;
    }
    if options.writes() {
        checkpoint::check_output(out_dir)?;
    }
    let data = Dataset::load(data_dir)?;
    let run = start_run(&data, out_dir, settings, options)?;
    let s = &run.settings;
    if s.precision.check_device(options.device).is_err() {
        return invalid!("this run trains with --precision {}, which needs --device cuda", s.precision.name());
    }
    let world = options.replica.as_ref().map_or(1, |r| r.world_size);
    if !s.batch.is_multiple_of(world) {
        return invalid!("this run's batch of {} rows does not divide among {world} GPUs; choose a --gpus that divides it", s.batch);
    }
    let n = run.config.horizon;
    // the same validation rows whatever the split of B·K into micro-batches
    let val_batches = batches::validation_batches(&data.val, s.batch, s.seq, n, s.eval_batches * s.grad_accum)?;
    batches::training_batch(&data.train, 1, s.seq, n, s.seed, 0)?; // the split holds a row
    Ok(Prepared { data, run, val_batches })
}

/// Checks a run as [`train`] would before its first write, and writes nothing: what the
/// launcher of a multi-GPU run does before it starts the ranks.
pub fn check_run(data_dir: &Path, out_dir: &Path, settings: TrainSettings, options: &RunOptions) -> Result<()> {
    prepare(data_dir, out_dir, settings, options).map(|_| ())
}

/// Trains a model on a prepared data directory, writing checkpoints to `out_dir`.
pub fn train(data_dir: &Path, out_dir: &Path, settings: TrainSettings, options: &RunOptions) -> Result<TrainSummary> {
    let (resume, show_progress) = (options.resume, options.show_progress && options.writes());
    let Prepared { data, mut run, val_batches } = prepare(data_dir, out_dir, settings, options)?;
    let s = run.settings.clone();
    let n = run.config.horizon;
    let _lock = if options.writes() { Some(checkpoint::lock_output(out_dir)?) } else { None };
    if options.writes() {
        if !resume && checkpoint::exists(out_dir) {
            return Err(Error::bad_file(out_dir, "another run wrote a checkpoint here meanwhile; choose another --out"));
        }
        std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        if resume {
            let kept: String = run.metrics.iter().map(|r| format!("{r}\n")).collect();
            data::write_atomically(&out_dir.join("metrics.jsonl"), kept.as_bytes())?;
        }
    }
    // the run's parameters and optimizer state live on the device from here on
    let device = options.device.open_on(s.precision, options.replica.as_ref().map_or(0, |r| r.local_rank))?;
    let mut replicas = options.replica.as_ref().map(|r| DataParallel::join(r, &device)).transpose()?;
    run.params = params_to_device(&run.config, &run.params, &device)?;
    run.optimizer = run.optimizer.to_device(&device)?;
    let trainable = |name: &str| !s.freeze_backbone || name.starts_with("mtp.");
    let warmup = s.warmup_steps.unwrap_or_else(|| default_warmup(s.steps)); // resolved when the run started

    // several ranks validate a shard of the validation rows each, and an all-reduce sums them
    let validate = |run: &Run, replicas: &mut Option<DataParallel>| match replicas {
        None => evaluate::evaluate_batches(&run.config, &run.params, &val_batches),
        Some(replicas) => {
            let shard = (replicas.rank(), replicas.world_size());
            evaluate::evaluate_batch_shards(&run.config, &run.params, &val_batches, shard, &mut |sums| replicas.sum(sums))
        }
    };

    let bar = progress_bar(s.steps, run.step, show_progress);
    let started = Instant::now();
    let (mut step_time, mut steps_timed) = (Duration::ZERO, 0u64);
    let mut train_loss = f64::NAN;
    let mut last_val = None;
    let mut stop_agreed = false;
    let parameters = run.config.parameter_count();
    while run.step < s.steps {
        // a request to stop (Ctrl-C, SIGTERM, --stop-after-seconds) is this process's own; the
        // ranks of a multi-GPU run pass theirs through the all-reduce and stop at the step they
        // agreed on, so that rank 0 saves once
        let out_of_time = options.stop_after_seconds.is_some_and(|limit| started.elapsed().as_secs_f64() >= limit);
        let stop_asked = STOP_REQUESTED.load(Ordering::SeqCst) || out_of_time;
        let stop = if replicas.is_some() { stop_agreed } else { stop_asked };
        if stop || options.stop_after_steps.is_some_and(|k| run.step >= k) {
            bar.abandon();
            run.save(&val_batches[0])?;
            return Err(Error::Interrupted { step: run.step, path: out_dir.into() });
        }
        let step = run.step;
        let lr = schedule::learning_rate(step, s.steps, warmup, s.lr, s.min_lr_ratio);
        // one draw of B·K rows, cut into K micro-batches: the rows do not depend on K
        let batch = batches::training_batch(&data.train, s.batch * s.grad_accum, s.seq, n, s.seed, step)?;
        let mut micro_batches = batch.split_rows(s.grad_accum);
        if let Some(replicas) = &replicas {
            // this rank's rows of every micro-batch: their mean over the ranks is the whole's
            micro_batches = micro_batches.iter().map(|b| b.shard(replicas.rank(), replicas.world_size())).collect();
        }
        let tick = Instant::now();
        let step_config = StepConfig { lr, grad_clip: s.grad_clip, aux_coef: s.aux_coef };
        let (loss, grad_norm) = match &mut replicas {
            None => train_step_accumulated(&run.config, &mut run.params, &mut run.optimizer, &micro_batches, step_config, &trainable),
            Some(replicas) => {
                accumulate_gradients(&run.config, &run.params, &micro_batches, s.aux_coef, &trainable).and_then(|(objective, mut grads)| {
                    let (objective, stop) = replicas.average(&mut grads, objective, stop_asked, write_allowance(&s, parameters, step))?;
                    stop_agreed = stop;
                    if !objective.is_finite() {
                        return Ok((objective, f64::NAN));
                    }
                    let norm = apply_gradients(&mut run.params, &mut run.optimizer, &grads, micro_batches.len(), step_config)?;
                    Ok((objective, norm))
                })
            }
        }
        .inspect_err(|_| bar.abandon())?;
        step_time += tick.elapsed();
        steps_timed += 1;
        if !loss.is_finite() || !grad_norm.is_finite() {
            bar.abandon();
            return Err(Error::NonFiniteLoss { step: step + 1, value: if loss.is_finite() { grad_norm } else { loss } });
        }
        run.step += 1;
        train_loss = loss;
        let tokens_per_s = (steps_timed * (s.batch * s.grad_accum * s.seq) as u64) as f64 / step_time.as_secs_f64();
        bar.set_position(run.step);
        bar.set_message(format!("loss {loss:.4} | {tokens_per_s:.0} tok/s"));
        let last = run.step == s.steps;
        if run.step % 10 == 0 || last {
            run.log(json!({ "step": run.step, "lr": lr, "train_loss": loss, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s }));
        }
        if run.step % s.eval_every.max(1) == 0 || last {
            let val = validate(&run, &mut replicas)?;
            let line = format!("step {:>6} | train {loss:.4} | val joint {:.4} ntp {:.4}", run.step, val.joint_loss, val.ntp_loss);
            if !options.writes() {
                // every rank holds the whole validation; rank 0 reports it
            } else if bar.is_hidden() {
                eprintln!("{line}");
            } else {
                bar.println(line);
            }
            run.log(json!({
                "step": run.step,
                "val_joint_loss": val.joint_loss,
                "val_ntp_loss": val.ntp_loss,
                "val_head_losses": val.head_losses,
                "gate_entropy": val.gate_entropy,
                "expert_fraction": val.expert_fraction,
                "expert_weight": val.expert_weight,
                "aux": val.aux,
            }));
            run.keep_if_best(val.joint_loss).inspect_err(|_| bar.abandon())?;
            last_val = Some(val);
        }
        if (s.save_every > 0 && run.step % s.save_every == 0) || last {
            run.save(&val_batches[0]).inspect_err(|_| bar.abandon())?;
        }
    }
    bar.finish_and_clear();
    let val = match last_val {
        Some(v) => v,
        None => validate(&run, &mut replicas)?,
    };
    let tokens_per_s =
        if steps_timed > 0 { (steps_timed * (s.batch * s.grad_accum * s.seq) as u64) as f64 / step_time.as_secs_f64() } else { 0.0 };
    Ok(TrainSummary {
        steps: run.step,
        train_loss,
        val_joint_loss: val.joint_loss,
        val_ntp_loss: val.ntp_loss,
        tokens_per_s,
        val_head_losses: val.head_losses,
        elapsed_s: started.elapsed().as_secs_f64(),
        checkpoint: out_dir.into(),
        peak_rss_bytes: crate::bench::peak_rss_bytes(),
        peak_gpu_bytes: device.gpu().map(|gpu| gpu.memory_stats().peak_held as u64),
    })
}

fn progress_bar(total: u64, position: u64, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total).with_position(position);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} steps | {msg} | eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranks_allow_rank_0_the_time_its_writes_take_after_the_steps_where_it_writes() {
        let s = TrainSettings { eval_every: 10, save_every: 15, ..TrainSettings::default() };
        let gpt2_small = 124_000_000;
        let seconds = |step| write_allowance(&s, gpt2_small, step).as_secs_f64();
        assert_eq!(seconds(7), 0.0, "rank 0 wrote nothing after step 7");
        assert!((seconds(10) - 2.48).abs() < 1e-9, "the best weights, 4 bytes a parameter at 200 MB/s");
        assert!((seconds(15) - 7.44).abs() < 1e-9, "a checkpoint, 12 bytes a parameter");
        assert!((seconds(30) - 9.92).abs() < 1e-9, "both");
        let no_saves = TrainSettings { save_every: 0, ..s.clone() };
        assert_eq!(write_allowance(&no_saves, gpt2_small, 15).as_secs_f64(), 0.0);
    }
}
