//! The model: configuration, parameters by name, the GPT-2 backbone and the multi-token head.

pub mod config;
pub mod gpt2;
pub mod loss;
pub mod params;

pub use config::ModelConfig;
pub use loss::{model_loss, LossOutput};
pub use params::ModelParams;
