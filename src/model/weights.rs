//! Named weight tensors as a loader hands them to the transformer: quantized (kept in GGUF
//! block format for fast inference) or dense, under Hugging Face names
//! (`model.layers.N.self_attn.q_proj.weight`, …) whatever the file format was.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::quantized::ggml_file::qtensor_from_ggml;
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

    /// Replaces a fused weight (several projections' rows stacked: Phi-3's `qkv_proj` and
    /// `gate_up_proj`) by its parts, `(name, rows)` in order; quantized blocks are split
    /// as bytes (a row is whole blocks), so nothing is dequantized. Nothing happens when
    /// `fused` is absent (a file with the parts stored apart).
    pub fn split_rows(&mut self, fused: &str, parts: &[(String, usize)]) -> Result<()> {
        let Some(w) = self.weights.remove(fused) else {
            return Ok(());
        };
        let dims = w.dims().to_vec();
        let rows: usize = parts.iter().map(|(_, n)| n).sum();
        if dims.len() != 2 || dims[0] != rows {
            return Err(Error::weight(
                fused,
                format!(
                    "shape {dims:?} contradicts the config, which implies {rows} rows in all ({})",
                    self.source.display()
                ),
            ));
        }
        // Row ranges of the parts, in order.
        let ranges = parts.iter().scan(0, |start, (name, n)| {
            let range = (name.clone(), *start, *n);
            *start += n;
            Some(range)
        });
        match &w {
            Weight::Dense(t) => {
                for (name, start, n) in ranges {
                    self.weights
                        .insert(name, Weight::Dense(t.narrow(0, start, n)?));
                }
            }
            Weight::Quantized(q) => {
                // The blocks once (a copy from a device), not once per part.
                let data = q.data()?;
                let row_bytes = data.len() / rows;
                for (name, start, n) in ranges {
                    let bytes = &data[start * row_bytes..(start + n) * row_bytes];
                    let part = qtensor_from_ggml(q.dtype(), bytes, vec![n, dims[1]], &q.device())?;
                    self.weights.insert(name, Weight::Quantized(Arc::new(part)));
                }
            }
        }
        Ok(())
    }

    /// Names left over once the model is built (reported, not fatal: files carry extras).
    pub fn remaining(&self) -> Vec<String> {
        let mut names: Vec<String> = self.weights.keys().cloned().collect();
        names.sort();
        names
    }
}
