//! Decoding: choosing tokens and generating text.

pub mod generate;
pub mod sampling;

pub use generate::{generate, Generation};
pub use sampling::SamplingConfig;
