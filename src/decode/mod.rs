//! Decoding: the KV cache, the head's distributions, sampling, and generation — plain,
//! autoregressive with a cache, and self-speculative (docs/decoding.md).

pub mod context;
pub mod cuda;
pub mod generate;
pub mod head;
pub mod kv_cache;
pub mod pass;
pub mod sampling;

pub use generate::{decode, generate_reference, DecodeRequest, Draft, Generation};
pub use sampling::SamplingConfig;
