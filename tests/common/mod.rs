//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use multitoken::model::{params::ModelParams, ModelConfig};
use multitoken::tensor::Tensor;
use safetensors::{Dtype, SafeTensors};

pub mod cli;
pub mod exactness;

/// A fixture written by reference/make_fixtures.py: f64 tensors, i64 token ids, metadata.
pub struct Fixture {
    pub tensors: HashMap<String, Tensor<f64>>,
    pub ids: HashMap<String, (Vec<usize>, Vec<u32>)>,
    pub meta: HashMap<String, String>,
}

pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(format!("{name}.safetensors"))
}

pub fn load_fixture(name: &str) -> Fixture {
    let bytes = std::fs::read(fixture_path(name)).expect("fixture file (regenerate with reference/make_fixtures.py)");
    let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = metadata.metadata().clone().unwrap_or_default();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (mut tensors, mut ids) = (HashMap::new(), HashMap::new());
    for (name, view) in file.tensors() {
        let raw = view.data();
        match view.dtype() {
            Dtype::F64 => {
                let data = raw.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect();
                tensors.insert(name, Tensor::from_vec(view.shape(), data));
            }
            Dtype::I64 => {
                let data = raw.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
                ids.insert(name, (view.shape().to_vec(), data));
            }
            other => panic!("unexpected dtype {other:?} for {name}"),
        }
    }
    Fixture { tensors, ids, meta }
}

impl Fixture {
    pub fn config(&self) -> ModelConfig {
        let get = |k: &str| self.meta[k].parse::<usize>().unwrap();
        ModelConfig {
            vocab_size: get("vocab_size"),
            n_positions: get("n_positions"),
            n_embd: get("n_embd"),
            n_layer: get("n_layer"),
            n_head: get("n_head"),
            horizon: get("horizon"),
            rank: get("rank"),
        }
    }

    /// The parameters stored under `prefix` + name.
    pub fn params(&self, prefix: &str) -> ModelParams<Tensor<f64>> {
        let result: Result<_, String> = ModelParams::build(&self.config(), |spec| {
            self.tensors.get(&format!("{prefix}{}", spec.name)).cloned().ok_or(format!("missing {prefix}{}", spec.name))
        });
        result.unwrap()
    }

    pub fn meta_f64(&self, key: &str) -> f64 {
        self.meta[key].parse().unwrap()
    }
}

/// An llm.c-style line: name, first values of both, max abs difference.
pub fn report(name: &str, ours: &Tensor<f64>, theirs: &Tensor<f64>) -> f64 {
    assert_eq!(ours.shape(), theirs.shape(), "{name}: shapes differ");
    let diff = ours.max_abs_diff(theirs);
    let first = |t: &Tensor<f64>| t.data().iter().take(3).map(|x| format!("{x:+.6e}")).collect::<Vec<_>>().join(" ");
    println!("{name:<40} ours [{}] torch [{}] max diff {diff:.2e}", first(ours), first(theirs));
    diff
}

/// A fresh temporary directory under the target dir.
pub fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("multitoken-{tag}-")).tempdir().unwrap()
}
