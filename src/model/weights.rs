//! Named weight tensors as a loader hands them to the transformer: quantized (kept in GGUF
//! block format for fast inference) or dense, under Hugging Face names
//! (`model.layers.N.self_attn.q_proj.weight`, …) whatever the file format was.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// One weight as stored: quantized blocks, or a dense tensor.
#[derive(Clone)]
pub enum Weight {
    Quantized(Arc<QTensor>),
    Dense(Tensor),
}

impl Weight {
    pub fn dims(&self) -> &[usize] {
        match self {
            Weight::Quantized(q) => q.shape().dims(),
            Weight::Dense(t) => t.dims(),
        }
    }
    /// A dense copy in `dtype` (dequantizing if needed).
    pub fn to_dense(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = match self {
            Weight::Quantized(q) => q.dequantize(device)?,
            Weight::Dense(t) => t.to_device(device)?,
        };
        Ok(t.to_dtype(dtype)?)
    }
}

/// The weights of one model file or folder, consumed by name while the model is built.
pub struct WeightMap {
    source: PathBuf,
    weights: HashMap<String, Weight>,
}

impl WeightMap {
    pub fn new(source: PathBuf, weights: HashMap<String, Weight>) -> Self {
        Self { source, weights }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains_key(name)
    }

    /// Takes a weight and checks its shape (rows, cols, …) against what the config implies.
    pub fn take(&mut self, name: &str, expected: &[usize]) -> Result<Weight> {
        let w = self.weights.remove(name).ok_or_else(|| {
            Error::weight(name, format!("missing from {}", self.source.display()))
        })?;
        if w.dims() != expected {
            return Err(Error::weight(
                name,
                format!(
                    "shape {:?} contradicts the config, which implies {:?} ({})",
                    w.dims(),
                    expected,
                    self.source.display()
                ),
            ));
        }
        Ok(w)
    }

    pub fn take_optional(&mut self, name: &str, expected: &[usize]) -> Result<Option<Weight>> {
        if self.contains(name) {
            self.take(name, expected).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Names left over once the model is built (reported, not fatal: files carry extras).
    pub fn remaining(&self) -> Vec<String> {
        let mut names: Vec<String> = self.weights.keys().cloned().collect();
        names.sort();
        names
    }
}
