//! The linear layers of the transformer: `y = x Wᵀ + b` over a weight kept quantized
//! (GGUF blocks) or dense, with the dense copy the training forward (and big decode
//! batches) run on. LoRA deltas are added by the callers, not here.

use std::sync::{Arc, OnceLock};

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use super::WeightFormat;
use crate::error::Result;
use crate::model::ops;
use crate::model::qmatmul;
use crate::model::weights::Weight;

/// A linear layer `y = x Wᵀ + b` whose weight may be quantized. LoRA is applied by the
/// caller, which knows the layer index and the adapter of each row.
pub(super) struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// Dense copy for the training forward, made on first use.
    dense: OnceLock<Tensor>,
    dtype: DType,
}

enum LinearWeight {
    /// On the CPU, a type our GEMM kernels cover (Q4_1, Q5_0, Q8_0, Q4_K, Q6_K), repacked
    /// for them (the GGUF blocks are not kept).
    Packed(qmatmul::PackedWeight),
    Quantized(Arc<QTensor>, QMatMul),
    Dense(Tensor),
}

impl Linear {
    pub(super) fn new(
        weight: Weight,
        bias: Option<Tensor>,
        format: WeightFormat,
        dtype: DType,
    ) -> Result<Self> {
        let device = match &weight {
            Weight::Quantized(q) => q.device(),
            Weight::Dense(t) => t.device().clone(),
        };
        let weight = match (weight, format) {
            (Weight::Quantized(q), WeightFormat::Quantized) => {
                let packed = match q.device() {
                    candle_core::Device::Cpu if !qmatmul::disabled_by_env() => {
                        qmatmul::PackedWeight::new(&q)?
                    }
                    _ => None,
                };
                match packed {
                    Some(p) => LinearWeight::Packed(p),
                    None => LinearWeight::Quantized(q.clone(), QMatMul::from_arc(q)?),
                }
            }
            (w, _) => LinearWeight::Dense(w.to_dense(dtype, &device)?),
        };
        let bias = bias.map(|b| b.to_dtype(dtype)).transpose()?;
        Ok(Self {
            weight,
            bias,
            dense: OnceLock::new(),
            dtype,
        })
    }

    /// Inference forward for x of shape (rows, in). With `dense_rows` set, inputs of at
    /// least that many rows run on the dense copy of a quantized weight (a real GEMM)
    /// instead of the row-by-row quantized kernels.
    pub fn forward(&self, x: &Tensor, dense_rows: Option<usize>) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Quantized(..) | LinearWeight::Packed(_) if runs_dense(x, dense_rows) => {
                x.matmul(&self.dense_weight()?.t()?)?
            }
            // Our CPU kernels (batched, SIMD chosen at run time) where they cover the
            // weight type; candle's QMatMul elsewhere, or when VERITY_CANDLE_QMATMUL=1.
            LinearWeight::Packed(p) => p.forward(x)?,
            LinearWeight::Quantized(_, qm) => qm.forward(x)?,
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
        };
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// [`Self::forward`] of several layers on one input (q, k, v; gate, up): on repacked
    /// weights the input is quantized once and one parallel call runs them all.
    pub fn forward_many<const N: usize>(
        layers: [&Self; N],
        x: &Tensor,
        dense_rows: Option<usize>,
    ) -> Result<[Tensor; N]> {
        let dense = runs_dense(x, dense_rows);
        let packed: Vec<&qmatmul::PackedWeight> = layers
            .iter()
            .filter_map(|l| match &l.weight {
                LinearWeight::Packed(p) => Some(p),
                _ => None,
            })
            .collect();
        if dense || packed.len() < N {
            return layers
                .iter()
                .map(|l| l.forward(x, dense_rows))
                .collect::<Result<Vec<_>>>()
                .map(|ys| ys.try_into().expect("N results"));
        }
        let ys = qmatmul::PackedWeight::forward_many(&packed, x)?;
        let ys = layers
            .iter()
            .zip(ys)
            .map(|(l, y)| match &l.bias {
                Some(b) => Ok(y.broadcast_add(b)?),
                None => Ok(y),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ys.try_into().expect("N results"))
    }

    /// The weight as a dense (out, in) tensor; quantized weights are dequantized once.
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Quantized(..) | LinearWeight::Packed(_) => {
                if let Some(w) = self.dense.get() {
                    return Ok(w.clone());
                }
                let w = match &self.weight {
                    LinearWeight::Quantized(q, _) => q.dequantize(&q.device())?,
                    LinearWeight::Packed(p) => p.dequantize_tensor()?,
                    LinearWeight::Dense(w) => w.clone(),
                };
                let w = w.to_dtype(self.dtype)?;
                Ok(self.dense.get_or_init(|| w).clone())
            }
        }
    }

    /// Training forward: dense and differentiable w.r.t. x (the weight is frozen).
    pub fn forward_train(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::frozen_linear(x, &self.dense_weight()?)?;
        match &self.bias {
            Some(b) => Ok(y.broadcast_add(b)?),
            None => Ok(y),
        }
    }

    /// Storage type name ("q4_1", "f32", …).
    pub fn type_name(&self) -> String {
        match &self.weight {
            LinearWeight::Packed(p) => format!("{:?}", p.dtype()).to_lowercase(),
            LinearWeight::Quantized(q, _) => format!("{:?}", q.dtype()).to_lowercase(),
            LinearWeight::Dense(w) => format!("{:?}", w.dtype()).to_lowercase(),
        }
    }

    /// Bytes read per use of the weight (what bounds batch-1 decode).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Packed(p) => p.size_in_bytes(),
            LinearWeight::Quantized(q, _) => q.storage_size_in_bytes(),
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
        }
    }
}

/// Whether an input of x's rows runs on the dense copy of a quantized weight
/// (`Transformer::set_dense_rows`).
fn runs_dense(x: &Tensor, dense_rows: Option<usize>) -> bool {
    dense_rows.is_some_and(|n| x.dim(0).unwrap_or(0) >= n)
}
