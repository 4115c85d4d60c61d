//! multitoken: a tensor crate with reverse-mode autograd, a GPT-2 with the rank-r CP
//! multi-token head (arXiv 2410.17765), and self-speculative decoding.
//!
//! Modules in reading order:
pub mod tensor; // Tensor<T>: shape + contiguous storage; the Float trait; a seeded Rng
pub mod kernels; // CPU inner loops: GEMM, and SIMD loops with scalar references
pub mod autograd; // the tape, Var handles, backward, the gradient store
pub mod ops; // differentiable ops, forward and backward side by side
pub mod gradcheck; // central finite differences in f64
