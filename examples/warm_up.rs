//! The warm-up: a small tanh MLP learns to tell two interleaved half-moons apart, with the tape
//! and plain gradient descent, as in micrograd — but on tensors, a whole batch at a time.
//!
//! `cargo run --release --example warm_up` (add `-- --quick` for a few steps only)
//!
//! Read it beside docs/tour.md, stop 1: leaves, ops, `backward`, and an update by hand.

use multitoken::autograd::{Tape, Var};
use multitoken::error::Result;
use multitoken::ops;
use multitoken::tensor::{Rng, Tensor};

/// `n` points of two half-moons, as (points (n, 2), one-hot classes (n, 2)).
fn moons(n: usize, rng: &mut Rng) -> (Tensor<f64>, Tensor<f64>) {
    let (mut points, mut onehot) = (Vec::new(), Vec::new());
    for i in 0..n {
        let class = i % 2;
        let angle = std::f64::consts::PI * rng.uniform();
        let (x, y) = if class == 0 { (angle.cos(), angle.sin()) } else { (1.0 - angle.cos(), 0.5 - angle.sin()) };
        points.extend([x + 0.1 * rng.normal(), y + 0.1 * rng.normal()]);
        onehot.extend(if class == 0 { [1.0, 0.0] } else { [0.0, 1.0] });
    }
    (Tensor::from_vec(&[n, 2], points), Tensor::from_vec(&[n, 2], onehot))
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let mut rng = Rng::new(0);
    let n = 200;
    let (points, onehot) = moons(n, &mut rng);
    // the MLP's parameters: W1 (2, 16), b1 (16), W2 (16, 2), b2 (2)
    let mut params =
        [Tensor::randn(&[2, 16], 1.0, &mut rng), Tensor::zeros(&[16]), Tensor::randn(&[16, 2], 0.3, &mut rng), Tensor::zeros(&[2])];
    let (steps, lr) = (if quick { 40 } else { 400 }, 0.5);
    for step in 0..=steps {
        // a fresh tape each step: the data as constants, the parameters as leaves that want gradients
        let mut tape = Tape::new();
        let (x, y) = (tape.leaf(points.clone(), false), tape.leaf(onehot.clone(), false));
        let p: Vec<Var> = params.iter().map(|t| tape.leaf(t.clone(), true)).collect();
        // h = tanh(x W1 + b1), logits = h W2 + b2: the bias rows broadcast over the n points
        let h = ops::matmul(&mut tape, x, p[0])?;
        let h = ops::add(&mut tape, h, p[1])?;
        let h = ops::tanh(&mut tape, h)?;
        let logits = ops::matmul(&mut tape, h, p[2])?;
        let logits = ops::add(&mut tape, logits, p[3])?;
        // the mean negative log-likelihood of each point's class: −Σ log_softmax ⊙ onehot / n
        let log_p = ops::log_softmax(&mut tape, logits)?;
        let picked = ops::mul(&mut tape, log_p, y)?;
        let total = ops::sum(&mut tape, picked)?;
        let loss = ops::scale(&mut tape, total, -1.0 / n as f64)?;
        if step % (steps / 8).max(1) == 0 {
            let scores = tape.value(logits).data();
            let right = scores.chunks(2).zip(onehot.data().chunks(2)).filter(|(s, y)| (s[1] > s[0]) == (y[1] > y[0])).count();
            println!("step {step:>4}: loss {:.4}, accuracy {:.1} %", tape.value(loss).item(), 100.0 * right as f64 / n as f64);
        }
        // gradients of the loss with respect to every leaf that wanted one; then a step downhill
        let grads = tape.backward(loss)?;
        for (param, var) in params.iter_mut().zip(&p) {
            let grad = grads.get(*var).expect("every parameter is used");
            param.data_mut().iter_mut().zip(grad.data()).for_each(|(w, g)| *w -= lr * g);
        }
    }
    Ok(())
}
