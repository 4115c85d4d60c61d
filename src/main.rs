//! The `multitoken` command line: parses arguments, calls the library, prints the result
//! (one JSON object on stdout with `--json`; progress and logs on stderr).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use multitoken::data::{self, tokenizer};
use multitoken::decode::{self, DecodeRequest, SamplingConfig};
use multitoken::device::{DeviceKind, Precision};
use multitoken::distributed::{self, Replica, Topology};
use multitoken::error::Error;
use multitoken::model::config::ShapeOverrides;
use multitoken::model::ModelConfig;
use multitoken::train::{self, checkpoint, evaluate, TrainSettings};

/// Training allocates and frees the same large activation buffers every step; mimalloc hands
/// them back without the page faults that the system allocator's fresh mappings cost.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "multitoken", version, about = "GPT-2 with a rank-r CP multi-token head: train, evaluate, decode")]
struct Cli {
    /// Print exactly one JSON object on stdout
    #[arg(long, global = true)]
    json: bool,
    /// Worker threads (default: all cores)
    #[arg(long, allow_negative_numbers = true, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenizers
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Token files
    #[command(subcommand)]
    Data(DataCommand),
    /// Train a model (writes a checkpoint directory)
    Train(Box<TrainArgs>),
    /// Losses of a checkpoint on a text file
    Eval(EvalArgs),
    /// Generate text from a checkpoint
    Sample(SampleArgs),
    /// Benchmarks
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer
    Train {
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        #[arg(long, allow_negative_numbers = true)]
        vocab_size: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Tokenize a corpus into train.bin and val.bin
    Prepare {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, num_args = 1.., required = true)]
        input: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
        val_fraction: f64,
    },
}

#[derive(Args)]
struct TrainArgs {
    /// Directory written by `data prepare`
    #[arg(long)]
    data: PathBuf,
    /// Checkpoint directory to write
    #[arg(long)]
    out: PathBuf,
    /// Model preset: tiny, small, base, gpt2, gpt2-medium, gpt2-large or gpt2-xl [default: small]
    #[arg(long)]
    model: Option<String>,
    /// Width C, replacing the preset's
    #[arg(long, allow_negative_numbers = true)]
    n_embd: Option<usize>,
    /// Blocks L, replacing the preset's
    #[arg(long, allow_negative_numbers = true)]
    n_layer: Option<usize>,
    /// Attention heads H, replacing the preset's
    #[arg(long, allow_negative_numbers = true)]
    n_head: Option<usize>,
    /// Positions P, replacing the preset's
    #[arg(long, allow_negative_numbers = true)]
    n_positions: Option<usize>,
    /// Tokens predicted per position, n [default: 1]
    #[arg(long, allow_negative_numbers = true)]
    horizon: Option<usize>,
    /// Mixture components of the CP head, r [default: 1]
    #[arg(long, allow_negative_numbers = true)]
    rank: Option<usize>,
    /// Load-balancing coefficient λ [default: 0.01]
    #[arg(long, allow_negative_numbers = true)]
    aux_coef: Option<f64>,
    /// Training steps [default: 1000]
    #[arg(long, allow_negative_numbers = true)]
    steps: Option<u64>,
    /// Rows per batch, B [default: 8]
    #[arg(long, allow_negative_numbers = true)]
    batch: Option<usize>,
    /// Sequence length, T [default: the model's n_positions]
    #[arg(long, allow_negative_numbers = true, value_parser = at_least_one)]
    seq: Option<usize>,
    /// Peak learning rate [default: 1e-3]
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Warm-up steps [default: min(100, steps/10)]
    #[arg(long, allow_negative_numbers = true)]
    warmup: Option<u64>,
    /// Where the cosine decay ends [default: lr/10]
    #[arg(long, allow_negative_numbers = true)]
    min_lr: Option<f64>,
    /// AdamW's decoupled weight decay, on matrices [default: 0.1]
    #[arg(long, allow_negative_numbers = true)]
    weight_decay: Option<f64>,
    /// AdamW's β2 [default: 0.95]
    #[arg(long, allow_negative_numbers = true)]
    beta2: Option<f64>,
    /// Global gradient-norm limit [default: 1.0]
    #[arg(long, allow_negative_numbers = true)]
    grad_clip: Option<f64>,
    /// Micro-batches of --batch rows per step, their gradients summed [default: 1]
    #[arg(long, allow_negative_numbers = true)]
    grad_accum: Option<usize>,
    /// Validate every K steps [default: 100]
    #[arg(long, allow_negative_numbers = true)]
    eval_every: Option<u64>,
    /// Write the checkpoint every K steps (0: only at the end) [default: 250]
    #[arg(long, allow_negative_numbers = true)]
    save_every: Option<u64>,
    /// Start from this checkpoint's backbone
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Train only the head (W, G, g); needs --init-from
    #[arg(long)]
    freeze_backbone: bool,
    /// Continue the run whose checkpoint is in --out
    #[arg(long)]
    resume: bool,
    /// Random seed [default: 1337]
    #[arg(long, allow_negative_numbers = true)]
    seed: Option<u64>,
    /// cpu or cuda (one NVIDIA GPU)
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, or tf32 or bf16 (CUDA matrix products on tensor cores; weights stay f32); kept by --resume [default: f32]
    #[arg(long)]
    precision: Option<String>,
    /// Act as if interrupted after this many steps (for testing --resume)
    #[arg(long, allow_negative_numbers = true, hide = true)]
    stop_after_steps: Option<u64>,
    #[command(flatten)]
    parallel: ParallelArgs,
}

/// Data parallel on several GPUs (docs/distributed.md); several hosts as torchrun names them.
#[derive(Args, Clone)]
struct ParallelArgs {
    /// GPUs of this host to train on, one process each, sharing --batch out (--device cuda)
    #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
    gpus: usize,
    /// Hosts in the run, each running the same command with its own --node-rank
    #[arg(long, env = "PET_NNODES", allow_negative_numbers = true, default_value_t = 1)]
    nnodes: usize,
    /// This host's place among the hosts, 0 to nnodes − 1
    #[arg(long, env = "PET_NODE_RANK", allow_negative_numbers = true, default_value_t = 0)]
    node_rank: usize,
    /// Node 0's address, where the ranks meet
    #[arg(long, env = "MASTER_ADDR", default_value = "127.0.0.1")]
    master_addr: String,
    /// The port where the ranks meet [default: a free one on one host, 29500 across hosts]
    #[arg(long, env = "MASTER_PORT")]
    master_port: Option<u16>,
}

impl ParallelArgs {
    fn topology(&self) -> Topology {
        Topology {
            gpus: self.gpus,
            nnodes: self.nnodes,
            node_rank: self.node_rank,
            master_addr: self.master_addr.clone(),
            master_port: self.master_port,
        }
    }
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    text_file: PathBuf,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, or tf32 or bf16 (CUDA matrix products on tensor cores)
    #[arg(long, default_value = "f32")]
    precision: String,
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Always take the most likely token
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    greedy: bool,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Keep the k most likely tokens (0: all)
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1: off)
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f64,
    #[arg(long, allow_negative_numbers = true, default_value_t = 0)]
    seed: u64,
    /// How speculative decoding drafts: mixture (the CP head's, r·(n − 1) unembedding rows a
    /// step) or top-component (the likeliest component's, n − 1 rows); the output is exact either way
    #[arg(long, default_value = "mixture")]
    draft: String,
}

impl SamplingArgs {
    fn config(&self) -> SamplingConfig {
        SamplingConfig { greedy: self.greedy, temperature: self.temperature, top_k: self.top_k, top_p: self.top_p }
    }
}

#[derive(Args)]
struct SampleArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, required_unless_present = "prompts_file")]
    prompt: Option<String>,
    /// Prompts, one a line (empty lines skipped), after --prompt if both are given
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// Samples per prompt, seeded --seed, --seed + 1, ... (the JSON then lists them under samples)
    #[arg(long, allow_negative_numbers = true, value_parser = at_least_one)]
    num_samples: Option<usize>,
    /// Samples decoded together, one backbone pass for all of them (each holds a KV cache of its
    /// own)
    #[arg(long, allow_negative_numbers = true, value_parser = at_least_one, default_value_t = 8)]
    batch: usize,
    #[arg(long, allow_negative_numbers = true, value_parser = at_least_one, default_value_t = 100)]
    max_new_tokens: usize,
    /// Go on past the tokenizer's end-of-text token instead of stopping at it
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Self-speculative decoding with the multi-token head (several tokens per pass)
    #[arg(long)]
    speculative: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, or bf16 (CUDA only): the weights each decoding pass streams, as bf16 copies
    #[arg(long, default_value = "f32")]
    precision: String,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time full training steps on random tokens
    Train {
        #[arg(long, default_value = "small")]
        model: String,
        #[arg(long, allow_negative_numbers = true, default_value_t = 4096)]
        vocab_size: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
        horizon: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 1)]
        rank: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 8)]
        batch: usize,
        #[arg(long, allow_negative_numbers = true, default_value_t = 256)]
        seq: usize,
        /// Timed steps (after 3 warm-up steps)
        #[arg(long, allow_negative_numbers = true, default_value_t = 10)]
        steps: usize,
        /// cpu or cuda
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32, or tf32 or bf16 (CUDA only)
        #[arg(long, default_value = "f32")]
        precision: String,
        #[command(flatten)]
        parallel: ParallelArgs,
    },
    /// Autoregressive against self-speculative decoding on a checkpoint
    Decode {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, allow_negative_numbers = true, default_value_t = 200, value_parser = at_least_one)]
        max_new_tokens: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Runs of each decoder; medians are reported
        #[arg(long, allow_negative_numbers = true, default_value_t = 3, value_parser = at_least_one)]
        repeats: usize,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Copies of the prompt decoded together, seeded --seed, --seed + 1, ...
        #[arg(long, allow_negative_numbers = true, default_value_t = 1, value_parser = at_least_one)]
        batch: usize,
        /// f32, or bf16 (CUDA only): the weights each decoding pass streams, as bf16 copies
        #[arg(long, default_value = "f32")]
        precision: String,
    },
}

/// A count that must be positive (a benchmark of no tokens or no runs has nothing to report).
/// Refuses, before anything is allocated, a `sample` run whose samples cannot all be kept (each
/// sample's result, a `Generation` and its tokens, is kept until the end, where they are
/// printed), or whose seeds (`--seed` + k) would pass the largest seed; on the CPU, also one
/// whose batch's KV caches would not fit.
fn check_sample_count(prompts: usize, samples: usize, seed: u64, config: &ModelConfig, batch: usize, device: DeviceKind) -> Result<()> {
    if seed.checked_add(samples as u64 - 1).is_none() {
        anyhow::bail!("--seed {seed} with --num-samples {samples}: the samples' seeds (--seed + k) would pass the largest seed; choose a smaller --seed");
    }
    let total = prompts as u128 * samples as u128;
    let kept = total * std::mem::size_of::<decode::Generation>() as u128;
    if let Some(memory) = multitoken::bench::memory_short_of(kept) {
        anyhow::bail!(
            "{total} samples ({prompts} prompts × --num-samples {samples}) would need more than this machine's {:.1} GiB to keep their results; lower --num-samples",
            multitoken::bench::gib(memory as u128)
        );
    }
    if device == DeviceKind::Cpu {
        let together = batch.min(total.min(usize::MAX as u128) as usize);
        multitoken::decode::generate::check_cache_memory(config, together, std::mem::size_of::<f32>())?;
    }
    Ok(())
}

fn at_least_one(text: &str) -> std::result::Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(count) => Ok(count),
        Err(_) => Err("expected a whole number of at least 1".into()),
    }
}

/// A progress bar on stderr with a live tokens/s readout, for long generations.
fn live_readout(total: usize) -> indicatif::ProgressBar {
    if total < 64 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} tokens | {per_sec} | eta {eta}").expect("valid template"));
    bar
}

fn load_checkpoint_with_tokenizer(dir: &std::path::Path) -> Result<(checkpoint::Checkpoint, tokenizers::Tokenizer)> {
    let ckpt = checkpoint::load(dir)?;
    let json = ckpt
        .tokenizer_json
        .as_deref()
        .ok_or_else(|| Error::bad_file(dir, "has no tokenizer.json; copy the tokenizer the model was trained with into it"))?;
    let tokenizer_path = dir.join(checkpoint::TOKENIZER_FILE);
    let tok = tokenizer::from_json(json, &tokenizer_path)?;
    let (tokens, vocab) = (tok.get_vocab_size(true), ckpt.config.vocab_size);
    if tokens != vocab {
        let consequence = if tokens > vocab { "it makes ids the model has no row for" } else { "the model makes ids it cannot print" };
        return Err(Error::bad_file(
            tokenizer_path,
            format!(
                "has {tokens} tokens but the model's vocabulary is {vocab} ({consequence}); use the tokenizer the model was trained with"
            ),
        )
        .into());
    }
    Ok((ckpt, tok))
}

/// Runs a command; returns its JSON result and a human-readable rendering.
fn run(cli: &Cli) -> Result<(Value, String)> {
    match &cli.command {
        Command::Tokenizer(TokenizerCommand::Train { input, vocab_size, out }) => {
            let summary = tokenizer::train(input, *vocab_size, out, !cli.json)?;
            let text =
                format!("tokenizer: {} tokens, {:.3} bytes per token → {}", summary.vocab_size, summary.bytes_per_token, out.display());
            Ok((serde_json::to_value(summary)?, text))
        }
        Command::Data(DataCommand::Prepare { tokenizer, input, out, val_fraction }) => {
            let summary = data::prepare(tokenizer, input, out, *val_fraction, !cli.json)?;
            if summary.replaced_bytes > 0 {
                eprintln!("warning: {} bytes of the input were not UTF-8 and were read as U+FFFD", summary.replaced_bytes);
            }
            let text = format!("data: {} train tokens, {} validation tokens → {}", summary.train_tokens, summary.val_tokens, out.display());
            Ok((serde_json::to_value(summary)?, text))
        }
        Command::Train(args) => {
            let device = DeviceKind::parse(&args.device)?;
            let precision = args.precision.as_deref().map(|p| Precision::parse(p, device)).transpose()?;
            // (flag, whether given, where the setting sits in the saved settings' JSON)
            let flags = [
                ("--model", args.model.is_some(), "/model"),
                ("--n-embd", args.n_embd.is_some(), "/shape/n_embd"),
                ("--n-layer", args.n_layer.is_some(), "/shape/n_layer"),
                ("--n-head", args.n_head.is_some(), "/shape/n_head"),
                ("--n-positions", args.n_positions.is_some(), "/shape/n_positions"),
                ("--horizon", args.horizon.is_some(), "/horizon"),
                ("--rank", args.rank.is_some(), "/rank"),
                ("--aux-coef", args.aux_coef.is_some(), "/aux_coef"),
                ("--steps", args.steps.is_some(), "/steps"),
                ("--batch", args.batch.is_some(), "/batch"),
                ("--grad-accum", args.grad_accum.is_some(), "/grad_accum"),
                ("--seq", args.seq.is_some(), "/seq"),
                ("--lr", args.lr.is_some(), "/lr"),
                ("--min-lr", args.min_lr.is_some(), "/min_lr_ratio"),
                ("--warmup", args.warmup.is_some(), "/warmup_steps"),
                ("--weight-decay", args.weight_decay.is_some(), "/weight_decay"),
                ("--beta2", args.beta2.is_some(), "/beta2"),
                ("--grad-clip", args.grad_clip.is_some(), "/grad_clip"),
                ("--eval-every", args.eval_every.is_some(), "/eval_every"),
                ("--save-every", args.save_every.is_some(), "/save_every"),
                ("--init-from", args.init_from.is_some(), "/init_from"),
                ("--freeze-backbone", args.freeze_backbone, "/freeze_backbone"),
                ("--seed", args.seed.is_some(), "/seed"),
                ("--precision", args.precision.is_some(), "/precision"),
            ];
            let explicit: Vec<(&'static str, &'static str)> =
                flags.iter().filter(|(_, given, _)| *given).map(|&(flag, _, pointer)| (flag, pointer)).collect();
            let d = TrainSettings::default();
            let lr = args.lr.unwrap_or(d.lr);
            let settings = TrainSettings {
                model: args.model.clone().unwrap_or(d.model),
                shape: ShapeOverrides { n_embd: args.n_embd, n_layer: args.n_layer, n_head: args.n_head, n_positions: args.n_positions },
                horizon: args.horizon.unwrap_or(d.horizon),
                rank: args.rank.unwrap_or(d.rank),
                aux_coef: args.aux_coef.unwrap_or(d.aux_coef),
                steps: args.steps.unwrap_or(d.steps),
                batch: args.batch.unwrap_or(d.batch),
                grad_accum: args.grad_accum.unwrap_or(d.grad_accum),
                seq: args.seq.unwrap_or(d.seq),
                lr,
                min_lr_ratio: args.min_lr.map_or(d.min_lr_ratio, |min_lr| min_lr / lr),
                warmup_steps: args.warmup.or(d.warmup_steps),
                weight_decay: args.weight_decay.unwrap_or(d.weight_decay),
                beta2: args.beta2.unwrap_or(d.beta2),
                grad_clip: args.grad_clip.unwrap_or(d.grad_clip),
                eval_every: args.eval_every.unwrap_or(d.eval_every),
                save_every: args.save_every.unwrap_or(d.save_every),
                seed: args.seed.unwrap_or(d.seed),
                init_from: args.init_from.clone(),
                freeze_backbone: args.freeze_backbone,
                precision: precision.unwrap_or(d.precision),
                ..d
            };
            ctrlc::set_handler(|| train::STOP_REQUESTED.store(true, std::sync::atomic::Ordering::SeqCst))
                .context("installing the Ctrl-C handler")?;
            let topology = args.parallel.topology();
            // a resumed run's batch is its saved one, checked once read (unless --batch is given)
            topology.check(device, (!args.resume || args.batch.is_some()).then_some(settings.batch))?;
            let replica = Replica::from_env()?;
            let mut options = train::RunOptions {
                resume: args.resume,
                show_progress: true,
                stop_after_steps: args.stop_after_steps,
                stop_after_seconds: None,
                device,
                explicit,
                replica: replica.clone(),
            };
            if replica.is_none() && topology.world_size() > 1 {
                // the launcher: checks the run as rank 0 will, then starts the ranks, which print
                topology.check_host()?;
                // as this host's first rank will: on node 0 that is rank 0, which checks --out
                let (rank, world_size) = (topology.node_rank * topology.gpus, topology.world_size());
                options.replica = Some(Replica { rank, local_rank: 0, world_size, rendezvous: String::new() });
                train::check_run(&args.data, &args.out, settings, &options)?;
                distributed::launch(&topology)?;
                return Ok((Value::Null, String::new()));
            }
            if replica.is_some() {
                distributed::die_with_launcher();
            }
            let summary = train::train(&args.data, &args.out, settings, &options)?;
            let text = format!(
                "trained {} steps: train loss {:.4}, val joint loss {:.4}, val next-token loss {:.4}, {:.0} tokens/s → {}",
                summary.steps,
                summary.train_loss,
                summary.val_joint_loss,
                summary.val_ntp_loss,
                summary.tokens_per_s,
                summary.checkpoint.display()
            );
            Ok((serde_json::to_value(summary)?, text))
        }
        Command::Eval(args) => {
            let device = DeviceKind::parse(&args.device)?;
            let precision = Precision::parse(&args.precision, device)?;
            multitoken::device::check_available(device)?;
            let (ckpt, tok) = load_checkpoint_with_tokenizer(&args.checkpoint)?;
            let text = tokenizer::read_text(&args.text_file)?;
            let ids = tokenizer::encode(&tok, &text)?;
            if ids.len() <= ckpt.config.horizon {
                anyhow::bail!(
                    "{}: the text has {} tokens, too few to score with horizon {} (give a longer text)",
                    args.text_file.display(),
                    ids.len(),
                    ckpt.config.horizon
                );
            }
            let params = train::params_to_device(&ckpt.config, &ckpt.params, &device.open(precision)?)?;
            let losses = evaluate::evaluate_tokens(&ckpt.config, &params, &ids)?;
            if !losses.joint_loss.is_finite() {
                anyhow::bail!(
                    "{}: the losses are not finite: the weights overflow in f32 (a run that diverged?); use another checkpoint",
                    args.checkpoint.display()
                );
            }
            let text = format!(
                "joint loss {:.4}, next-token loss {:.4}, head losses {:?}, over {} positions",
                losses.joint_loss, losses.ntp_loss, losses.head_losses, losses.tokens
            );
            Ok((serde_json::to_value(losses)?, text))
        }
        Command::Sample(args) => {
            let device = DeviceKind::parse(&args.device)?;
            let precision = Precision::parse_for_decoding(&args.precision, device)?;
            multitoken::device::check_available(device)?;
            args.sampling.config().validate()?;
            let draft = decode::Draft::parse(&args.sampling.draft)?;
            if draft != decode::Draft::Mixture && !args.speculative {
                anyhow::bail!("--draft {} chooses how --speculative drafts; add --speculative", args.sampling.draft);
            }
            let mut prompts: Vec<String> = args.prompt.iter().cloned().collect();
            if let Some(file) = &args.prompts_file {
                prompts.extend(tokenizer::read_text(file)?.lines().filter(|l| !l.trim().is_empty()).map(String::from));
                if prompts.is_empty() {
                    anyhow::bail!("{}: holds no prompt (one a line)", file.display());
                }
            }
            let (ckpt, tok) = load_checkpoint_with_tokenizer(&args.checkpoint)?;
            let samples = args.num_samples.unwrap_or(1);
            check_sample_count(prompts.len(), samples, args.sampling.seed, &ckpt.config, args.batch, device)?;
            let encoded: Vec<Vec<u32>> = prompts.iter().map(|p| tokenizer::encode(&tok, p)).collect::<Result<_, _>>()?;
            let stop_at = if args.ignore_eos { None } else { tokenizer::end_of_text_id(&tok) };
            let sampling = args.sampling.config();
            let gpu = device.open(Precision::F32)?.gpu().cloned();
            let mut gpu_decoder = match &gpu {
                Some(gpu) => {
                    let sequences = args.batch.min(prompts.len() * args.num_samples.unwrap_or(1));
                    Some(multitoken::decode::cuda::GpuDecoder::in_precision(gpu, &ckpt.config, &ckpt.params, sequences, precision)?)
                }
                None => None,
            };
            // every (prompt, seed) pair, prompt by prompt
            let jobs: Vec<(usize, u64)> =
                (0..prompts.len()).flat_map(|p| (0..samples as u64).map(move |k| (p, args.sampling.seed + k))).collect();
            // one (prompt, seed) pair's request
            let settings = (args.max_new_tokens, &sampling, stop_at, draft);
            fn request<'a>(
                prompt: &'a [u32],
                seed: u64,
                (max_new_tokens, sampling, stop_at, draft): (usize, &'a SamplingConfig, Option<u32>, decode::Draft),
                progress: &'a mut dyn FnMut(usize),
            ) -> DecodeRequest<'a> {
                DecodeRequest { prompt, max_new_tokens, sampling, seed, progress, stop_at, draft }
            }
            let started = std::time::Instant::now();
            let mut generations = Vec::with_capacity(jobs.len());
            for group in jobs.chunks(args.batch) {
                let bar = live_readout(args.max_new_tokens * group.len());
                let done: Vec<std::cell::Cell<usize>> = group.iter().map(|_| Default::default()).collect();
                let mut callbacks: Vec<_> = (0..group.len())
                    .map(|i| {
                        let (done, bar) = (&done, &bar);
                        move |n: usize| {
                            done[i].set(n);
                            bar.set_position(done.iter().map(std::cell::Cell::get).sum::<usize>() as u64);
                        }
                    })
                    .collect();
                let requests = group
                    .iter()
                    .zip(callbacks.iter_mut())
                    .map(|(&(p, seed), callback)| request(&encoded[p], seed, settings, callback))
                    .collect();
                generations.extend(match gpu_decoder.as_mut() {
                    Some(decoder) => decoder.decode_batch(&ckpt.params, requests, args.speculative)?,
                    None => decode::generate::decode_batch(
                        &ckpt.config,
                        &ckpt.params,
                        requests,
                        args.speculative,
                        decode::generate::AcceptanceRule::Exact,
                    )?,
                });
                bar.finish_and_clear();
            }
            let all_tokens: usize = generations.iter().map(|g| g.tokens.len()).sum();
            let all_tokens_per_s = all_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
            let (mut samples, mut texts) = (Vec::new(), Vec::new());
            for (&(p, seed), generation) in jobs.iter().zip(&generations) {
                let continuation = tokenizer::decode(&tok, &generation.tokens)?;
                let mode = if args.speculative { format!(", {:.2} tokens per pass", generation.mean_accepted()) } else { String::new() };
                texts.push(format!(
                    "{}{continuation}\n\n[{} tokens, {:.1} tokens/s, {} forward passes{mode}]",
                    prompts[p],
                    generation.tokens.len(),
                    generation.tokens_per_s(),
                    generation.forward_passes
                ));
                samples.push(json!({
                    "text": continuation,
                    "prompt": prompts[p],
                    "seed": seed,
                    "tokens": generation.tokens,
                    "tokens_per_s": generation.tokens_per_s(),
                    "forward_passes": generation.forward_passes,
                    "mean_accepted": generation.mean_accepted(),
                    "acceptance_rates": generation.acceptance_rates(),
                    "speculative": args.speculative,
                    "draft": draft,
                    "precision": precision,
                }));
            }
            if jobs.len() > 1 {
                texts.push(format!("[{} samples: {all_tokens} tokens, {all_tokens_per_s:.1} tokens/s in all]", jobs.len()));
            }
            // with --prompts-file or --num-samples, the list under `samples`; else the one sample
            let value = if args.prompts_file.is_none() && args.num_samples.is_none() {
                samples.remove(0)
            } else {
                json!({ "samples": samples, "tokens_per_s": all_tokens_per_s, "batch": args.batch })
            };
            Ok((value, texts.join("\n\n---\n\n")))
        }
        Command::Bench(BenchCommand::Decode { checkpoint, prompt, max_new_tokens, sampling, repeats, device, batch, precision }) => {
            let device = DeviceKind::parse(device)?;
            let precision = Precision::parse_for_decoding(precision, device)?;
            sampling.config().validate()?;
            let draft = decode::Draft::parse(&sampling.draft)?;
            multitoken::device::check_available(device)?;
            let (ckpt, tok) = load_checkpoint_with_tokenizer(checkpoint)?;
            let ids = tokenizer::encode(&tok, prompt)?;
            let result = multitoken::bench::bench_decode(
                &ckpt.config,
                &ckpt.params,
                &ids,
                *max_new_tokens,
                &sampling.config(),
                sampling.seed,
                *repeats,
                device,
                draft,
                *batch,
                precision,
            )?;
            if let (true, Some(profile)) = (multitoken::autograd::profiling_enabled(), &result.gpu_profile) {
                eprint!("{profile}");
            }
            let rates: Vec<String> = result.acceptance_rates.iter().map(|r| format!("{r:.2}")).collect();
            let batch = if result.batch > 1 { format!("{} sequences together: ", result.batch) } else { String::new() };
            let text = format!(
                "{batch}autoregressive {:.1} tokens/s | speculative {:.1} tokens/s | speed-up {:.2}x | mean accepted {:.2} tokens per pass (n = {}, r = {}) | acceptance by draft position [{}] | a speculative pass costs {:.2} autoregressive passes | weights read ({}): {:.1} MB an autoregressive pass at {:.1} GB/s, {:.1} MB a speculative pass at {:.1} GB/s, against {:.1} GB/s copied",
                result.ar_tokens_per_s,
                result.spec_tokens_per_s,
                result.speedup,
                result.mean_accepted,
                ckpt.config.horizon,
                ckpt.config.rank,
                rates.join(", "),
                result.step_cost_ratio,
                result.precision.name(),
                result.ar_weight_bytes_per_pass as f64 / 1e6,
                result.ar_achieved_bandwidth_bytes_per_s / 1e9,
                result.weight_bytes_per_pass as f64 / 1e6,
                result.achieved_bandwidth_bytes_per_s / 1e9,
                result.copy_bandwidth_bytes_per_s / 1e9
            );
            Ok((serde_json::to_value(result)?, text))
        }
        Command::Bench(BenchCommand::Train { model, vocab_size, horizon, rank, batch, seq, steps, device, precision, parallel }) => {
            let device = DeviceKind::parse(device)?;
            let precision = Precision::parse(precision, device)?;
            let topology = parallel.topology();
            topology.check(device, Some(*batch))?;
            let bench = multitoken::bench::TrainBench {
                model: model.clone(),
                vocab_size: *vocab_size,
                horizon: *horizon,
                rank: *rank,
                batch: *batch,
                seq: *seq,
                steps: *steps,
            };
            let replica = Replica::from_env()?;
            if replica.is_none() && topology.world_size() > 1 {
                topology.check_host()?;
                bench.config(device)?;
                distributed::launch(&topology)?;
                return Ok((Value::Null, String::new()));
            }
            if replica.is_some() {
                distributed::die_with_launcher();
            }
            let result = multitoken::bench::bench_train(&bench, device, precision, replica.as_ref())?;
            if multitoken::autograd::profiling_enabled() {
                eprint!("{}", multitoken::autograd::profile_report());
            }
            let memory = match (result.peak_gpu_bytes, &result.gpu) {
                (Some(bytes), Some(gpu)) => format!("peak GPU memory {:.0} MiB on {gpu}", bytes as f64 / (1 << 20) as f64),
                _ => format!("peak RSS {:.0} MiB ({} threads)", result.peak_rss_bytes as f64 / (1 << 20) as f64, result.threads),
            };
            let text = format!(
                "bench train {model} V={vocab_size} n={horizon} r={rank} B={batch} T={seq} {}{}: {:.0} tokens/s, {:.1} ms/step, {:.2} model TFLOP/s, {memory}",
                result.precision.name(),
                if result.gpus > 1 { format!(" on {} GPUs", result.gpus) } else { String::new() },
                result.tokens_per_s,
                result.step_ms,
                result.model_tflop_per_s
            );
            Ok((serde_json::to_value(result)?, text))
        }
    }
}

/// The most worker threads `--threads` may ask for: far more cores than any one machine has.
const MAX_THREADS: usize = 1024;

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let message = info.to_string().replace('\n', " ");
        eprintln!("error: internal error ({message}); please report it");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp
                    | clap::error::ErrorKind::DisplayVersion
                    | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            let _ = e.print();
            return if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
        Err(e) => {
            // clap's message on one line: what it says before the usage (some messages, such
            // as a missing argument's, name it on the next line)
            let rendered = e.to_string();
            let said: Vec<&str> = rendered
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("{} (see --help)", said.join(" "));
            return ExitCode::from(2);
        }
    };
    if let Some(threads) = cli.threads.filter(|&t| t == 0 || t > MAX_THREADS) {
        eprintln!("error: --threads {threads} must lie between 1 and {MAX_THREADS} (see --help)");
        return ExitCode::from(2);
    }
    // Everything runs on a worker of the pool: parallel loops started from a worker share the
    // work with it instead of handing it over and sleeping, which costs more than the many small
    // loops of decoding take.
    let pool = match rayon::ThreadPoolBuilder::new().num_threads(cli.threads.unwrap_or(0)).build() {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("error: could not start the worker threads ({e})");
            return ExitCode::from(1);
        }
    };
    match pool.install(|| run(&cli)) {
        // a launcher of ranks, which printed the result themselves
        Ok((Value::Null, _)) => ExitCode::SUCCESS,
        Ok((value, text)) => {
            if cli.json {
                println!("{value}");
            } else {
                println!("{text}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let error = e.downcast_ref::<Error>();
            let interrupted = matches!(error, Some(Error::Interrupted { .. }));
            let message = format!("{e:#}").replace('\n', " ");
            match (error, Replica::from_env().ok().flatten()) {
                // a rank that failed printed why; the launcher only passes its status on
                (Some(Error::RankFailed { code, signal: None, .. }), _) => return ExitCode::from(*code),
                (Some(Error::RankFailed { .. }), _) => eprintln!("error: {message}"),
                // every rank stops alike; rank 0 says so for all
                (Some(Error::Interrupted { .. } | Error::NonFiniteLoss { .. }), Some(replica)) if replica.rank > 0 => {}
                (_, Some(replica)) if replica.rank > 0 => eprintln!("error: rank {}: {message}", replica.rank),
                _ => eprintln!("error: {message}"),
            }
            ExitCode::from(if interrupted { 130 } else { 1 })
        }
    }
}
