//! Generation: the plain reference decoder, autoregressive decoding with a KV cache, and
//! self-speculative decoding with the multi-token head (docs/decoding.md).

use std::time::Instant;

use serde::Serialize;

use super::context::context_start;
use super::head::{Head, HeadState};
use super::kv_cache::CachedBackbone;
use super::pass::{Backbone, BatchBackbone, OneSequence};
use super::sampling::{self, SamplingConfig};
use crate::autograd::Tape;
use crate::error::Result;
use crate::invalid;
use crate::model::{gpt2, ModelConfig, ModelParams};
use crate::tensor::{Float, Rng, Tensor};

/// Where decoding time went, in seconds. With the whole step on a GPU a step is one graph, all
/// of it `backbone_s`, and priming S after a prefill `draft_s`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timing {
    /// backbone passes over new tokens (the decoding passes)
    pub backbone_s: f64,
    /// the head's target distributions at the states of those tokens, and the acceptance test
    pub target_s: f64,
    /// the head's other horizons at S and the draft conditionals
    pub draft_s: f64,
    /// prompt prefill and cache rebuilds when the window moves
    pub prefill_s: f64,
}

/// The result of one decoding run: the new tokens, and what producing them cost.
#[derive(Clone, Debug, Serialize)]
pub struct Generation {
    /// the new token ids
    pub tokens: Vec<u32>,
    /// backbone passes spent on decoding (prefill not counted)
    pub forward_passes: usize,
    /// wall-clock seconds from the start of decoding (the prompt's prefill included) to the step
    /// that finished it; in a batch, from the batch's start
    pub elapsed_s: f64,
    /// for draft position s = 1..n−1: steps whose verification reached it (every earlier draft
    /// accepted)
    pub drafted: Vec<usize>,
    /// for draft position s = 1..n−1: drafts accepted there
    pub accepted: Vec<usize>,
    /// where the time went
    pub timing: Timing,
}

impl Generation {
    /// New tokens per second of `elapsed_s`.
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens.len() as f64 / self.elapsed_s.max(1e-9)
    }

    /// New tokens per decoding pass.
    pub fn mean_accepted(&self) -> f64 {
        self.tokens.len() as f64 / self.forward_passes.max(1) as f64
    }

    /// Acceptance rate at each draft position s = 1..n−1.
    pub fn acceptance_rates(&self) -> Vec<f64> {
        self.drafted.iter().zip(&self.accepted).map(|(&d, &a)| if d == 0 { 0.0 } else { a as f64 / d as f64 }).collect()
    }
}

fn check_prompt(config: &ModelConfig, prompt: &[u32], sampling: &SamplingConfig) -> Result<()> {
    if prompt.is_empty() {
        return invalid!("the prompt is empty: give at least one character of text");
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= config.vocab_size) {
        return invalid!(
            "prompt token {bad} is outside the model's vocabulary of {}; does the tokenizer belong to this checkpoint?",
            config.vocab_size
        );
    }
    sampling.validate()
}

/// The next token from a next-token distribution.
fn choose<T: Float>(probs: &[T], sampling: &SamplingConfig, rng: &mut Rng) -> u32 {
    if sampling.greedy {
        sampling::argmax(probs)
    } else {
        sampling::draw(&sampling::distribution_from_probs(probs, sampling), rng)
    }
}

/// Reference decoder: every token runs the backbone over its whole window, no cache.
/// Slow and plain; the decoders below must agree with it.
pub fn generate_reference<T: Float>(
    config: &ModelConfig,
    params: &ModelParams<Tensor<T>>,
    prompt: &[u32],
    max_new_tokens: usize,
    sampling: &SamplingConfig,
    seed: u64,
) -> Result<Generation> {
    check_prompt(config, prompt, sampling)?;
    let mut rng = Rng::new(seed);
    let mut sequence = prompt.to_vec();
    let started = Instant::now();
    let head = Head::new(config, params);
    for _ in 0..max_new_tokens {
        let t = sequence.len();
        let window = &sequence[context_start(t, config.n_positions)..t];
        let mut tape = Tape::inference();
        let vars = gpt2::params_on_tape(&mut tape, config, params, |_| false);
        let h = gpt2::hidden_states(&mut tape, config, &vars, window, window.len())?;
        let last = &tape.value(h).data()[(window.len() - 1) * config.n_embd..];
        let state = head.states(last, 1)?.remove(0);
        sequence.push(choose(&state.next_token_probs(), sampling, &mut rng));
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    Ok(Generation {
        tokens: sequence[prompt.len()..].to_vec(),
        forward_passes: max_new_tokens,
        elapsed_s,
        drafted: vec![],
        accepted: vec![],
        timing: Timing::default(),
    })
}

/// Which distribution proposes the drafts of self-speculative decoding. Verification keeps the
/// output exact whatever the draft; a draft closer to the model is accepted more often.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Draft {
    /// the CP head's mixture (docs/decoding.md, step 1): every component, weighted by its
    /// posterior given the drafts so far; r·(n − 1) unembedding rows a step
    #[default]
    Mixture,
    /// the single component α* most likely given the pending token, `argmax_α w[α] P[α,0](c)`,
    /// whose horizons draft independently: `q_s = P[α*,s]`; n − 1 unembedding rows a step
    TopComponent,
}

impl Draft {
    /// Parses `--draft`: `mixture` or `top-component`.
    pub fn parse(name: &str) -> crate::error::Result<Self> {
        match name {
            "mixture" => Ok(Draft::Mixture),
            "top-component" => Ok(Draft::TopComponent),
            other => crate::invalid!("unknown --draft '{other}' (use mixture or top-component)"),
        }
    }
}

/// What a decoder needs besides the model: how many tokens, how to choose them, and a callback
/// told the number of new tokens after every step (for a live readout).
pub struct DecodeRequest<'a> {
    /// the prompt's token ids; at least one
    pub prompt: &'a [u32],
    /// how many tokens to generate
    pub max_new_tokens: usize,
    /// greedy, or temperature, top-k and top-p
    pub sampling: &'a SamplingConfig,
    /// seeds the sampler's random numbers
    pub seed: u64,
    /// told the number of new tokens after each step
    pub progress: &'a mut dyn FnMut(usize),
    /// a token that ends the generation once emitted (it is kept): the tokenizer's
    /// end-of-text, or `None` to always make `max_new_tokens`
    pub stop_at: Option<u32>,
    /// how speculative decoding drafts (autoregressive decoding drafts nothing)
    pub draft: Draft,
}

/// How sampled drafts are accepted. Only `Exact` is correct; the other exists so that the
/// exactness test can show it catches a wrong rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptanceRule {
    /// accept d with probability min(1, p(d)/q(d)); on rejection draw from normalise(max(0, p − q))
    Exact,
    /// accept every draft (wrong: the output then follows the drafts' distribution)
    AlwaysAccept,
    /// the exact acceptance test, but a rejection draws from p instead of the residual (wrong:
    /// a common slip that over-weights what the draft already proposed)
    ResampleFromTarget,
}

/// Self-speculative decoding (docs/decoding.md). With `speculative = false`, the same loop
/// drafts nothing and runs one token per pass: autoregressive decoding with a KV cache.
///
/// ```
/// use multitoken::decode::{decode, DecodeRequest, SamplingConfig};
/// use multitoken::model::{gpt2, ModelConfig};
/// use multitoken::tensor::Rng;
/// // an untrained `tiny` GPT-2 (vocabulary 64) with the CP head: n = 4 tokens, rank 2
/// let config = ModelConfig::preset("tiny", 64, 4, 2)?;
/// let params = gpt2::init_params::<f32>(&config, &mut Rng::new(0));
/// let greedy = SamplingConfig::greedy();
/// let mut outputs = Vec::new();
/// for speculative in [false, true] {
///     let request = DecodeRequest {
///         prompt: &[1, 2, 3],
///         max_new_tokens: 20,
///         sampling: &greedy,
///         seed: 0,
///         progress: &mut |_| {},
///         stop_at: None,
///         draft: Default::default(),
///     };
///     let generation = decode(&config, &params, request, speculative)?;
///     println!("{:.2} tokens per forward pass", generation.mean_accepted());
///     outputs.push(generation.tokens);
/// }
/// assert_eq!(outputs[0], outputs[1]); // greedy: speculative decoding gives the same tokens
/// # Ok::<(), multitoken::error::Error>(())
/// ```
pub fn decode<T: Float>(
    config: &ModelConfig,
    params: &ModelParams<Tensor<T>>,
    request: DecodeRequest,
    speculative: bool,
) -> Result<Generation> {
    decode_with_rule(config, params, request, speculative, AcceptanceRule::Exact)
}

/// [`decode`] with a choice of acceptance rule for sampled drafts (for tests).
pub fn decode_with_rule<T: Float>(
    config: &ModelConfig,
    params: &ModelParams<Tensor<T>>,
    request: DecodeRequest,
    speculative: bool,
    rule: AcceptanceRule,
) -> Result<Generation> {
    let mut backbone = CachedBackbone::new(config, params);
    let head = Head::new(config, params);
    decode_loop(config, &mut HostEngine::new(&mut backbone, &head, rule), request, speculative)
}

/// What the loop asks of one step.
#[derive(Clone, Copy, Debug)]
pub struct StepRequest<'a> {
    /// c: the token emitted last, not yet run through the backbone
    pub pending: u32,
    /// how many drafts may follow c in the pass (an engine proposes none while its cache has no
    /// state S, after a prompt of one token)
    pub max_drafts: usize,
    /// how tokens are chosen
    pub sampling: &'a SamplingConfig,
    /// how drafts are proposed
    pub draft: Draft,
}

/// What one step gave: the drafts it accepted and the token after them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepOutcome {
    /// d_1..d_k, the drafts accepted, in order
    pub accepted: Vec<u32>,
    /// the token after them: the target's where a draft was rejected, else a fresh one
    pub next: u32,
}

/// The model's side of one sequence's decoding, on some device (docs/decoding.md, "One step").
/// [`decode_loop`] decides what each step runs (where the window starts, how many drafts fit,
/// when to stop) and emits what comes back; an engine drafts, runs the backbone, verifies and
/// rolls its cache back. The CPU's is [`HostEngine`]; the GPU's (`decode::cuda`) keeps the
/// whole step on the device and sends back only tokens. Both draw their random numbers from
/// the sequence's own generator.
pub trait StepEngine {
    /// Empties the cache and runs `context`, the window's tokens before the pending one; the next
    /// step drafts from the state of its last token (from none when it is empty).
    fn rebuild(&mut self, context: &[u32], generation: &mut Generation) -> Result<()>;

    /// Steps 1–4: up to `max_drafts` drafts after c, one backbone pass over c and the drafts,
    /// their verification, and the cache kept up to c and the accepted drafts. Adds its time and
    /// its draft counts to `generation`.
    fn step(&mut self, request: StepRequest, rng: &mut Rng, generation: &mut Generation) -> Result<StepOutcome>;
}

/// The step on the host, over any backbone and head: the CPU's engine, and the GPU's where the
/// device cannot keep the whole step (its head's products then run there, one round trip for
/// every verified state's target).
pub struct HostEngine<'e, 'h, T: Float> {
    backbone: &'e mut dyn Backbone<T>,
    head: &'e Head<'h, T>,
    step: HostStep<T>,
}

impl<'e, 'h, T: Float> HostEngine<'e, 'h, T> {
    /// An engine over `backbone` and `head`, accepting sampled drafts by `rule`.
    pub fn new(backbone: &'e mut dyn Backbone<T>, head: &'e Head<'h, T>, rule: AcceptanceRule) -> Self {
        HostEngine { backbone, head, step: HostStep::new(rule) }
    }
}

impl<T: Float> StepEngine for HostEngine<'_, '_, T> {
    fn rebuild(&mut self, context: &[u32], generation: &mut Generation) -> Result<()> {
        self.step.rebuild(self.backbone, self.head, context, generation)
    }

    fn step(&mut self, request: StepRequest, rng: &mut Rng, generation: &mut Generation) -> Result<StepOutcome> {
        let run = self.step.draft(&*self.backbone, self.head, request, rng, generation)?;
        // 2. one backbone pass over c, d_1, …, d_{m−1}
        let tick = Instant::now();
        let hidden = self.backbone.forward(&run)?;
        generation.timing.backbone_s += tick.elapsed().as_secs_f64();
        // on a device, every state's target in one round trip; on the CPU, lazily
        let tick = Instant::now();
        let computed = if self.head.on_device() { self.head.states(&hidden, 1)? } else { Vec::new() };
        generation.timing.target_s += tick.elapsed().as_secs_f64();
        self.step.verify(self.backbone, self.head, Targets { hidden: &hidden, computed }, request, rng, generation)
    }
}

/// The decoding loop over any engine (docs/decoding.md, "One step"): the window, the number of
/// drafts each step may run, the emitted tokens and when to stop are decided here, once for
/// every device.
pub fn decode_loop(config: &ModelConfig, engine: &mut dyn StepEngine, request: DecodeRequest, speculative: bool) -> Result<Generation> {
    let mut sequence = SequenceDecoder::new(config, request, speculative)?;
    while let Some(plan) = sequence.plan() {
        if plan.rebuild {
            let context = sequence.context().to_vec();
            engine.rebuild(&context, &mut sequence.generation)?;
        }
        let outcome = engine.step(plan.request, &mut sequence.rng, &mut sequence.generation)?;
        sequence.emit(outcome);
    }
    Ok(sequence.finish())
}

/// Refuses, before anything is allocated, to decode `sequences` sequences together on the CPU
/// when their KV caches (keys and values of every layer at every position, `float_bytes` an
/// entry) would not fit this machine's memory.
pub fn check_cache_memory(config: &ModelConfig, sequences: usize, float_bytes: usize) -> Result<()> {
    let per_sequence = 2 * config.n_layer as u128 * config.n_positions as u128 * config.n_embd as u128 * float_bytes as u128;
    let needed = per_sequence * sequences as u128;
    if let Some(total) = crate::bench::memory_short_of(needed) {
        return invalid!(
            "decoding {sequences} sequences together needs {:.1} GiB for their KV caches ({:.1} MiB each), more than this machine's {:.1} GiB; lower --batch",
            crate::bench::gib(needed),
            per_sequence as f64 / (1u64 << 20) as f64,
            crate::bench::gib(total as u128)
        );
    }
    Ok(())
}

/// Several requests decoded together on the CPU (docs/decoding.md, "Several prompts at once"):
/// [`decode_batch_on`] with a cache per request. Every sequence gets the tokens that [`decode`]
/// gives its request alone (the same arithmetic row by row, the same random numbers).
pub fn decode_batch<T: Float>(
    config: &ModelConfig,
    params: &ModelParams<Tensor<T>>,
    requests: Vec<DecodeRequest>,
    speculative: bool,
    rule: AcceptanceRule,
) -> Result<Vec<Generation>> {
    check_cache_memory(config, requests.len(), std::mem::size_of::<T>())?;
    let mut backbone = CachedBackbone::with_sequences(config, params, requests.len());
    decode_batch_on(config, &mut backbone, &Head::new(config, params), requests, speculative, rule)
}

/// Several requests decoded together on any device's backbone, request i in its sequence i:
/// each step drafts for every unfinished sequence, then one backbone pass runs all their tokens
/// stacked, so that each linear layer reads its weights once for the batch; verification,
/// acceptance and rollback stay each sequence's own, on the host (the steps [`HostEngine`] runs
/// for one sequence, split around the stacked pass). One request alone is [`decode_loop`]'s over
/// a [`HostEngine`].
pub fn decode_batch_on<T: Float>(
    config: &ModelConfig,
    backbone: &mut dyn BatchBackbone<T>,
    head: &Head<T>,
    requests: Vec<DecodeRequest>,
    speculative: bool,
    rule: AcceptanceRule,
) -> Result<Vec<Generation>> {
    if requests.len() > backbone.sequences() {
        return invalid!("{} requests to decode together, but the backbone holds {} sequences", requests.len(), backbone.sequences());
    }
    if let [_] = requests[..] {
        let request = requests.into_iter().next().expect("one request");
        let mut alone = OneSequence { backbone, sequence: 0 };
        let generation = decode_loop(config, &mut HostEngine::new(&mut alone, head, rule), request, speculative)?;
        return Ok(vec![generation]);
    }
    let mut sequences = requests.into_iter().map(|r| SequenceDecoder::new(config, r, speculative)).collect::<Result<Vec<_>>>()?;
    let mut steps: Vec<HostStep<T>> = sequences.iter().map(|_| HostStep::new(rule)).collect();
    loop {
        // every unfinished sequence's plan, and its prefill where its window moves
        let mut plans = Vec::with_capacity(sequences.len());
        for (index, (sequence, step)) in sequences.iter_mut().zip(&mut steps).enumerate() {
            let plan = sequence.plan();
            if plan.as_ref().is_some_and(|plan| plan.rebuild) {
                let context = sequence.context().to_vec();
                step.rebuild(&mut OneSequence { backbone: &mut *backbone, sequence: index }, head, &context, &mut sequence.generation)?;
            }
            plans.push(plan);
        }
        // 1. the mixture's horizons at S for every sequence that drafts from it, in one product;
        //    then each sequence's drafts
        if speculative {
            let tick = Instant::now();
            let drafting =
                |plan: &Option<Plan>| plan.as_ref().is_some_and(|plan| plan.request.max_drafts > 0 && plan.request.draft == Draft::Mixture);
            let mut at_s: Vec<&mut HeadState<T>> =
                steps.iter_mut().zip(&plans).filter(|(_, plan)| drafting(plan)).filter_map(|(step, _)| step.head_at_s.as_mut()).collect();
            head.fill(&mut at_s, config.horizon)?;
            let fill_s = tick.elapsed().as_secs_f64();
            sequences
                .iter_mut()
                .zip(&plans)
                .filter(|(_, plan)| drafting(plan))
                .for_each(|(sequence, _)| sequence.generation.timing.draft_s += fill_s);
        }
        let mut runs = Vec::with_capacity(sequences.len());
        for (index, ((sequence, step), plan)) in sequences.iter_mut().zip(&mut steps).zip(&plans).enumerate() {
            runs.push(match plan {
                Some(plan) => {
                    let alone = OneSequence { backbone: &mut *backbone, sequence: index };
                    step.draft(&alone, head, plan.request, &mut sequence.rng, &mut sequence.generation)?
                }
                None => Vec::new(),
            });
        }
        if runs.iter().all(Vec::is_empty) {
            break;
        }
        // 2. one pass over every sequence's run, stacked
        let tick = Instant::now();
        let hidden = backbone.forward_batch(&runs.iter().map(Vec::as_slice).collect::<Vec<_>>())?;
        let pass_s = tick.elapsed().as_secs_f64();
        // without drafts every state is a target: all of them in one product, the unembedding
        // read once; with drafts each sequence computes its targets lazily, as alone (on a GPU,
        // every sequence's n targets in one round trip measured no faster at 16 and 64
        // sequences: n·S·r·V probabilities to download where most drafts fail early)
        let tick = Instant::now();
        let mut targets = if speculative { Vec::new() } else { head.states(&hidden.concat(), 1)? }.into_iter();
        let targets_s = tick.elapsed().as_secs_f64();
        // 3–4. each sequence's verification, acceptance and rollback
        for (index, (((sequence, step), plan), hidden)) in sequences.iter_mut().zip(&mut steps).zip(&plans).zip(&hidden).enumerate() {
            if let Some(plan) = plan {
                sequence.generation.timing.backbone_s += pass_s;
                sequence.generation.timing.target_s += targets_s;
                let computed = targets.by_ref().take(if speculative { 0 } else { runs[index].len() }).collect();
                let mut alone = OneSequence { backbone: &mut *backbone, sequence: index };
                let targets = Targets { hidden, computed };
                let outcome = step.verify(&mut alone, head, targets, plan.request, &mut sequence.rng, &mut sequence.generation)?;
                sequence.emit(outcome);
            }
        }
    }
    Ok(sequences.into_iter().map(SequenceDecoder::finish).collect())
}

/// What the loop runs next for one sequence: whether its window moved (the cache is then
/// rebuilt over [`SequenceDecoder::context`] first), and the step.
struct Plan<'r> {
    rebuild: bool,
    request: StepRequest<'r>,
}

/// One sequence's decoding, as the loop keeps it: its tokens, its window, how many it still
/// makes, and what they cost. [`plan`](Self::plan) says what the next step runs, an engine (or
/// a [`HostStep`] of a batch) runs it, and [`emit`](Self::emit) takes what it gave.
struct SequenceDecoder<'c, 'r> {
    config: &'c ModelConfig,
    request: DecodeRequest<'r>,
    /// tokens a pass runs at most: n when speculative, else 1
    n: usize,
    rng: Rng,
    /// the prompt, then every token emitted
    tokens: Vec<u32>,
    generation: Generation,
    started: Instant,
    finished: bool,
    /// where the cache's window starts (usize::MAX before the first step)
    window_start: usize,
}

impl<'c, 'r> SequenceDecoder<'c, 'r> {
    fn new(config: &'c ModelConfig, request: DecodeRequest<'r>, speculative: bool) -> Result<Self> {
        check_prompt(config, request.prompt, request.sampling)?;
        let n = if speculative { config.horizon } else { 1 };
        Ok(SequenceDecoder {
            config,
            n,
            rng: Rng::new(request.seed),
            tokens: request.prompt.to_vec(),
            generation: Generation {
                tokens: vec![],
                forward_passes: 0,
                elapsed_s: 0.0,
                drafted: vec![0; n.saturating_sub(1)],
                accepted: vec![0; n.saturating_sub(1)],
                timing: Timing::default(),
            },
            started: Instant::now(),
            finished: request.max_new_tokens == 0,
            window_start: usize::MAX,
            request,
        })
    }

    /// Tokens emitted so far.
    fn emitted(&self) -> usize {
        self.tokens.len() - self.request.prompt.len()
    }

    /// The window's tokens before the pending one: what the cache holds after a rebuild.
    fn context(&self) -> &[u32] {
        &self.tokens[self.window_start..self.tokens.len() - 1]
    }

    /// The next step: the pending token c, how many drafts may follow it, and whether the
    /// window moved; `None` once the sequence is finished.
    fn plan(&mut self) -> Option<Plan<'r>> {
        if self.finished {
            return None;
        }
        let length = self.tokens.len();
        let start = context_start(length, self.config.n_positions);
        let rebuild = start != self.window_start;
        self.window_start = start;
        // tokens this pass runs: targets at indices length.. must share the window, and no
        // more are needed than remain to be emitted
        let remaining = self.request.max_new_tokens - self.emitted();
        let mut run_length = 1;
        while run_length < self.n.min(remaining) && context_start(length + run_length, self.config.n_positions) == start {
            run_length += 1;
        }
        self.generation.forward_passes += 1;
        let request = StepRequest {
            pending: self.tokens[length - 1],
            max_drafts: run_length - 1,
            sampling: self.request.sampling,
            draft: self.request.draft,
        };
        Some(Plan { rebuild, request })
    }

    /// Step 4's emission: the accepted drafts and the next token join the sequence, which
    /// finishes at the stop token or once it has its tokens.
    fn emit(&mut self, outcome: StepOutcome) {
        let length = self.tokens.len();
        self.tokens.extend(&outcome.accepted);
        self.tokens.push(outcome.next);
        let (max_new_tokens, emitted) = (self.request.max_new_tokens, self.emitted());
        (self.request.progress)(emitted.min(max_new_tokens));
        let stopped = self.request.stop_at.and_then(|stop| self.tokens[length..].iter().position(|&t| t == stop));
        if let Some(at) = stopped {
            self.tokens.truncate(length + at + 1);
        }
        self.finished = stopped.is_some() || self.emitted() >= max_new_tokens;
        if self.finished {
            self.generation.elapsed_s = self.started.elapsed().as_secs_f64();
        }
    }

    /// The generation: the new tokens (at most `max_new_tokens`) and what they cost, timed
    /// to the step that finished the sequence.
    fn finish(mut self) -> Generation {
        let prompt = self.request.prompt.len();
        self.tokens.truncate(prompt + self.request.max_new_tokens);
        self.generation.tokens = self.tokens[prompt..].to_vec();
        self.generation
    }
}

/// One sequence's step on the host, split where a batch runs its stacked pass: [`draft`]
/// (step 1), the caller's pass, [`verify`] (steps 3–4). Between steps it keeps the head at S.
///
/// [`draft`]: Self::draft
/// [`verify`]: Self::verify
struct HostStep<T> {
    /// how sampled drafts are accepted
    rule: AcceptanceRule,
    /// S: the head at the state of the token before the pending one, once known
    head_at_s: Option<HeadState<T>>,
    /// this step's drafts, and (when sampling) the distribution each was drawn from
    drafts: Vec<u32>,
    draft_probs: Vec<Vec<f64>>,
    /// positions in the cache before this step's pass
    cache_before: usize,
}

/// What verification checks the drafts against: the pass's hidden states (m, C), and the head
/// at the first of them where the caller computed it with others' (the rest are computed in
/// [`HostStep::verify`], a state's only once every draft before it was accepted).
struct Targets<'h, T> {
    hidden: &'h [T],
    computed: Vec<HeadState<T>>,
}

impl<T: Float> HostStep<T> {
    fn new(rule: AcceptanceRule) -> Self {
        HostStep { rule, head_at_s: None, drafts: vec![], draft_probs: vec![], cache_before: 0 }
    }

    /// The prefill of a moved window: the cache over `context`, and S at its last token.
    fn rebuild(&mut self, backbone: &mut dyn Backbone<T>, head: &Head<T>, context: &[u32], generation: &mut Generation) -> Result<()> {
        let tick = Instant::now();
        backbone.truncate(0);
        self.head_at_s = match context {
            [] => None,
            _ => {
                let h = backbone.forward(context)?;
                Some(head.states(&h[h.len() - head.config.n_embd..], 1)?.remove(0))
            }
        };
        generation.timing.prefill_s += tick.elapsed().as_secs_f64();
        Ok(())
    }

    /// Step 1: drafts d_1..d_{m−1} from the head at S, conditioned on the pending token c;
    /// returns the pass's tokens c, d_1, …, d_{m−1}.
    fn draft(
        &mut self,
        backbone: &dyn Backbone<T>,
        head: &Head<T>,
        request: StepRequest,
        rng: &mut Rng,
        generation: &mut Generation,
    ) -> Result<Vec<u32>> {
        let (pending, count, sampling) = (request.pending, request.max_drafts, request.sampling);
        let tick = Instant::now();
        (self.drafts, self.draft_probs) = match self.head_at_s.as_mut() {
            Some(s_state) if count > 0 && request.draft == Draft::Mixture => {
                head.fill(&mut [s_state], head.config.horizon)?;
                draft(s_state, pending, count, sampling, rng)
            }
            Some(s_state) if count > 0 => {
                let alpha = top_component(s_state, pending);
                let probs = head.component_probabilities(&s_state.hidden, alpha, 1..count + 1)?;
                draft_independently(&probs, sampling, rng)
            }
            _ => (vec![], vec![]),
        };
        generation.timing.draft_s += tick.elapsed().as_secs_f64();
        self.cache_before = backbone.positions();
        let mut run = vec![pending];
        run.extend(&self.drafts);
        Ok(run)
    }

    /// Steps 3 and 4, after the pass over [`draft`](Self::draft)'s tokens gave their hidden
    /// states: verify the drafts against the next-token marginal at each state, keep c and the
    /// accepted drafts in the cache, and choose the token after them.
    fn verify(
        &mut self,
        backbone: &mut dyn Backbone<T>,
        head: &Head<T>,
        targets: Targets<T>,
        request: StepRequest,
        rng: &mut Rng,
        generation: &mut Generation,
    ) -> Result<StepOutcome> {
        let (c, sampling) = (head.config.n_embd, request.sampling);
        let Targets { hidden, computed: mut states } = targets;
        let tick = Instant::now();
        let mut kept = 0;
        let mut next = None;
        for (j, &d) in self.drafts.iter().enumerate() {
            generation.drafted[j] += 1;
            if states.len() <= j {
                states.extend(head.states(&hidden[j * c..(j + 1) * c], 1)?);
            }
            let target = states[j].next_token_probs();
            if sampling.greedy {
                let best = sampling::argmax(&target);
                if best != d {
                    next = Some(best);
                    break;
                }
            } else {
                let p = sampling::distribution_from_probs(&target, sampling);
                let q = &self.draft_probs[j];
                let (pd, qd) = (p[d as usize], q[d as usize]);
                let accept = match self.rule {
                    AcceptanceRule::AlwaysAccept => true,
                    _ => rng.uniform() < (pd / qd).min(1.0),
                };
                if !accept {
                    // rejected: draw from normalise(max(0, p − q))
                    let residual: Vec<f64> = p.iter().zip(q).map(|(a, b)| (a - b).max(0.0)).collect();
                    let total: f64 = residual.iter().sum();
                    let residual =
                        if total > 0.0 && self.rule == AcceptanceRule::Exact { residual.iter().map(|x| x / total).collect() } else { p };
                    next = Some(sampling::draw(&residual, rng));
                    break;
                }
            }
            generation.accepted[j] += 1;
            kept += 1;
        }
        let next = match next {
            Some(token) => token,
            None => {
                if states.len() <= kept {
                    states.extend(head.states(&hidden[kept * c..(kept + 1) * c], 1)?);
                }
                let probs = states[kept].next_token_probs();
                if probs.iter().any(|p| !p.as_f64().is_finite()) {
                    return Err(not_finite());
                }
                choose(&probs, sampling, rng)
            }
        };
        generation.timing.target_s += tick.elapsed().as_secs_f64();

        // 4. keep c, d_1..d_k in the cache; the new S is the state of d_k
        backbone.truncate(self.cache_before + 1 + kept);
        self.head_at_s = Some(states.swap_remove(kept));
        Ok(StepOutcome { accepted: self.drafts[..kept].to_vec(), next })
    }
}

/// The error of a next-token distribution that is not finite (every device reports it alike).
pub(crate) fn not_finite() -> crate::error::Error {
    crate::error::Error::Invalid(
        "the model's next-token probabilities are not finite: its weights overflow in f32; use another checkpoint".into(),
    )
}

/// The component most likely given the pending token c: `argmax_α w[α] P[α,0](c)`.
fn top_component<T: Float>(state: &HeadState<T>, pending: u32) -> usize {
    let score = |alpha: usize| (state.weights[alpha] * state.prob(alpha, 0)[pending as usize]).as_f64();
    (0..state.weights.len()).fold(0, |best, alpha| if score(alpha) > score(best) { alpha } else { best })
}

/// A draft from each distribution in turn, each on its own (one component's horizons are
/// independent of each other); returns the drafts and, when sampling, what each was drawn from.
fn draft_independently<T: Float>(probs: &[Vec<T>], sampling: &SamplingConfig, rng: &mut Rng) -> (Vec<u32>, Vec<Vec<f64>>) {
    let mut used = Vec::new();
    let drafts = probs.iter().map(|q| propose(q, sampling, rng, &mut used)).collect();
    (drafts, used)
}

/// One draft from the draft distribution q: its argmax when greedy, else a draw from q after
/// temperature, top-k and top-p, that distribution kept in `used` for the acceptance test.
fn propose<T: Float>(q: &[T], sampling: &SamplingConfig, rng: &mut Rng, used: &mut Vec<Vec<f64>>) -> u32 {
    if sampling.greedy {
        return sampling::argmax(q);
    }
    let distribution = sampling::distribution_from_probs(q, sampling);
    let d = sampling::draw(&distribution, rng);
    used.push(distribution);
    d
}

/// Drafts `count` tokens after the pending token c from the head at S (docs/decoding.md, step 1;
/// docs/math.md, eq. D1): `π[α] ∝ w[α] P[α,0](c)`, then
/// `q_s(v) ∝ Σ_α π[α] Π_{1≤j<s} P[α,j](d_j) · P[α,s](v)`.
/// Returns the drafts and, when sampling, the distribution each was drawn from.
fn draft<T: Float>(
    state: &HeadState<T>,
    pending: u32,
    count: usize,
    sampling: &SamplingConfig,
    rng: &mut Rng,
) -> (Vec<u32>, Vec<Vec<f64>>) {
    let r = state.weights.len();
    // the posterior over components, kept normalised, in f64
    let mut posterior: Vec<f64> = (0..r).map(|alpha| (state.weights[alpha] * state.prob(alpha, 0)[pending as usize]).as_f64()).collect();
    let (mut drafts, mut used) = (Vec::with_capacity(count), Vec::with_capacity(count));
    let mut q = vec![T::zero(); state.vocab];
    for s in 1..=count {
        let total: f64 = posterior.iter().sum();
        if total > 0.0 {
            posterior.iter_mut().for_each(|x| *x /= total);
        } else {
            posterior.iter_mut().for_each(|x| *x = 1.0 / r as f64);
        }
        q.iter_mut().for_each(|x| *x = T::zero());
        for (alpha, &weight) in posterior.iter().enumerate() {
            T::axpy(T::of(weight), state.prob(alpha, s), &mut q);
        }
        let d = propose(&q, sampling, rng, &mut used);
        for (alpha, weight) in posterior.iter_mut().enumerate() {
            *weight *= state.prob(alpha, s)[d as usize].as_f64();
        }
        drafts.push(d);
    }
    (drafts, used)
}
