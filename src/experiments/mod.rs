//! Experiments that check the model against something known.

pub mod ground_truth;
