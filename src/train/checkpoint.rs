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

use super::adamw::AdamW;
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
    /// Present in checkpoints written by `train`: what `--resume` needs.
    pub resume: Option<ResumeState>,
}

/// What a checkpoint written by `train` adds for `--resume`.
pub struct ResumeState {
    /// the optimizer's moments and step count, on the CPU
    pub optimizer: AdamW<f32>,
    /// train_state.json as written by the trainer
    pub train_state: Value,
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

/// Reads a GPT2Config leniently: absent fields take GPT2Config's defaults, absent head fields
/// mean plain GPT-2 (n = r = 1). Refuses what this model does not compute.
pub fn parse_hf_config(path: &Path, text: &str) -> Result<ModelConfig> {
    let bad = |m: String| Error::bad_file(path, m);
    let value: Value = serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let get = |key: &str, default: usize| -> Result<usize> {
        match value.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| bad(format!("'{key}' must be a non-negative integer"))),
        }
    };
    if let Some(t) = value.get("model_type").and_then(Value::as_str) {
        if t != "gpt2" {
            return Err(bad(format!("model_type is '{t}'; only GPT-2 checkpoints are supported")));
        }
    }
    let activation = value.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new");
    if !matches!(activation, "gelu_new" | "gelu_pytorch_tanh") {
        return Err(bad(format!("activation_function '{activation}' is not supported (GPT-2 uses gelu_new)")));
    }
    let eps = value.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-5);
    if (eps - 1e-5).abs() > 1e-12 {
        return Err(bad(format!("layer_norm_epsilon {eps} is not supported (GPT-2 uses 1e-5)")));
    }
    if value.get("tie_word_embeddings").and_then(Value::as_bool) == Some(false) {
        return Err(bad("untied word embeddings are not supported (GPT-2 ties lm_head to wte)".into()));
    }
    let n_embd = get("n_embd", 768)?;
    if let Some(inner) = value.get("n_inner").and_then(Value::as_u64) {
        if inner as usize != 4 * n_embd {
            return Err(bad(format!("n_inner {inner} is not supported (GPT-2 uses 4·n_embd = {})", 4 * n_embd)));
        }
    }
    let config = ModelConfig {
        vocab_size: get("vocab_size", 50257)?,
        n_positions: get("n_positions", 1024)?,
        n_embd,
        n_layer: get("n_layer", 12)?,
        n_head: get("n_head", 12)?,
        horizon: get("mtp_horizon", 1)?,
        rank: get("mtp_rank", 1)?,
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

/// Reads every tensor of a safetensors file as f32 (from f32, f64, f16 or bf16).
fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor<f32>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| Error::bad_file(path, format!("not a valid safetensors file ({e})")))?;
    let mut out = HashMap::new();
    for (name, view) in file.tensors() {
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

/// Takes each parameter of `config`'s layout out of `tensors`, checking shapes. Names may lack
/// the `transformer.` prefix (as in some Hugging Face GPT-2 files).
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
        Ok(tensor)
    })
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

/// Whether `dir` holds a checkpoint (its config.json).
pub fn exists(dir: &Path) -> bool {
    recover_interrupted_save(dir);
    dir.join(CONFIG_FILE).is_file()
}

/// Reads a checkpoint directory (after restoring one whose save was interrupted); the resume
/// state is read where optimizer.safetensors and train_state.json are both present.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    recover_interrupted_save(dir);
    if !dir.is_dir() {
        return Err(Error::bad_file(dir, "no such checkpoint directory (train one with `multitoken train`)"));
    }
    let config_path = dir.join(CONFIG_FILE);
    let config_text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config = parse_hf_config(&config_path, &config_text)?;
    let model_path = dir.join(MODEL_FILE);
    let mut tensors = read_safetensors(&model_path)?;
    let params = params_from_tensors(&config, &mut tensors, &model_path, "")?;
    let tokenizer_path = dir.join(TOKENIZER_FILE);
    let tokenizer_json = if tokenizer_path.is_file() {
        Some(std::fs::read_to_string(&tokenizer_path).map_err(|e| Error::io(&tokenizer_path, e))?)
    } else {
        None
    };
    let (optimizer_path, state_path) = (dir.join(OPTIMIZER_FILE), dir.join(TRAIN_STATE_FILE));
    let resume = if optimizer_path.is_file() && state_path.is_file() {
        let state_text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
        let train_state: Value =
            serde_json::from_str(&state_text).map_err(|e| Error::bad_file(&state_path, format!("not valid JSON ({e})")))?;
        let mut moments = read_safetensors(&optimizer_path)?;
        let m = params_from_tensors(&config, &mut moments, &optimizer_path, "exp_avg.")?;
        let v = params_from_tensors(&config, &mut moments, &optimizer_path, "exp_avg_sq.")?;
        let t = train_state
            .get("optimizer_steps")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::bad_file(&state_path, "missing 'optimizer_steps'"))?;
        let adam_config = serde_json::from_value(train_state.get("adamw").cloned().unwrap_or(Value::Null))
            .map_err(|e| Error::bad_file(&state_path, format!("bad 'adamw' settings ({e})")))?;
        let collect = |p: &ModelParams<Tensor<f32>>| p.named().into_iter().map(|(_, t)| t.clone()).collect();
        Some(ResumeState { optimizer: AdamW { config: adam_config, m: collect(&m), v: collect(&v), t }, train_state })
    } else {
        None
    };
    Ok(Checkpoint { config, params, tokenizer_json, resume })
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
        let mut state = resume.train_state.clone();
        state["optimizer_steps"] = json!(resume.optimizer.t);
        state["adamw"] = serde_json::to_value(resume.optimizer.config).expect("json");
        write(TRAIN_STATE_FILE, serde_json::to_string_pretty(&state).expect("json").as_bytes())?;
    }
    for (name, bytes) in extra_files {
        write(name, bytes)?;
    }

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
