//! A character-level language model from the general ops alone, in a few dozen lines: each
//! character is predicted from the three before it (an MLP over their embeddings, as in Bengio
//! et al. 2003), trained with AdamW, then sampled.
//!
//! `cargo run --release --example char_model [-- TEXT_FILE] [--quick]`: trains on the file given,
//! else on Moby-Dick when `scripts/fetch-data.sh` has fetched it, else on a paragraph of it
//! built in.
//!
//! Read it beside docs/tour.md, stop 4: an embedding is a one-hot matrix product, a batch of
//! contexts is one tensor, and the model is eight ops.

use multitoken::autograd::{Tape, Var};
use multitoken::error::Result;
use multitoken::ops;
use multitoken::tensor::{Rng, Tensor};
use multitoken::train::adamw::{AdamW, AdamWConfig};

const CONTEXT: usize = 3;
const BUILT_IN: &str = "Call me Ishmael. Some years ago--never mind how long precisely--having little or no money in my purse, \
and nothing particular to interest me on shore, I thought I would sail about a little and see the watery part of the world. \
It is a way I have of driving off the spleen and regulating the circulation. Whenever I find myself growing grim about the \
mouth; whenever it is a damp, drizzly November in my soul; whenever I find myself involuntarily pausing before coffin \
warehouses, and bringing up the rear of every funeral I meet; and especially whenever my hypos get such an upper hand of me, \
that it requires a strong moral principle to prevent me from deliberately stepping into the street, and methodically \
knocking people's hats off--then, I account it high time to get to sea as soon as I can.";

/// One-hot rows (ids.len(), v).
fn one_hot(ids: &[usize], v: usize) -> Tensor<f32> {
    let mut data = vec![0.0; ids.len() * v];
    ids.iter().enumerate().for_each(|(row, &id)| data[row * v + id] = 1.0);
    Tensor::from_vec(&[ids.len(), v], data)
}

/// The model's log-probabilities of the next character, (N, V), for contexts (N·CONTEXT ids):
/// embeddings E (V, D) by a one-hot product, their concatenation through W1 (CONTEXT·D, H), b1,
/// tanh, W2 (H, V), b2.
fn log_probs(tape: &mut Tape<f32>, p: &[Var], contexts: &[usize], v: usize) -> Result<Var> {
    let n = contexts.len() / CONTEXT;
    let d = tape.value(p[0]).shape()[1];
    let x = tape.leaf(one_hot(contexts, v), false);
    let embedded = ops::matmul(tape, x, p[0])?; // (N·CONTEXT, D)
    let joined = ops::reshape(tape, embedded, &[n, CONTEXT * d])?;
    let hidden = ops::matmul(tape, joined, p[1])?;
    let hidden = ops::add(tape, hidden, p[2])?;
    let hidden = ops::tanh(tape, hidden)?;
    let logits = ops::matmul(tape, hidden, p[3])?;
    let logits = ops::add(tape, logits, p[4])?;
    ops::log_softmax(tape, logits)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let path = args.iter().find(|a| !a.starts_with("--")).cloned().unwrap_or_else(|| "data/corpora/moby-dick.txt".into());
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text.chars().take(200_000).collect(),
        Err(_) => BUILT_IN.to_string(),
    };
    let mut alphabet: Vec<char> = text.chars().collect();
    alphabet.sort_unstable();
    alphabet.dedup();
    let v = alphabet.len();
    let ids: Vec<usize> = text.chars().map(|c| alphabet.binary_search(&c).expect("from the text")).collect();
    println!("{} characters, {v} distinct", ids.len());

    let (d, h) = (16, 128);
    let mut rng = Rng::new(1);
    let mut params = [
        Tensor::randn(&[v, d], 1.0, &mut rng),
        Tensor::randn(&[CONTEXT * d, h], (1.0 / (CONTEXT * d) as f64).sqrt(), &mut rng),
        Tensor::zeros(&[h]),
        Tensor::randn(&[h, v], 0.01, &mut rng),
        Tensor::zeros(&[v]),
    ];
    let refs: Vec<&Tensor<f32>> = params.iter().collect();
    let mut optimizer = AdamW::new(AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() }, &refs);
    let (steps, batch) = (if quick { 30 } else { 1500 }, 128);
    for step in 0..=steps {
        // a batch of random positions t: the context ids[t−3..t], the target ids[t]
        let positions: Vec<usize> = (0..batch).map(|_| CONTEXT + rng.below(ids.len() - CONTEXT)).collect();
        let contexts: Vec<usize> = positions.iter().flat_map(|&t| ids[t - CONTEXT..t].iter().copied()).collect();
        let targets: Vec<usize> = positions.iter().map(|&t| ids[t]).collect();
        let mut tape = Tape::new();
        let p: Vec<Var> = params.iter().map(|t| tape.leaf(t.clone(), true)).collect();
        let log_p = log_probs(&mut tape, &p, &contexts, v)?;
        // the mean negative log-likelihood of the targets
        let y = tape.leaf(one_hot(&targets, v), false);
        let picked = ops::mul(&mut tape, log_p, y)?;
        let total = ops::sum(&mut tape, picked)?;
        let loss = ops::scale(&mut tape, total, -1.0 / batch as f64)?;
        if step % (steps / 6).max(1) == 0 {
            println!("step {step:>5}: loss {:.3} nats per character (uniform: {:.3})", tape.value(loss).item(), (v as f64).ln());
        }
        let mut grads = tape.backward(loss)?;
        let grads: Vec<Option<Tensor<f32>>> = p.iter().map(|&var| grads.take(var)).collect();
        let grad_refs: Vec<Option<&Tensor<f32>>> = grads.iter().map(Option::as_ref).collect();
        optimizer.step(&mut params.iter_mut().collect::<Vec<_>>(), &grad_refs, 3e-3, 1.0)?;
    }

    // sampling: the model's distribution over the next character, one at a time
    let mut generated: Vec<usize> = ids[..CONTEXT].to_vec();
    for _ in 0..(if quick { 40 } else { 300 }) {
        let mut tape = Tape::inference();
        let p: Vec<Var> = params.iter().map(|t| tape.leaf(t.clone(), false)).collect();
        let log_p = log_probs(&mut tape, &p, &generated[generated.len() - CONTEXT..], v)?;
        let (u, mut total) = (rng.uniform(), 0.0);
        let next = tape.value(log_p).data().iter().position(|&l| {
            total += (l as f64).exp();
            total > u
        });
        generated.push(next.unwrap_or(v - 1));
    }
    println!("sampled: {}", generated.iter().map(|&i| alphabet[i]).collect::<String>());
    Ok(())
}
