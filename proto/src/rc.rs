//! Adaptive binary range coder (placeholder while the codec is written).
