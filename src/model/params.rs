//! The model's parameters, by Hugging Face GPT-2 name, generic over what is stored per
//! parameter: `Tensor<T>` for weights, `Var` for their handles on a tape, optimizer state...
//!
//! [`ModelParams::build`] is the one place that lists every parameter with its name and shape,
//! in a fixed order; everything else (init, loading, mapping to vars) goes through it.

use super::config::ModelConfig;

/// One transformer block's parameters (`transformer.h.{i}.*`), in GPT-2's Conv1D layout
/// (in, out).
#[derive(Clone, Debug)]
pub struct BlockParams<P> {
    /// (C), the scale of the LayerNorm before attention
    pub ln_1_weight: P,
    /// (C), its shift
    pub ln_1_bias: P,
    /// (C, 3C)
    pub attn_c_attn_weight: P,
    /// (3C), the biases of q, k and v
    pub attn_c_attn_bias: P,
    /// (C, C)
    pub attn_c_proj_weight: P,
    /// (C)
    pub attn_c_proj_bias: P,
    /// (C), the scale of the LayerNorm before the MLP
    pub ln_2_weight: P,
    /// (C), its shift
    pub ln_2_bias: P,
    /// (C, 4C)
    pub mlp_c_fc_weight: P,
    /// (4C)
    pub mlp_c_fc_bias: P,
    /// (4C, C)
    pub mlp_c_proj_weight: P,
    /// (C)
    pub mlp_c_proj_bias: P,
}

/// The multi-token head's own parameters (docs/math.md, "The CP head").
#[derive(Clone, Debug)]
pub struct HeadParams<P> {
    /// W (r, n, C, C): `z[α,s] = W[α,s] h`
    pub expand_weight: P,
    /// G (r, C)
    pub gate_weight: P,
    /// g (r)
    pub gate_bias: P,
}

/// Every parameter of the model, one `P` each (a tensor, a var on a tape, an optimizer moment):
/// the GPT-2 backbone and, unless n = r = 1, the head.
#[derive(Clone, Debug)]
pub struct ModelParams<P> {
    /// (V, C), also the unembedding
    pub wte: P,
    /// (P, C)
    pub wpe: P,
    /// the L transformer blocks, in order
    pub blocks: Vec<BlockParams<P>>,
    /// (C), the scale of the final LayerNorm
    pub ln_f_weight: P,
    /// (C), its shift
    pub ln_f_bias: P,
    /// present unless n = r = 1
    pub head: Option<HeadParams<P>>,
}

/// How a parameter is initialised (docs/math.md, "The model").
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// N(0, std²) with the given std
    Normal(f64),
    /// all zeros (biases, LayerNorm shifts)
    Zeros,
    /// all ones (LayerNorm scales)
    Ones,
    /// identity matrices for every (α, s), plus N(0, std²) noise when std > 0
    IdentityPlusNoise(f64),
}

/// What `build` tells the constructor about each parameter.
pub struct ParamSpec<'a> {
    /// the Hugging Face name, e.g. `transformer.h.0.attn.c_attn.weight`
    pub name: &'a str,
    /// the tensor's shape
    pub shape: &'a [usize],
    /// how to initialise it
    pub init: Init,
}

impl<P> ModelParams<P> {
    /// Builds a parameter set by calling `make` once per parameter, in canonical order.
    pub fn build<E>(config: &ModelConfig, mut make: impl FnMut(&ParamSpec) -> Result<P, E>) -> Result<Self, E> {
        let (v, p, c, l) = (config.vocab_size, config.n_positions, config.n_embd, config.n_layer);
        let (r, n) = (config.rank, config.horizon);
        let std = 0.02;
        let residual_std = 0.02 / ((2 * l) as f64).sqrt();
        let mut param = |name: &str, shape: &[usize], init: Init| make(&ParamSpec { name, shape, init });
        let wte = param("transformer.wte.weight", &[v, c], Init::Normal(std))?;
        let wpe = param("transformer.wpe.weight", &[p, c], Init::Normal(std))?;
        let mut blocks = Vec::with_capacity(l);
        for i in 0..l {
            let prefix = format!("transformer.h.{i}");
            let mut block_param = |suffix: &str, shape: &[usize], init: Init| param(&format!("{prefix}.{suffix}"), shape, init);
            blocks.push(BlockParams {
                ln_1_weight: block_param("ln_1.weight", &[c], Init::Ones)?,
                ln_1_bias: block_param("ln_1.bias", &[c], Init::Zeros)?,
                attn_c_attn_weight: block_param("attn.c_attn.weight", &[c, 3 * c], Init::Normal(std))?,
                attn_c_attn_bias: block_param("attn.c_attn.bias", &[3 * c], Init::Zeros)?,
                attn_c_proj_weight: block_param("attn.c_proj.weight", &[c, c], Init::Normal(residual_std))?,
                attn_c_proj_bias: block_param("attn.c_proj.bias", &[c], Init::Zeros)?,
                ln_2_weight: block_param("ln_2.weight", &[c], Init::Ones)?,
                ln_2_bias: block_param("ln_2.bias", &[c], Init::Zeros)?,
                mlp_c_fc_weight: block_param("mlp.c_fc.weight", &[c, 4 * c], Init::Normal(std))?,
                mlp_c_fc_bias: block_param("mlp.c_fc.bias", &[4 * c], Init::Zeros)?,
                mlp_c_proj_weight: block_param("mlp.c_proj.weight", &[4 * c, c], Init::Normal(residual_std))?,
                mlp_c_proj_bias: block_param("mlp.c_proj.bias", &[c], Init::Zeros)?,
            });
        }
        let ln_f_weight = param("transformer.ln_f.weight", &[c], Init::Ones)?;
        let ln_f_bias = param("transformer.ln_f.bias", &[c], Init::Zeros)?;
        let head = if config.has_head() {
            let noise = if r == 1 { 0.0 } else { 0.02 / (c as f64).sqrt() };
            Some(HeadParams {
                expand_weight: param("mtp.expand.weight", &[r, n, c, c], Init::IdentityPlusNoise(noise))?,
                gate_weight: param("mtp.gate.weight", &[r, c], Init::Normal(std))?,
                gate_bias: param("mtp.gate.bias", &[r], Init::Zeros)?,
            })
        } else {
            None
        };
        Ok(ModelParams { wte, wpe, blocks, ln_f_weight, ln_f_bias, head })
    }

    /// Every parameter with its name, in the order of `build`.
    pub fn named(&self) -> Vec<(String, &P)> {
        let mut out = vec![("transformer.wte.weight".to_string(), &self.wte), ("transformer.wpe.weight".to_string(), &self.wpe)];
        for (i, b) in self.blocks.iter().enumerate() {
            let fields = [
                ("ln_1.weight", &b.ln_1_weight),
                ("ln_1.bias", &b.ln_1_bias),
                ("attn.c_attn.weight", &b.attn_c_attn_weight),
                ("attn.c_attn.bias", &b.attn_c_attn_bias),
                ("attn.c_proj.weight", &b.attn_c_proj_weight),
                ("attn.c_proj.bias", &b.attn_c_proj_bias),
                ("ln_2.weight", &b.ln_2_weight),
                ("ln_2.bias", &b.ln_2_bias),
                ("mlp.c_fc.weight", &b.mlp_c_fc_weight),
                ("mlp.c_fc.bias", &b.mlp_c_fc_bias),
                ("mlp.c_proj.weight", &b.mlp_c_proj_weight),
                ("mlp.c_proj.bias", &b.mlp_c_proj_bias),
            ];
            out.extend(fields.into_iter().map(|(suffix, p)| (format!("transformer.h.{i}.{suffix}"), p)));
        }
        out.push(("transformer.ln_f.weight".to_string(), &self.ln_f_weight));
        out.push(("transformer.ln_f.bias".to_string(), &self.ln_f_bias));
        if let Some(h) = &self.head {
            out.push(("mtp.expand.weight".to_string(), &h.expand_weight));
            out.push(("mtp.gate.weight".to_string(), &h.gate_weight));
            out.push(("mtp.gate.bias".to_string(), &h.gate_bias));
        }
        out
    }

    /// Mutable references to every parameter, in the order of `build` and `named`.
    pub fn values_mut(&mut self) -> Vec<&mut P> {
        let mut out = vec![&mut self.wte, &mut self.wpe];
        for b in &mut self.blocks {
            out.extend([
                &mut b.ln_1_weight,
                &mut b.ln_1_bias,
                &mut b.attn_c_attn_weight,
                &mut b.attn_c_attn_bias,
                &mut b.attn_c_proj_weight,
                &mut b.attn_c_proj_bias,
                &mut b.ln_2_weight,
                &mut b.ln_2_bias,
                &mut b.mlp_c_fc_weight,
                &mut b.mlp_c_fc_bias,
                &mut b.mlp_c_proj_weight,
                &mut b.mlp_c_proj_bias,
            ]);
        }
        out.extend([&mut self.ln_f_weight, &mut self.ln_f_bias]);
        if let Some(h) = &mut self.head {
            out.extend([&mut h.expand_weight, &mut h.gate_weight, &mut h.gate_bias]);
        }
        out
    }

    /// A parameter set of the same layout with `f` applied to each parameter.
    pub fn map<Q>(&self, config: &ModelConfig, mut f: impl FnMut(&str, &P) -> Q) -> ModelParams<Q> {
        let mut values = self.named().into_iter();
        let result: Result<_, std::convert::Infallible> = ModelParams::build(config, |spec| {
            let (name, value) = values.next().expect("same layout");
            debug_assert_eq!(name, spec.name);
            Ok(f(&name, value))
        });
        match result {
            Ok(params) => params,
            Err(never) => match never {},
        }
    }
}
