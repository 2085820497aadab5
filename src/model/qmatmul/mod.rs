//! CPU matrix products with GGML-quantized weights: `y = x · Wᵀ` for a weight `W` of
//! shape (out, in) stored in GGUF blocks and f32 activations `x` of shape (m, in).
//!
//! candle 0.11 runs these row by row, and for Q4_1 with a scalar dot product, so batch-1
//! decode is far from the memory-bandwidth limit and batches barely scale. This module
//! follows llama.cpp's ggml-cpu instead:
//!
//! 1. each activation row is quantized once to 8-bit blocks (`Q8Block`, ggml's Q8_1, for
//!    the 32-value types; `Q8KBlock`, ggml's Q8_K, for the K-quants);
//! 2. the weights are repacked at load, 16 output columns side by side ([`PackedWeight`]),
//!    for a GEMM microkernel: a register tile of up to 4 activation rows × 32 columns, one
//!    `vpdpbusd` per 4 values × 16 columns, so a weight load serves every row of the tile
//!    and no horizontal sums are left. The 32-value types (Q4_1, Q5_0, Q8_0) one block per
//!    tile (`packed`); the K-quants (Q4_K, Q6_K) one 256-value super-block per tile, with
//!    integer sub-block scales (`packed_k`);
//! 3. threads split the output columns (of several weights on one input at once: q, k, v;
//!    gate, up); weights are prefetched ahead.
//!
//! **Determinism.** Every output element is computed by the same sequence of floating-point
//! operations whatever `m` is, whichever tile it falls in and however the columns are split
//! among threads: integer parts are exact, and the f32 accumulation of one (row, column)
//! pair never mixes with another pair's. So a sequence's logits do not depend on what else
//! is in its batch. For repacked weights every instruction-set level gives the same bits.
//!
//! The scalar kernels are the reference and the path on non-x86 machines; the x86 kernels
//! (AVX2, AVX-VNNI, AVX-512 VNNI) are chosen at run time (`is_x86_feature_detected!`).
//! Weight types without a kernel here stay on candle's `QMatMul`.
//!
//! Layout:
//!
//! - this file: the entry points other modules use ([`PackedWeight::forward`],
//!   [`PackedWeight::forward_many`], [`disabled_by_env`]) and the instruction set (`Isa`);
//! - `packed`: the repacked layout of the 32-value types, its activation blocks and its
//!   scalar kernel; `packed_x86`: its AVX2, AVX-VNNI and AVX-512 microkernels;
//! - `packed_k` and `packed_k_x86`: the same for the K-quants;
//! - `quant`: the GGUF block formats (sizes and field decoding) and the K-quants'
//!   activation blocks;
//! - `driver`: one product: quantizes the activations, splits the columns among threads,
//!   tiles the rows and calls a weight type's kernels;
//! - `x86`: the detected instruction-set level;
//! - `tests`: unit tests that compare the levels with each other, with candle and with the
//!   f32 product, and check determinism across batches; `timing`: ignored timing runs.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
pub(crate) use packed::PackedWeight;

mod driver;
mod packed;
mod packed_k;
#[cfg(target_arch = "x86_64")]
mod packed_k_x86;
#[cfg(target_arch = "x86_64")]
mod packed_x86;
mod quant;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod timing;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Whether `VERITY_CANDLE_QMATMUL=1` asks for candle's quantized matmul instead (A/B runs).
pub fn disabled_by_env() -> bool {
    static DISABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DISABLED.get_or_init(|| {
        std::env::var("VERITY_CANDLE_QMATMUL").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

impl PackedWeight {
    /// `x · Wᵀ` for `x` of shape (…, in) in any float dtype; the result has x's dtype
    /// and shape (…, out).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, k) = self.shape();
        apply(x, n, k, |xs, m| {
            driver::run_packed(Isa::detect(), self, xs, m)
        })
    }

    /// `x · W_iᵀ` for several weights of the same input width, as [`Self::forward`] gives
    /// each, with x quantized once and one parallel call for all of them.
    pub(crate) fn forward_many(ws: &[&Self], x: &Tensor) -> Result<Vec<Tensor>> {
        let Some(k) = ws.first().map(|w| w.shape().1) else {
            return Ok(Vec::new());
        };
        // K-quants and the 32-value types quantize the input differently.
        if ws.iter().any(|w| w.ty.is_k() != ws[0].ty.is_k()) {
            return ws.iter().map(|w| w.forward(x)).collect();
        }
        let ys = with_input_rows(x, k, |xs, m| {
            driver::run_packed_many(Isa::detect(), ws, xs, m)
        })?;
        ws.iter()
            .zip(ys)
            .map(|(w, y)| output(x, w.shape().0, y))
            .collect()
    }

    /// The weight as a dense (out, in) f32 tensor.
    pub(crate) fn dequantize_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.dequantize(),
            self.shape(),
            &Device::Cpu,
        )?)
    }
}

/// Runs `product` (m rows of k f32 values in, m rows of n out) on x of shape (…, k),
/// keeping x's leading dimensions and dtype.
fn apply(
    x: &Tensor,
    n: usize,
    k: usize,
    product: impl FnOnce(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let y = with_input_rows(x, k, product)?;
    output(x, n, y)
}

/// Runs `f` on x of shape (…, k) as m f32 rows of k values (borrowed when x is f32 on
/// the CPU, else copied to the host).
fn with_input_rows<R>(
    x: &Tensor,
    k: usize,
    f: impl FnOnce(&[f32], usize) -> Result<R>,
) -> Result<R> {
    if x.dims().last() != Some(&k) {
        return Err(Error::InvalidArgument(format!(
            "qmatmul: input {:?} does not end in {k} (the weight's input width)",
            x.dims(),
        )));
    }
    let m = x.elem_count() / k;
    let x = x.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
    crate::model::cpu_ops::with_cpu_f32(&x, |xs| f(xs, m))?
        .ok_or_else(|| Error::Internal("qmatmul: the input did not reach the host".into()))
}

/// The rows y (n values each) of a product on x, shaped (…, n) in x's dtype.
fn output(x: &Tensor, n: usize, y: Vec<f32>) -> Result<Tensor> {
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    let y = Tensor::from_vec(y, out_dims, &Device::Cpu)?;
    Ok(if x.dtype() == DType::F32 {
        y
    } else {
        y.to_dtype(x.dtype())?
    })
}

/// The instruction set the kernels use, detected once.
#[derive(Debug, Clone, Copy)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    X86(x86::Simd),
}

impl Isa {
    fn detect() -> Self {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if let Some(s) = x86::Simd::detect() {
                return Isa::X86(s);
            }
            Isa::Scalar
        })
    }
}
