//! multitoken: a tensor crate with reverse-mode autograd, a GPT-2 with the rank-r CP
//! multi-token head (arXiv 2410.17765), and self-speculative decoding.
//!
//! Modules in reading order:
pub mod error; // the library's error type: one line, says what to do
pub mod tensor; // Tensor<T>: shape + contiguous storage; the Float trait; a seeded Rng
pub mod kernels; // CPU inner loops: GEMM, and SIMD loops with scalar references
pub mod autograd; // the tape, Var handles, backward, the gradient store
pub mod ops; // differentiable ops, forward and backward side by side
pub mod gradcheck; // central finite differences in f64
pub mod model; // config, parameters by name, GPT-2 backbone, the loss
pub mod data; // tokenizer, token files, corpus preparation, batches
pub mod device; // --device cpu|cuda, --precision f32|tf32
pub mod train; // AdamW, schedule, the training loop, checkpoints
pub mod decode; // sampling and generation
#[cfg(feature = "cuda")]
pub mod cuda; // the training step on one NVIDIA GPU, written out by hand (llm.c style)
pub mod bench; // `multitoken bench`: timed training steps
pub mod experiments; // checks against known ground truth
