//! The crate's own GPT-2 with the rank-r CP multi-token head: a byte-level BPE tokenizer, a
//! `tiny` model with n = 4, r = 4 trained for a few hundred steps, then decoded greedily twice,
//! autoregressively and self-speculatively (the same tokens, fewer forward passes).
//!
//! `cargo run --release --example gpt2_cp_head [-- --quick] [--device cuda]`: trains on
//! Moby-Dick when `scripts/fetch-data.sh` has fetched it, else on a paragraph of it built in.
//!
//! Read it beside docs/tour.md, stops 5 to 8: the model is `model::gpt2` and `ops::cp_head` on
//! the tape, a training step is `train::train_step`, decoding is `decode::decode`. The command
//! line's `train` and `sample` do the same with checkpoints, progress bars and metrics.

use multitoken::data::{batches, tokenizer};
use multitoken::decode::{self, DecodeRequest, SamplingConfig};
use multitoken::device::{DeviceKind, Precision};
use multitoken::error::Result;
use multitoken::model::{gpt2, ModelConfig};
use multitoken::tensor::{Device, Rng, Tensor};
use multitoken::train::adamw::{AdamW, AdamWConfig};
use multitoken::train::{params_to_device, train_step, StepConfig};

const BUILT_IN: &str = "Call me Ishmael. Some years ago--never mind how long precisely--having little or no money in my purse, \
and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world. \
It is a way I have of driving off the spleen and regulating the circulation. Whenever I find myself growing grim about the \
mouth; whenever it is a damp, drizzly November in my soul; then, I account it high time to get to sea as soon as I can.\n";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let device = match args.iter().position(|a| a == "--device").map(|i| args.get(i + 1).map(String::as_str)) {
        None | Some(Some("cpu")) => DeviceKind::Cpu,
        Some(Some("cuda")) => DeviceKind::Cuda,
        _ => {
            eprintln!("error: --device takes cpu or cuda");
            std::process::exit(2);
        }
    };
    let device = device.open(Precision::F32)?;

    // a tokenizer of 1024 tokens trained on the corpus
    let work = std::env::temp_dir().join(format!("multitoken-example-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| multitoken::error::Error::io(&work, e))?;
    let fetched = std::path::PathBuf::from("data/corpora/moby-dick.txt");
    let corpus = if fetched.exists() {
        fetched
    } else {
        let path = work.join("corpus.txt");
        std::fs::write(&path, BUILT_IN.repeat(40)).map_err(|e| multitoken::error::Error::io(&path, e))?;
        path
    };
    let tokenizer_path = work.join("tokenizer.json");
    tokenizer::train(std::slice::from_ref(&corpus), 1024, &tokenizer_path, false)?;
    let tokenizer = tokenizer::load(&tokenizer_path)?;
    let ids = tokenizer::encode(&tokenizer, &tokenizer::read_text(&corpus)?)?;
    let _ = std::fs::remove_dir_all(&work);
    println!("{} tokens of {}", ids.len(), corpus.display());

    // the model: GPT-2 `tiny` (C 64, L 2, H 4), and the head with n = 4 tokens per position from
    // r = 4 mixture components
    let config = ModelConfig::preset("tiny", 1024, 4, 4)?;
    let params = gpt2::init_params::<f32>(&config, &mut Rng::new(1));
    let refs: Vec<&Tensor<f32>> = params.named().into_iter().map(|(_, t)| t).collect();
    let mut optimizer = AdamW::new(AdamWConfig::default(), &refs).to_device(&device)?;
    let mut params = params_to_device(&config, &params, &device)?;
    let steps = if quick { 10 } else { 400 };
    for step in 0..steps {
        // rows of T + n = 68 tokens: 64 inputs, each with its next 4 tokens as targets
        let batch = batches::training_batch(ids.as_slice(), 8, 64, config.horizon, 1, step as u64)?;
        let lr = 1e-2 * (1.0 - step as f64 / steps as f64).max(0.1);
        let (loss, _) =
            train_step(&config, &mut params, &mut optimizer, &batch, StepConfig { lr, grad_clip: 1.0, aux_coef: 0.01 }, &|_| true)?;
        if step % (steps / 8).max(1) == 0 || step + 1 == steps {
            println!("step {:>4}: joint loss of the 4 next tokens {loss:.3} nats", step + 1);
        }
    }

    // decoding on the CPU. Greedy first: speculative decoding must give exactly the
    // autoregressive tokens, in fewer forward passes.
    let params = params_to_device(&config, &params, &Device::Cpu)?;
    let prompt = tokenizer::encode(&tokenizer, "Call me Ishmael. Some years ago")?;
    let mut greedy_tokens = Vec::new();
    for speculative in [false, true] {
        let request = DecodeRequest {
            prompt: &prompt,
            max_new_tokens: 200,
            sampling: &SamplingConfig::greedy(),
            seed: 0,
            progress: &mut |_| {},
            stop_at: None,
            draft: Default::default(),
        };
        let generation = decode::decode(&config, &params, request, speculative)?;
        println!(
            "greedy, {}: {:.2} tokens per forward pass, {:.0} tokens/s",
            if speculative { "self-speculative" } else { "autoregressive  " },
            generation.mean_accepted(),
            generation.tokens_per_s()
        );
        greedy_tokens.push(generation.tokens);
    }
    assert_eq!(greedy_tokens[0], greedy_tokens[1], "greedy speculative decoding must give the autoregressive tokens");
    // Then sampled (temperature 0.8, top-k 50), where speculative decoding keeps the model's
    // distribution rather than its exact tokens; a model this small repeats itself when greedy.
    let sampling = SamplingConfig { greedy: false, temperature: 0.8, top_k: 50, top_p: 1.0 };
    let request = DecodeRequest {
        prompt: &prompt,
        max_new_tokens: 60,
        sampling: &sampling,
        seed: 1,
        progress: &mut |_| {},
        stop_at: None,
        draft: Default::default(),
    };
    let generation = decode::decode(&config, &params, request, true)?;
    println!("sampled, self-speculative ({:.2} tokens per pass):", generation.mean_accepted());
    println!("{}{}", tokenizer::decode(&tokenizer, &prompt)?, tokenizer::decode(&tokenizer, &generation.tokens)?);
    println!("(wall-clock speeds of a model this small are noise; `multitoken bench decode` measures them)");
    Ok(())
}
