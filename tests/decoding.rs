//! Decoding: the KV cache, greedy speculative decoding against greedy autoregressive decoding,
//! and the exactness of speculative sampling (a chi-square test that can fail, and does for a
//! wrong acceptance rule).

mod common;

use common::exactness::{chi_square, critical_value, exact_pair_distribution};
use multitoken::data::Batch;
use multitoken::decode::generate::AcceptanceRule;
use multitoken::decode::{decode, generate_reference, DecodeRequest, Draft, Generation, SamplingConfig};
use multitoken::model::{gpt2, ModelConfig, ModelParams};
use multitoken::tensor::{Rng, Tensor};
use multitoken::train::adamw::{AdamW, AdamWConfig};
use multitoken::train::{train_step, StepConfig};

fn config(n: usize, r: usize, vocab: usize, positions: usize) -> ModelConfig {
    ModelConfig { vocab_size: vocab, n_positions: positions, n_embd: 32, n_layer: 2, n_head: 4, horizon: n, rank: r }
}

/// Decodes `new` tokens after `prompt`, autoregressively or speculatively with `draft`.
#[allow(clippy::too_many_arguments)]
fn run(
    config: &ModelConfig,
    params: &ModelParams<Tensor<f32>>,
    prompt: &[u32],
    new: usize,
    sampling: &SamplingConfig,
    seed: u64,
    speculative: bool,
    draft: Draft,
) -> Generation {
    let request = DecodeRequest { prompt, max_new_tokens: new, sampling, seed, progress: &mut |_| {}, stop_at: None, draft };
    decode(config, params, request, speculative).unwrap()
}

/// A model trained for a few seconds on a noisy periodic stream, so drafts are often right.
fn trained_model(n: usize, r: usize) -> (ModelConfig, ModelParams<Tensor<f32>>) {
    let config = config(n, r, 24, 32);
    let mut rng = Rng::new(5);
    let mut params = gpt2::init_params::<f32>(&config, &mut rng);
    let stream: Vec<u32> = (0..4000).map(|i| if rng.below(10) == 0 { rng.below(24) as u32 } else { (i * 7 % 24) as u32 }).collect();
    let refs: Vec<&Tensor<f32>> = params.named().into_iter().map(|(_, t)| t).collect();
    let mut optimizer = AdamW::new(AdamWConfig::default(), &refs);
    for _ in 0..150 {
        let rows: Vec<&[u32]> = (0..8).map(|_| rng.below(stream.len() - 40)).map(|o| &stream[o..o + 24 + n]).collect();
        let batch = Batch::from_rows(&rows, 24, n);
        train_step(&config, &mut params, &mut optimizer, &batch, StepConfig { lr: 3e-3, grad_clip: 1.0, aux_coef: 0.01 }, &|_| true)
            .unwrap();
    }
    (config, params)
}

#[test]
fn greedy_speculative_output_equals_greedy_autoregressive_output() {
    let greedy = SamplingConfig::greedy();
    let mut rng = Rng::new(1);
    let mut accepted_somewhere = false;
    for (n, r) in [(2, 1), (3, 4), (4, 2), (4, 1), (1, 3)] {
        let (config, params) = trained_model(n, r);
        for prompt_length in [1, 2, 5, 17] {
            let prompt: Vec<u32> = (0..prompt_length).map(|_| rng.below(24) as u32).collect();
            let ar = run(&config, &params, &prompt, 40, &greedy, 0, false, Draft::Mixture);
            assert_eq!(ar.forward_passes, 40);
            for draft in [Draft::Mixture, Draft::TopComponent] {
                let spec = run(&config, &params, &prompt, 40, &greedy, 0, true, draft);
                assert_eq!(ar.tokens, spec.tokens, "n={n} r={r} {draft:?} prompt {prompt:?}");
                assert!(spec.forward_passes <= 40 && spec.mean_accepted() <= n as f64);
                accepted_somewhere |= spec.accepted.iter().sum::<usize>() > 0;
                println!(
                    "n={n} r={r} {draft:?} draft, prompt of {prompt_length}: mean accepted {:.2}, acceptance {:?}",
                    spec.mean_accepted(),
                    spec.acceptance_rates()
                );
            }
        }
    }
    assert!(accepted_somewhere, "no draft was ever accepted: the test would not exercise acceptance");
}

#[test]
fn decoders_agree_with_the_reference_across_the_end_of_the_context() {
    // n_positions 16: 60 new tokens cross several window moves
    let greedy = SamplingConfig::greedy();
    for (n, r) in [(3, 2), (4, 1)] {
        let config = config(n, r, 20, 16);
        let params = gpt2::init_params::<f32>(&config, &mut Rng::new(9));
        for prompt_length in [3, 14, 16, 30] {
            let prompt: Vec<u32> = (0..prompt_length).map(|i| (i * 3 % 20) as u32).collect();
            let reference = generate_reference(&config, &params, &prompt, 60, &greedy, 0).unwrap();
            let ar = run(&config, &params, &prompt, 60, &greedy, 0, false, Draft::Mixture);
            let spec = run(&config, &params, &prompt, 60, &greedy, 0, true, Draft::Mixture);
            assert_eq!(reference.tokens, ar.tokens, "cached autoregressive decoding, prompt of {prompt_length}");
            assert_eq!(reference.tokens, spec.tokens, "speculative decoding, prompt of {prompt_length}");
        }
    }
}

fn sample_pairs(
    config: &ModelConfig,
    params: &ModelParams<Tensor<f32>>,
    prompt: &[u32],
    runs: usize,
    rule: Option<AcceptanceRule>,
    draft: Draft,
) -> Vec<usize> {
    let sampling = SamplingConfig { greedy: false, temperature: 1.0, top_k: 0, top_p: 1.0 };
    let v = config.vocab_size;
    let mut counts = vec![0; v * v];
    for seed in 0..runs as u64 {
        let generation = match rule {
            None => run(config, params, prompt, 3, &sampling, seed, false, draft),
            Some(rule) => {
                let request =
                    DecodeRequest { prompt, max_new_tokens: 3, sampling: &sampling, seed, progress: &mut |_| {}, stop_at: None, draft };
                multitoken::decode::generate::decode_with_rule(config, params, request, true, rule).unwrap()
            }
        };
        counts[generation.tokens[0] as usize * v + generation.tokens[1] as usize] += 1;
    }
    counts
}

#[test]
fn speculative_sampling_is_exact_and_a_wrong_acceptance_rule_is_caught() {
    // a small vocabulary and a peaked random model: 64 cells, drafts often wrong
    let config = config(3, 3, 8, 16);
    let mut params = gpt2::init_params::<f32>(&config, &mut Rng::new(4));
    let mut wte = params.wte.clone();
    wte.data_mut().iter_mut().for_each(|x| *x *= 3.0);
    params.wte = wte;
    let prompt = [1, 5, 2];
    let exact = exact_pair_distribution(&config, &params, &prompt, 1.0);
    assert!((exact.iter().sum::<f64>() - 1.0).abs() < 1e-4);
    let runs = 3000;
    let cases = [
        ("autoregressive", None, Draft::Mixture, true),
        ("speculative", Some(AcceptanceRule::Exact), Draft::Mixture, true),
        ("speculative, top-component draft", Some(AcceptanceRule::Exact), Draft::TopComponent, true),
        ("always-accept", Some(AcceptanceRule::AlwaysAccept), Draft::Mixture, false),
        ("always-accept, top-component draft", Some(AcceptanceRule::AlwaysAccept), Draft::TopComponent, false),
        ("resample-from-target", Some(AcceptanceRule::ResampleFromTarget), Draft::Mixture, false),
    ];
    for (name, rule, draft, must_pass) in cases {
        let counts = sample_pairs(&config, &params, &prompt, runs, rule, draft);
        let (statistic, df) = chi_square(&counts, &exact);
        let critical = critical_value(df);
        println!("{name}: chi-square {statistic:.1} on {df} degrees of freedom, critical value {critical:.1} at 0.001");
        assert_eq!(statistic <= critical, must_pass, "{name}: chi-square {statistic:.1}, critical {critical:.1}");
    }
}

/// The host side of device decoding (one batched request for all draft horizons, every verified
/// state at once) with the CPU head standing in for the device: same tokens as CPU decoding,
/// greedy and sampled, so the GPU path's shared loop is checked here too, where CI runs.
#[test]
fn the_device_branch_of_the_decoding_loop_decodes_like_the_cpu() {
    use multitoken::decode::generate::{decode_loop, HostEngine};
    use multitoken::decode::head::Head;
    use multitoken::decode::kv_cache::CachedBackbone;
    let (config, params) = trained_model(3, 4);
    let cpu_head = Head::new(&config, &params);
    let device_head = Head::with_device(&config, &params, &cpu_head);
    assert!(device_head.on_device() && !cpu_head.on_device());
    let prompt = [3u32, 10, 17];
    let sampled = SamplingConfig { greedy: false, temperature: 0.9, top_k: 0, top_p: 1.0 };
    for sampling in [SamplingConfig::greedy(), sampled] {
        for (speculative, draft) in [(false, Draft::Mixture), (true, Draft::Mixture), (true, Draft::TopComponent)] {
            let mut backbone = CachedBackbone::new(&config, &params);
            let request = DecodeRequest {
                prompt: &prompt,
                max_new_tokens: 40,
                sampling: &sampling,
                seed: 9,
                progress: &mut |_| {},
                stop_at: None,
                draft,
            };
            let mut engine = HostEngine::new(&mut backbone, &device_head, AcceptanceRule::Exact);
            let device = decode_loop(&config, &mut engine, request, speculative).unwrap();
            let cpu = run(&config, &params, &prompt, 40, &sampling, 9, speculative, draft);
            assert_eq!(device.tokens, cpu.tokens, "greedy={} speculative={speculative} {draft:?}", sampling.greedy);
        }
    }
}

/// Several requests decoded as one batch: each sequence gets the tokens it gets alone, greedy
/// and sampled, autoregressive and speculative, with prompts of different lengths, different
/// token counts (none too), a stop token, and sequences that run past the end of the context
/// (their windows move at different steps). Five sequences of n = 4 stack up to 20 rows, more
/// than a team of threads takes: on the pool, on a single thread, and with the head behind the
/// device interface, the same tokens.
#[test]
fn a_batch_decodes_each_sequence_as_it_decodes_alone() {
    use multitoken::decode::generate::{decode_batch, decode_batch_on};
    use multitoken::decode::head::Head;
    use multitoken::decode::kv_cache::CachedBackbone;
    let (config, params) = trained_model(4, 2);
    let long: Vec<u32> = (0..27).map(|i| (i * 5 % 24) as u32).collect();
    let prompts: [&[u32]; 6] = [&[3], &[3, 10, 17, 0, 7], &[5; 20], &long, &[8, 9], &[4]];
    let new_tokens = [40, 7, 30, 50, 33, 0];
    let sampled = SamplingConfig { greedy: false, temperature: 1.0, top_k: 0, top_p: 1.0 };
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let mut accepted_somewhere = false;
    for sampling in [SamplingConfig::greedy(), sampled] {
        for (speculative, draft) in [(false, Draft::Mixture), (true, Draft::Mixture), (true, Draft::TopComponent)] {
            // each sequence alone: its tokens and what it reported as it went
            let alone = |i: usize, stop_at: Option<u32>| {
                let mut seen = Vec::new();
                let request = DecodeRequest {
                    prompt: prompts[i],
                    max_new_tokens: new_tokens[i],
                    sampling: &sampling,
                    seed: 11 + i as u64,
                    progress: &mut |done| seen.push(done),
                    stop_at,
                    draft,
                };
                (decode(&config, &params, request, speculative).unwrap(), seen)
            };
            // sequence 2 stops at the sixth token it makes without a stop, or sooner
            let stop = alone(2, None).0.tokens[5];
            let stops = [None, None, Some(stop), None, None, None];
            let singles: Vec<(Generation, Vec<usize>)> = (0..prompts.len()).map(|i| alone(i, stops[i])).collect();
            // `on_device`: the backbone and the head behind the device interfaces, as a GPU's are
            // driven (the CPU's products as the stand-in)
            let together = |on_device: bool| {
                let mut progress: Vec<Vec<usize>> = vec![Vec::new(); prompts.len()];
                let mut callbacks: Vec<_> = progress.iter_mut().map(|seen| move |done| seen.push(done)).collect();
                let requests = callbacks
                    .iter_mut()
                    .enumerate()
                    .map(|(i, callback)| DecodeRequest {
                        prompt: prompts[i],
                        max_new_tokens: new_tokens[i],
                        sampling: &sampling,
                        seed: 11 + i as u64,
                        progress: callback,
                        stop_at: stops[i],
                        draft,
                    })
                    .collect();
                let generations = if on_device {
                    let (cpu_head, mut backbone) = (Head::new(&config, &params), CachedBackbone::with_sequences(&config, &params, 6));
                    let head = Head::with_device(&config, &params, &cpu_head);
                    decode_batch_on(&config, &mut backbone, &head, requests, speculative, AcceptanceRule::Exact).unwrap()
                } else {
                    decode_batch(&config, &params, requests, speculative, AcceptanceRule::Exact).unwrap()
                };
                drop(callbacks);
                (generations, progress)
            };
            let runs = [
                ("the pool", together(false)),
                ("one thread", one_thread.install(|| together(false))),
                ("a device's head", together(true)),
            ];
            for (pool, (batched, progress)) in runs {
                for (i, ((generation, seen), (single, seen_alone))) in batched.iter().zip(&progress).zip(&singles).enumerate() {
                    let case = format!("{pool}, sequence {i}, greedy={} speculative={speculative} {draft:?}", sampling.greedy);
                    assert_eq!(generation.tokens, single.tokens, "{case}");
                    assert_eq!((generation.forward_passes, &generation.accepted), (single.forward_passes, &single.accepted), "{case}");
                    assert_eq!(seen, seen_alone, "{case}: its progress as it went");
                    accepted_somewhere |= generation.accepted.iter().sum::<usize>() > 0;
                }
                assert!(batched[2].tokens.len() <= 6 && batched[2].tokens.last() == Some(&stop), "the stop token ends its sequence");
                assert_eq!((batched[3].tokens.len(), batched[5].tokens.len()), (50, 0), "the others run on; none asked, none made");
            }
        }
    }
    assert!(accepted_somewhere, "the trained model should draft some tokens right");
}
