//! multitoken: a tensor crate with reverse-mode autograd, a GPT-2 with the rank-r CP
//! multi-token head (arXiv 2410.17765), and self-speculative decoding.
//!
//! Modules in reading order:
pub mod error; // the library's error type: one line, says what to do
pub mod random; // a seeded random number generator, the same numbers on every platform
pub mod kernels; // CPU inner loops: the Float trait, GEMM, SIMD loops with scalar references, the thread team
pub mod tensor; // Tensor<T>: a shape and elements on the CPU or a GPU; a seeded Rng
pub mod autograd; // the tape, Var handles, backward, the gradient store
pub mod ops; // differentiable ops, forward and backward side by side, a kernel per device
pub mod gradcheck; // central finite differences in f64
pub mod data; // tokenizer, token files, corpus preparation, batches
pub mod model; // config, parameters by name, GPT-2 backbone, the loss
pub mod device; // --device cpu|cuda, --precision f32|tf32: opening the device
pub mod train; // AdamW, schedule, the training loop, checkpoints
pub mod decode; // sampling and generation, on the CPU or a GPU
pub mod bench; // `multitoken bench`: timed training steps and decoding
pub mod experiments; // checks against known ground truth
