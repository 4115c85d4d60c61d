//! Checkpoints (docs/formats.md): a directory that `transformers.GPT2LMHeadModel` loads.
//!
//! ```text
//! CKPT/config.json            GPT2Config + mtp_horizon, mtp_rank
//! CKPT/model.safetensors      f32, Hugging Face GPT-2 names (Conv1D layout), plus mtp.*
//! CKPT/tokenizer.json
//! CKPT/optimizer.safetensors  exp_avg.NAME, exp_avg_sq.NAME      (for --resume)
//! CKPT/train_state.json       step, settings                     (for --resume)
//! CKPT/metrics.jsonl, loss.svg
//! ```
//!
//! Saving writes a complete new directory beside the old one, then swaps them by renaming:
//! a crash at any point leaves either the old or the new checkpoint whole. If it strikes
//! between the two renames, the old one waits under a hidden name and the next load puts it back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use super::adamw::{AdamW, AdamWConfig};
use super::TrainSettings;
use crate::data::tokenizer;
use crate::error::{Error, Result};
use crate::model::params::ModelParams;
use crate::model::ModelConfig;
use crate::tensor::Tensor;

/// GPT2Config with the head's `mtp_horizon` and `mtp_rank`.
pub const CONFIG_FILE: &str = "config.json";
/// The parameters in f32, by Hugging Face GPT-2 name, plus `mtp.*`.
pub const MODEL_FILE: &str = "model.safetensors";
/// The tokenizer the model was trained with.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// AdamW's moments, `exp_avg.NAME` and `exp_avg_sq.NAME` (for `--resume`).
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The step, the run's settings, and AdamW's constants and step count (for `--resume`).
pub const TRAIN_STATE_FILE: &str = "train_state.json";

/// A model as read from or written to a checkpoint directory.
pub struct Checkpoint {
    /// the model's shape, from config.json
    pub config: ModelConfig,
    /// the weights, on the CPU
    pub params: ModelParams<Tensor<f32>>,
    /// the text of tokenizer.json, where the directory has one
    pub tokenizer_json: Option<String>,
    /// What `--resume` needs: written by `train`, read only by [`load_for_resume`].
    pub resume: Option<ResumeState>,
}

/// What a checkpoint written by `train` adds for `--resume` (train_state.json and
/// optimizer.safetensors).
pub struct ResumeState {
    /// the optimizer's moments and step count, on the CPU
    pub optimizer: AdamW<f32>,
    /// the training steps done
    pub step: u64,
    /// the run's settings
    pub settings: TrainSettings,
    /// the lowest validation joint loss so far, whose weights the `-best` sibling holds
    pub best_val_joint_loss: Option<f64>,
}

/// train_state.json: every field required, no others.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainStateFile {
    step: u64,
    settings: TrainSettings,
    optimizer_steps: u64,
    adamw: AdamWConfig,
    #[serde(default)]
    best_val_joint_loss: Option<f64>,
}

/// Other files to place in the checkpoint directory (metrics, plots).
pub type ExtraFiles = Vec<(String, Vec<u8>)>;

/// The GPT2Config that transformers reads, with the head's shape added.
pub fn hf_config_json(config: &ModelConfig, end_of_text: Option<u32>) -> Value {
    json!({
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.n_positions,
        "n_ctx": config.n_positions,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": null,
        "layer_norm_epsilon": crate::kernels::layernorm::EPS,
        "activation_function": "gelu_new",
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "scale_attn_weights": true,
        "scale_attn_by_inverse_layer_idx": false,
        "tie_word_embeddings": true,
        "bos_token_id": end_of_text,
        "eos_token_id": end_of_text,
        "torch_dtype": "float32",
        "mtp_horizon": config.horizon,
        "mtp_rank": config.rank,
    })
}

/// Reads a GPT2Config: absent fields take GPT2Config's defaults, absent head fields mean plain
/// GPT-2 (n = r = 1). A field of the wrong type, and any setting that would make transformers
/// compute something other than this model, is refused.
pub fn parse_hf_config(path: &Path, text: &str) -> Result<ModelConfig> {
    let bad = |m: String| Error::bad_file(path, m);
    let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let Value::Object(fields) = value else {
        return Err(bad("must hold a JSON object (a GPT2Config), not a list, a number or null".into()));
    };
    // a present field: None when absent or null, an error when of another type
    let field = |key: &str, kind: &str, read: fn(&Value) -> Option<Value>| -> Result<Option<Value>> {
        match fields.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => read(v).map(Some).ok_or_else(|| bad(format!("'{key}' must be {kind}, not {v}"))),
        }
    };
    let size = |key: &str, default: usize| -> Result<usize> {
        let v = field(key, "a non-negative integer", |v| v.as_u64().map(Value::from))?;
        Ok(v.and_then(|v| v.as_u64()).map_or(default, |x| usize::try_from(x).unwrap_or(usize::MAX)))
    };
    let text = |key: &str| -> Result<Option<String>> {
        Ok(field(key, "a string", |v| v.as_str().map(Value::from))?.and_then(|v| v.as_str().map(String::from)))
    };
    let flag = |key: &str| -> Result<Option<bool>> {
        Ok(field(key, "true or false", |v| v.as_bool().map(Value::from))?.and_then(|v| v.as_bool()))
    };

    if let Some(t) = text("model_type")? {
        if t != "gpt2" {
            return Err(bad(format!("model_type is '{t}'; only GPT-2 checkpoints are supported")));
        }
    }
    let activation = text("activation_function")?.unwrap_or_else(|| "gelu_new".into());
    if !matches!(activation.as_str(), "gelu_new" | "gelu_pytorch_tanh") {
        return Err(bad(format!("activation_function '{activation}' is not supported (GPT-2 uses gelu_new)")));
    }
    let eps = field("layer_norm_epsilon", "a number", |v| v.as_f64().map(Value::from))?.and_then(|v| v.as_f64()).unwrap_or(1e-5);
    if (eps - 1e-5).abs() > 1e-12 {
        return Err(bad(format!("layer_norm_epsilon {eps} is not supported (GPT-2 uses 1e-5)")));
    }
    let refused_flags = [
        ("tie_word_embeddings", false, "untied word embeddings are not supported (GPT-2 ties lm_head to wte)"),
        ("scale_attn_weights", false, "scale_attn_weights false is not supported (GPT-2 divides attention scores by √hs)"),
        ("scale_attn_by_inverse_layer_idx", true, "scale_attn_by_inverse_layer_idx true is not supported (GPT-2 does not scale by layer)"),
        ("add_cross_attention", true, "add_cross_attention true is not supported (GPT-2 is a decoder only)"),
    ];
    for (key, refused, message) in refused_flags {
        if flag(key)? == Some(refused) {
            return Err(bad(message.into()));
        }
    }
    let n_embd = size("n_embd", 768)?;
    if let Some(inner) = field("n_inner", "a non-negative integer or null", |v| v.as_u64().map(Value::from))?.and_then(|v| v.as_u64()) {
        if Some(inner) != (n_embd as u64).checked_mul(4) {
            return Err(bad(format!("n_inner {inner} is not supported (GPT-2 uses 4·n_embd)")));
        }
    }
    let config = ModelConfig {
        vocab_size: size("vocab_size", 50257)?,
        n_positions: size("n_positions", 1024)?,
        n_embd,
        n_layer: size("n_layer", 12)?,
        n_head: size("n_head", 12)?,
        horizon: size("mtp_horizon", 1)?,
        rank: size("mtp_rank", 1)?,
    };
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok(config)
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn safetensors_bytes(tensors: &[(String, &Tensor<f32>)], path: &Path) -> Result<Vec<u8>> {
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.shape().to_vec(), f32_bytes(t.data()))).collect();
    let views: Vec<(String, TensorView)> = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(|e| Error::bad_file(path, e.to_string()))?))
        })
        .collect::<Result<_>>()?;
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize(views, metadata).map_err(|e| Error::bad_file(path, e.to_string()))
}

/// Whether `name` is one of the constant masks old GPT-2 files store per block
/// (`h.{i}.attn.bias`, `h.{i}.attn.masked_bias`, with or without `transformer.`), for a block
/// the config has. They are recomputed, never read.
fn is_mask_buffer(name: &str, config: &ModelConfig) -> bool {
    let name = name.strip_prefix("transformer.").unwrap_or(name);
    let Some(rest) = name.strip_prefix("h.") else { return false };
    let Some((layer, buffer)) = rest.split_once('.') else { return false };
    let is_block = layer.parse::<usize>().is_ok_and(|i| i < config.n_layer && i.to_string() == layer);
    matches!(buffer, "attn.bias" | "attn.masked_bias") && is_block
}

/// Reads every tensor of a safetensors file as f32 (from f32, f64, f16 or bf16), except those
/// `skip` names, which are only listed. The safetensors crate has checked that each tensor's
/// bytes lie in the file and match its shape.
fn read_safetensors(path: &Path, skip: impl Fn(&str) -> bool) -> Result<HashMap<String, Tensor<f32>>> {
    let bytes = crate::data::read_file(path)?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::bad_file(path, format!("not a valid safetensors file ({e}); the file is damaged: restore it or train again"))
    })?;
    let mut out = HashMap::new();
    for (name, view) in file.tensors() {
        if skip(&name) {
            continue;
        }
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::F64 => raw.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            Dtype::F16 => raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => return Err(Error::bad_file(path, format!("tensor {name} has dtype {other:?}; expected a float type"))),
        };
        out.insert(name, Tensor::from_vec(view.shape(), data));
    }
    Ok(out)
}

/// Takes each parameter of `config`'s layout out of `tensors`, checking shapes and that every
/// value is finite. Names may lack the `transformer.` prefix (as in some Hugging Face GPT-2
/// files).
fn params_from_tensors(
    config: &ModelConfig,
    tensors: &mut HashMap<String, Tensor<f32>>,
    path: &Path,
    prefix: &str,
) -> Result<ModelParams<Tensor<f32>>> {
    ModelParams::build(config, |spec| {
        let key = format!("{prefix}{}", spec.name);
        let tensor = tensors
            .remove(&key)
            .or_else(|| spec.name.strip_prefix("transformer.").and_then(|short| tensors.remove(&format!("{prefix}{short}"))))
            .ok_or_else(|| Error::bad_file(path, format!("tensor '{key}' is missing (does config.json match this file?)")))?;
        if tensor.shape() != spec.shape {
            return Err(Error::bad_file(
                path,
                format!("tensor '{key}' has shape {:?}, but config.json implies {:?}", tensor.shape(), spec.shape),
            ));
        }
        if let Some(bad) = tensor.data().iter().find(|x| !x.is_finite()) {
            return Err(Error::bad_file(
                path,
                format!("tensor '{key}' holds {bad}: these values are unusable (from a run that diverged?); use an earlier checkpoint"),
            ));
        }
        Ok(tensor)
    })
}

/// Refuses a file with tensors that the config does not account for: a layer past `n_layer`,
/// a head that config.json does not declare, anything unknown.
fn refuse_leftovers(config: &ModelConfig, leftovers: HashMap<String, Tensor<f32>>, path: &Path) -> Result<()> {
    let Some(name) = leftovers.keys().min() else { return Ok(()) };
    let message = if name.starts_with("mtp.") && !config.has_head() {
        format!("holds the multi-token head's tensors ('{name}') but config.json describes no head (mtp_horizon and mtp_rank absent or 1); give the head's n and r")
    } else {
        format!(
            "holds tensor '{name}', which config.json does not describe (does its n_layer, n = {} and r = {} match?)",
            config.horizon, config.rank
        )
    };
    Err(Error::bad_file(path, message))
}

/// Puts back a checkpoint that a crash left under its hidden backup name (see the module doc).
fn recover_interrupted_save(dir: &Path) {
    if dir.exists() {
        return;
    }
    if let Some(backup) = backup_path(dir).filter(|b| b.exists()) {
        let _ = std::fs::rename(backup, dir);
    }
}

fn sibling(dir: &Path, tag: &str) -> Option<PathBuf> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    Some(dir.with_file_name(format!(".{name}.{tag}")))
}

fn backup_path(dir: &Path) -> Option<PathBuf> {
    sibling(dir, "previous")
}

/// Where `train` keeps the weights with the lowest validation loss: `NAME-best` beside `dir`.
pub fn best_path(dir: &Path) -> Option<PathBuf> {
    let name = dir.file_name()?.to_string_lossy().into_owned();
    Some(dir.with_file_name(format!("{name}-best")))
}

/// Checks, reading only, that `dir` can serve as a run's output directory and its `-best`
/// sibling as the best weights' (each is replaced whole on every save): a directory of its own
/// (not the current one or one holding it, not a link), holding nothing but a checkpoint's files.
pub fn check_output(dir: &Path) -> Result<()> {
    let not_its_own = "--out must name a directory of its own, such as ./ckpt (every save replaces it)";
    if dir.file_name().is_none() {
        return Err(Error::bad_file(dir, not_its_own));
    }
    if let (Ok(out), Ok(cwd)) = (dir.canonicalize(), std::env::current_dir()) {
        if cwd.starts_with(&out) {
            return Err(Error::bad_file(dir, format!("is the current directory or holds it; {not_its_own}")));
        }
    }
    check_not_in_use(dir)?;
    let best = best_path(dir).expect("dir has a file name");
    for (path, what) in [(dir, "--out"), (best.as_path(), "the best weights' directory")] {
        let Ok(meta) = std::fs::symlink_metadata(path) else { continue };
        let problem = if meta.file_type().is_symlink() {
            "is a symbolic link; a save would replace the link, not what it points to: pass the directory itself"
        } else if !meta.is_dir() {
            "is a file, not a directory"
        } else if !holds_only_checkpoint_files(path) {
            "holds files other than a checkpoint's, which a save would delete; move them out"
        } else {
            continue;
        };
        return Err(Error::bad_file(path, format!("{problem} ({what}; or choose another --out)")));
    }
    Ok(())
}

const IN_USE: &str = "another run is writing to it; wait for that run to end, or choose another --out";

/// Refuses `dir` while another run holds its lock, creating nothing: that run's files would
/// otherwise make the directory look merely "not empty", which hides what is going on.
fn check_not_in_use(dir: &Path) -> Result<()> {
    let Some(lock_path) = sibling(dir, "lock") else { return Ok(()) };
    let Ok(file) = std::fs::File::open(&lock_path) else { return Ok(()) };
    match file.try_lock_shared() {
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::bad_file(dir, IN_USE)),
        _ => Ok(()),
    }
}

/// One run's exclusive hold on its output directory: a lock on the hidden file `.NAME.lock`
/// beside it, released when this is dropped or the process ends, however it ends.
pub struct OutputLock {
    _file: std::fs::File,
}

/// Takes `dir` for one run before anything else is written: refuses a directory that is the
/// current one or holds it (a save replaces the directory), refuses a second run on the same
/// directory, checks that a checkpoint can be written beside it, and removes the staging
/// folders that a run killed during a save left behind.
pub fn lock_output(dir: &Path) -> Result<OutputLock> {
    check_output(dir)?;
    let cannot_write = |e: std::io::Error| {
        Error::bad_file(dir, format!("a checkpoint cannot be written here ({e}); choose an --out in a directory you can write"))
    };
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(cannot_write)?;
    let lock_path = sibling(dir, "lock").expect("dir has a file name");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(cannot_write)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(Error::bad_file(dir, IN_USE));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(cannot_write(e)),
    }
    // staging folders of this directory and of its -best sibling
    let best = best_path(dir).expect("dir has a file name");
    let prefixes: Vec<String> = [dir, best.as_path()]
        .iter()
        .map(|d| sibling(d, "staging-").expect("a file name").file_name().expect("a file name").to_string_lossy().into_owned())
        .collect();
    for entry in std::fs::read_dir(parent).map_err(cannot_write)?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let probe = sibling(dir, &format!("staging-{}", std::process::id())).expect("dir has a file name");
    std::fs::create_dir_all(&probe).and_then(|()| std::fs::write(probe.join("probe"), b"")).map_err(cannot_write)?;
    std::fs::remove_dir_all(&probe).map_err(cannot_write)?;
    Ok(OutputLock { _file: file })
}

/// Whether `dir` holds a checkpoint (its config.json).
pub fn exists(dir: &Path) -> bool {
    recover_interrupted_save(dir);
    dir.join(CONFIG_FILE).is_file()
}

/// Reads a checkpoint's model: config.json, model.safetensors and tokenizer.json where present
/// (after restoring one whose save was interrupted). What only `--resume` needs is not read,
/// so a damaged optimizer file never stops inference.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    recover_interrupted_save(dir);
    if !dir.exists() {
        return Err(Error::bad_file(dir, "no such checkpoint directory (train one with `multitoken train`)"));
    }
    if !dir.is_dir() {
        return Err(Error::bad_file(dir, "is a file; a checkpoint is a directory (config.json, model.safetensors, tokenizer.json)"));
    }
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.exists() {
        return Err(Error::bad_file(dir, "has no config.json, so it is not a checkpoint directory (train one with `multitoken train`)"));
    }
    let config_bytes = crate::data::read_file(&config_path)?;
    let config_text = String::from_utf8(config_bytes).map_err(|_| Error::bad_file(&config_path, "not valid JSON (not UTF-8 text)"))?;
    let config = parse_hf_config(&config_path, &config_text)?;
    let model_path = dir.join(MODEL_FILE);
    let mut tensors = read_safetensors(&model_path, |name| is_mask_buffer(name, &config))?;
    let params = params_from_tensors(&config, &mut tensors, &model_path, "")?;
    // transformers may store the tied unembedding as well; it must be wte itself
    if let Some(lm_head) = tensors.remove("lm_head.weight") {
        if lm_head.shape() != params.wte.shape() || lm_head.data() != params.wte.data() {
            return Err(Error::bad_file(&model_path, "lm_head.weight differs from wte: untied embeddings are not supported"));
        }
    }
    refuse_leftovers(&config, tensors, &model_path)?;
    // tokenizer.json, or a published GPT-2 directory's vocab.json and merges.txt
    let has_bpe_files = dir.join(tokenizer::VOCAB_FILE).exists() && dir.join(tokenizer::MERGES_FILE).exists();
    let tokenizer_json = if dir.join(TOKENIZER_FILE).exists() || has_bpe_files { Some(tokenizer::load_with_json(dir)?.1) } else { None };
    Ok(Checkpoint { config, params, tokenizer_json, resume: None })
}

/// Reads a checkpoint with what `--resume` needs: the model as [`load`] does, AdamW's moments
/// and train_state.json, every field checked.
pub fn load_for_resume(dir: &Path) -> Result<Checkpoint> {
    let mut checkpoint = load(dir)?;
    let (optimizer_path, state_path) = (dir.join(OPTIMIZER_FILE), dir.join(TRAIN_STATE_FILE));
    let missing = |name: &str| {
        Error::bad_file(
            dir,
            format!("has no {name}, so it cannot be resumed (a checkpoint from another program has no optimizer state; start from it with --init-from)"),
        )
    };
    if !state_path.exists() {
        return Err(missing(TRAIN_STATE_FILE));
    }
    if !optimizer_path.exists() {
        return Err(missing(OPTIMIZER_FILE));
    }
    let state_bytes = crate::data::read_file(&state_path)?;
    let bad_state = |e: String| Error::bad_file(&state_path, format!("not a valid train state ({e})"));
    let raw: Value = serde_json::from_slice(&state_bytes).map_err(|e| bad_state(e.to_string()))?;
    // runs saved before the warm-up was stored resolved (and before grad_accum existed) hold 0
    // for "the default rule"
    let warmup_is_a_rule = raw.pointer("/settings/grad_accum").is_none();
    let mut state: TrainStateFile = serde_json::from_value(raw).map_err(|e| bad_state(e.to_string()))?;
    if warmup_is_a_rule && state.settings.warmup_steps == Some(0) {
        state.settings.warmup_steps = Some(super::default_warmup(state.settings.steps));
    }
    state.adamw.validate().map_err(|e| Error::bad_file(&state_path, e.to_string()))?;
    if (state.settings.beta2, state.settings.weight_decay) != (state.adamw.beta2, state.adamw.weight_decay) {
        return Err(Error::bad_file(
            &state_path,
            "inconsistent: the settings' beta2 and weight_decay differ from adamw's; the file was changed by hand",
        ));
    }
    if state.optimizer_steps > state.step || state.step > state.settings.steps {
        return Err(Error::bad_file(
            &state_path,
            format!(
                "inconsistent: step {} of {} with {} optimizer steps; the file was changed by hand",
                state.step, state.settings.steps, state.optimizer_steps
            ),
        ));
    }
    let config = &checkpoint.config;
    let mut moments = read_safetensors(&optimizer_path, |_| false)?;
    let m = params_from_tensors(config, &mut moments, &optimizer_path, "exp_avg.")?;
    let v = params_from_tensors(config, &mut moments, &optimizer_path, "exp_avg_sq.")?;
    refuse_leftovers(config, moments, &optimizer_path)?;
    if let Some((name, _)) = v.named().into_iter().find(|(_, t)| t.data().iter().any(|&x| x < 0.0)) {
        return Err(Error::bad_file(&optimizer_path, format!("exp_avg_sq.{name} holds a negative value; a second moment cannot")));
    }
    let collect = |p: &ModelParams<Tensor<f32>>| p.named().into_iter().map(|(_, t)| t.clone()).collect();
    checkpoint.resume = Some(ResumeState {
        optimizer: AdamW { config: state.adamw, m: collect(&m), v: collect(&v), t: state.optimizer_steps },
        step: state.step,
        settings: state.settings,
        best_val_joint_loss: state.best_val_joint_loss,
    });
    Ok(checkpoint)
}

/// Files a checkpoint directory may hold; `save` replaces only directories made of these.
pub const CHECKPOINT_FILES: [&str; 7] =
    [CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, OPTIMIZER_FILE, TRAIN_STATE_FILE, "metrics.jsonl", "loss.svg"];

fn holds_only_checkpoint_files(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.flatten().all(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            CHECKPOINT_FILES.contains(&name.as_str()) || name.starts_with('.')
        }),
        Err(_) => false,
    }
}

/// Writes a checkpoint directory atomically (see the module doc).
pub fn save(dir: &Path, checkpoint: &Checkpoint, extra_files: &ExtraFiles) -> Result<()> {
    let staging = sibling(dir, &format!("staging-{}", std::process::id())).ok_or_else(|| Error::bad_file(dir, "not a directory path"))?;
    let backup = backup_path(dir).expect("sibling exists when staging does");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    write_staging(dir, &staging, checkpoint, extra_files).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staging);
        Error::bad_file(
            dir,
            format!("writing the checkpoint failed ({e}); the one before it is kept (free some space, or choose another --out)"),
        )
    })?;
    let _ = std::fs::remove_dir_all(&backup);
    if dir.exists() && !holds_only_checkpoint_files(dir) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(Error::bad_file(dir, "exists and holds other files; refusing to replace it with a checkpoint (choose another --out)"));
    }
    if dir.exists() {
        std::fs::rename(dir, &backup).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&staging, dir).map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_dir_all(&backup);
    Ok(())
}

/// Writes every file of a checkpoint into the staging directory.
fn write_staging(dir: &Path, staging: &Path, checkpoint: &Checkpoint, extra_files: &ExtraFiles) -> Result<()> {
    let write = |name: &str, bytes: &[u8]| crate::data::write_atomically(&staging.join(name), bytes);

    let end_of_text = checkpoint
        .tokenizer_json
        .as_deref()
        .and_then(|j| crate::data::tokenizer::from_json(j, dir).ok())
        .and_then(|t| crate::data::tokenizer::end_of_text_id(&t));
    let config = serde_json::to_string_pretty(&hf_config_json(&checkpoint.config, end_of_text)).expect("json");
    write(CONFIG_FILE, config.as_bytes())?;
    write(MODEL_FILE, &safetensors_bytes(&checkpoint.params.named(), &dir.join(MODEL_FILE))?)?;
    if let Some(json) = &checkpoint.tokenizer_json {
        write(TOKENIZER_FILE, json.as_bytes())?;
    }
    if let Some(resume) = &checkpoint.resume {
        let names = checkpoint.params.named();
        let mut moments: Vec<(String, &Tensor<f32>)> = Vec::new();
        for ((name, _), m) in names.iter().zip(&resume.optimizer.m) {
            moments.push((format!("exp_avg.{name}"), m));
        }
        for ((name, _), v) in names.iter().zip(&resume.optimizer.v) {
            moments.push((format!("exp_avg_sq.{name}"), v));
        }
        write(OPTIMIZER_FILE, &safetensors_bytes(&moments, &dir.join(OPTIMIZER_FILE))?)?;
        let state = TrainStateFile {
            step: resume.step,
            settings: resume.settings.clone(),
            optimizer_steps: resume.optimizer.t,
            adamw: resume.optimizer.config,
            best_val_joint_loss: resume.best_val_joint_loss,
        };
        write(TRAIN_STATE_FILE, serde_json::to_string_pretty(&state).expect("json").as_bytes())?;
    }
    for (name, bytes) in extra_files {
        write(name, bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gpt2;
    use crate::tensor::Rng;

    fn tiny_checkpoint(seed: u64) -> Checkpoint {
        let config = ModelConfig { vocab_size: 16, n_positions: 8, n_embd: 8, n_layer: 1, n_head: 2, horizon: 2, rank: 2 };
        let params = gpt2::init_params::<f32>(&config, &mut Rng::new(seed));
        Checkpoint { config, params, tokenizer_json: None, resume: None }
    }

    #[test]
    fn a_crash_between_the_two_renames_is_recovered_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt");
        save(&path, &tiny_checkpoint(1), &vec![]).unwrap();
        let written = std::fs::read(path.join(MODEL_FILE)).unwrap();
        // the state a crash after the first rename leaves: only the hidden backup exists,
        // next to an abandoned staging directory
        std::fs::rename(&path, backup_path(&path).unwrap()).unwrap();
        std::fs::create_dir_all(sibling(&path, "staging-999").unwrap()).unwrap();
        assert!(exists(&path), "the backup is put back");
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.config.horizon, 2);
        assert_eq!(std::fs::read(path.join(MODEL_FILE)).unwrap(), written);
    }

    #[test]
    fn saving_again_replaces_the_whole_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt");
        save(&path, &tiny_checkpoint(1), &vec![("metrics.jsonl".into(), b"{}".to_vec())]).unwrap();
        save(&path, &tiny_checkpoint(2), &vec![]).unwrap();
        let loaded = load(&path).unwrap();
        let expected = tiny_checkpoint(2);
        assert_eq!(loaded.params.wte.data(), expected.params.wte.data());
        assert!(!path.join("metrics.jsonl").exists(), "no file of the old checkpoint survives");
        assert!(!backup_path(&path).unwrap().exists());
    }
}
