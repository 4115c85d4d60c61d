#![deny(missing_docs)]
//! multitoken: a tensor crate with reverse-mode autograd, a GPT-2 with the rank-r CP
//! multi-token head (arXiv 2410.17765), and self-speculative decoding.
//!
//! # A first example
//!
//! Leaves go on a [`Tape`](autograd::Tape); every op reads vars from it, computes its output
//! and records how to differentiate it; [`backward`](autograd::Tape::backward) walks the record
//! in reverse and returns the gradient of every leaf that asked for one. Here
//! `loss = mean(tanh(x · w + x))` for an input x (2, 3) and a parameter w (3, 3):
//!
//! ```
//! use multitoken::{autograd::Tape, ops, tensor::Tensor};
//!
//! let mut tape = Tape::<f64>::new();
//! let x = tape.leaf(Tensor::from_vec(&[2, 3], vec![0.5, -1.0, 2.0, 1.5, 0.0, -0.5]), false);
//! let w = tape.leaf(Tensor::from_vec(&[3, 3], vec![0.1, 0.2, 0.0, -0.3, 0.1, 0.4, 0.2, 0.0, -0.1]), true);
//! let xw = ops::matmul(&mut tape, x, w)?; // (2, 3)
//! let z = ops::add(&mut tape, xw, x)?;
//! let y = ops::tanh(&mut tape, z)?;
//! let loss = ops::mean(&mut tape, y)?; // a scalar
//! println!("loss = {}", tape.value(loss).item());
//!
//! let (xs, ys) = (tape.value(x).clone(), tape.value(y).clone());
//! let grads = tape.backward(loss)?; // consumes the tape
//! let dw = grads.get(w).expect("w asked for a gradient");
//! assert_eq!(dw.shape(), &[3, 3]);
//!
//! // by hand: ∂loss/∂w[i,j] = Σ_t x[t,i] · (1 − y[t,j]²) / 6, the 6 from the mean
//! for i in 0..3 {
//!     for j in 0..3 {
//!         let by_hand: f64 = (0..2).map(|t| xs.data()[t * 3 + i] * (1.0 - ys.data()[t * 3 + j].powi(2)) / 6.0).sum();
//!         assert!((dw.data()[i * 3 + j] - by_hand).abs() < 1e-12);
//!     }
//! }
//! # Ok::<(), multitoken::error::Error>(())
//! ```
//!
//! Shapes are written with one legend throughout: B batch, T sequence length, N = B·T rows,
//! C width, H heads, hs = C/H, V vocabulary, n horizon (tokens predicted per position), r rank
//! (mixture components of the head).
//!
//! # Modules
//!
//! In reading order:
//!
//! - [`error`]: the library's error type; a message is one line and says what to do
//! - [`random`]: a seeded random number generator, the same numbers on every platform
//! - [`kernels`]: CPU inner loops: the [`Float`](kernels::Float) trait, GEMM, SIMD loops with
//!   scalar references, the thread team
//! - [`tensor`]: [`Tensor<T>`](tensor::Tensor), a shape and elements on the CPU or a GPU
//! - [`autograd`]: the tape, [`Var`](autograd::Var) handles, backward, the gradient store
//! - [`ops`]: differentiable ops, forward and backward side by side, a kernel per device
//! - [`gradcheck`]: gradient checks by central finite differences in f64
//! - [`data`]: tokenizer, token files, corpus preparation, batches
//! - [`model`]: config, parameters by name, the GPT-2 backbone, the loss
//! - [`device`]: `--device cpu|cuda`, `--precision f32|tf32|bf16`: opening the device
//! - [`train`]: AdamW, the schedule, the training loop, checkpoints
//! - [`distributed`]: several GPUs: the launcher, the rendezvous, the gradient all-reduce
//! - [`decode`]: sampling and generation, on the CPU or a GPU
//! - [`bench`](mod@bench): `multitoken bench`: timed training steps and decoding
//! - [`experiments`]: checks against known ground truth
pub mod error;
pub mod random;
pub mod kernels;
pub mod tensor;
pub mod autograd;
pub mod ops;
pub mod gradcheck;
pub mod data;
pub mod model;
pub mod device;
pub mod train;
pub mod distributed;
pub mod decode;
pub mod bench;
pub mod experiments;
