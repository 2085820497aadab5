//! CPU matrix products with GGML-quantized weights: `y = x · Wᵀ` for a weight `W` of
//! shape (out, in) stored in GGUF blocks and f32 activations `x` of shape (m, in).
//!
//! candle 0.11 runs these row by row, and for Q4_1 with a scalar dot product, so batch-1
//! decode is far from the memory-bandwidth limit and batches barely scale. This module
//! follows llama.cpp's ggml-cpu instead:
//!
//! 1. each activation row is quantized once to 8-bit blocks (`Q8Block`, ggml's Q8_1, for
//!    the 32-value types; `Q8KBlock`, ggml's Q8_K, for the K-quants);
//! 2. the 32-value types (Q4_1, Q5_0, Q8_0) are repacked at load, 16 output columns side
//!    by side ([`PackedWeight`]), for a GEMM microkernel: a register tile of up to 4
//!    activation rows × 32 columns, one `vpdpbusd` per 4 values × 16 columns, so a weight
//!    load serves every row of the tile and no horizontal sums are left;
//! 3. the K-quants (Q4_K, Q6_K) stay in their blocks: a weight row is decoded once and
//!    dotted against a tile of up to `TILE` activation rows with integer multiply-adds;
//! 4. threads split the output columns; weights are prefetched ahead.
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
//!   [`forward`], [`supports`], [`disabled_by_env`]), the choice of kernel by weight type
//!   and instruction set (`WeightType`, `Isa`, `matmul`) and the `Kernel` trait that ties
//!   each K-quant to its block format, activation quantization and kernels;
//! - `packed`: the repacked layout of the 32-value types, its activation blocks and its
//!   scalar kernel; `packed_x86`: its AVX2, AVX-VNNI and AVX-512 microkernels;
//! - `quant`: the GGUF block formats: sizes and field decoding, and the K-quants'
//!   activation blocks;
//! - `driver`: one product: quantizes the activations, splits the columns among threads,
//!   tiles the rows and calls a weight type's kernels;
//! - `scalar`: the portable scalar kernels of the K-quants, the reference;
//! - `x86`: the K-quants' AVX2 and AVX-VNNI kernels;
//! - `tests`: unit tests that compare the levels with each other, with candle and with the
//!   f32 product, and check determinism across batches; `timing`: ignored timing runs.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use driver::run;
pub(crate) use packed::PackedWeight;
use quant::{quantize_q8k, Q8KBlock, QK_K};

mod driver;
mod packed;
mod packed_k;
#[cfg(target_arch = "x86_64")]
mod packed_k_x86;
#[cfg(target_arch = "x86_64")]
mod packed_x86;
mod quant;
mod scalar;
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

/// Whether [`forward`] handles this weight: a 2-D CPU tensor of a type with a kernel here.
pub fn supports(w: &QTensor) -> bool {
    let Ok((_, k)) = w.shape().dims2() else {
        return false;
    };
    matches!(w.device(), Device::Cpu)
        && WeightType::of(w.dtype()).is_some_and(|t| k > 0 && k.is_multiple_of(t.block_elems()))
}

/// `x · Wᵀ` for `x` of shape (…, in) in any float dtype; the result has x's dtype and
/// shape (…, out). Fails on a weight that [`supports`] rejects.
pub fn forward(w: &QTensor, x: &Tensor) -> Result<Tensor> {
    let (n, k) = w.shape().dims2()?;
    let ty = WeightType::of(w.dtype())
        .filter(|_| supports(w))
        .ok_or_else(|| Error::InvalidArgument(format!("no CPU kernel for {w:?}")))?;
    let data = w.data()?;
    apply(x, n, k, |xs, m| {
        matmul(ty, Isa::detect(), &data, n, k, xs, m)
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
        let xs = input_rows(x, k)?;
        let ys = driver::run_packed_many(Isa::detect(), ws, &xs, x.elem_count() / k)?;
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
    let xs = input_rows(x, k)?;
    let y = product(&xs, x.elem_count() / k)?;
    output(x, n, y)
}

/// x of shape (…, k) as f32 rows of k values.
fn input_rows(x: &Tensor, k: usize) -> Result<Vec<f32>> {
    if x.dims().last() != Some(&k) {
        return Err(Error::InvalidArgument(format!(
            "qmatmul: input {:?} does not end in {k} (the weight's input width)",
            x.dims(),
        )));
    }
    Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
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

/// The weight block formats with kernels on their GGUF blocks (the 32-value types are
/// repacked: [`PackedWeight`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WeightType {
    Q4K,
    Q6K,
}

impl WeightType {
    fn of(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    fn block_elems(self) -> usize {
        match self {
            Self::Q4K | Self::Q6K => QK_K,
        }
    }
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

/// `y = x · Wᵀ` on raw GGUF blocks: `w` holds n rows of k values, `x` m rows of k values;
/// returns y as m rows of n values.
fn matmul(
    ty: WeightType,
    isa: Isa,
    w: &[u8],
    n: usize,
    k: usize,
    x: &[f32],
    m: usize,
) -> Result<Vec<f32>> {
    match ty {
        WeightType::Q4K => run::<Q4K>(isa, w, n, k, x, m),
        WeightType::Q6K => run::<Q6K>(isa, w, n, k, x, m),
    }
}

// ---------------------------------------------------------------------------------------
// Kernels: one implementation of this trait per weight type
// ---------------------------------------------------------------------------------------

/// A weight type's block format and its kernels, as the driver uses them.
trait Kernel {
    /// The activation block this weight type is dotted with, and its number of values.
    type Act: Copy + Send + Sync;
    const ACT_ELEMS: usize;
    /// An activation block of zeros (what the driver allocates before quantizing).
    const ZERO: Self::Act;
    /// Values and bytes per weight block.
    const ELEMS: usize;
    const BYTES: usize;
    /// Up to ACT_ELEMS values (a row's last block may be short: zeros fill it).
    fn quantize(x: &[f32]) -> Self::Act;
    /// Reference dot product of one weight row (its blocks) with one activation row.
    fn dot_scalar(w: &[u8], a: &[Self::Act]) -> f32;
    /// W weight rows against R activation rows, with AVX2.
    #[cfg(target_arch = "x86_64")]
    fn dot_x86<const W: usize, const R: usize>(
        s: x86::Simd,
        w: [&[u8]; W],
        a: [&[Self::Act]; R],
    ) -> [[f32; R]; W];
}

struct Q4K;
struct Q6K;

impl Kernel for Q4K {
    type Act = Q8KBlock;
    const ACT_ELEMS: usize = QK_K;
    const ZERO: Q8KBlock = Q8KBlock::ZERO;
    const ELEMS: usize = QK_K;
    const BYTES: usize = quant::Q4K_BYTES;
    fn quantize(x: &[f32]) -> Q8KBlock {
        quantize_q8k(x)
    }
    fn dot_scalar(w: &[u8], a: &[Q8KBlock]) -> f32 {
        scalar::q4k(w, a)
    }
    #[cfg(target_arch = "x86_64")]
    fn dot_x86<const W: usize, const R: usize>(
        s: x86::Simd,
        w: [&[u8]; W],
        a: [&[Q8KBlock]; R],
    ) -> [[f32; R]; W] {
        x86::q4k(s, w, a)
    }
}

impl Kernel for Q6K {
    type Act = Q8KBlock;
    const ACT_ELEMS: usize = QK_K;
    const ZERO: Q8KBlock = Q8KBlock::ZERO;
    const ELEMS: usize = QK_K;
    const BYTES: usize = quant::Q6K_BYTES;
    fn quantize(x: &[f32]) -> Q8KBlock {
        quantize_q8k(x)
    }
    fn dot_scalar(w: &[u8], a: &[Q8KBlock]) -> f32 {
        scalar::q6k(w, a)
    }
    #[cfg(target_arch = "x86_64")]
    fn dot_x86<const W: usize, const R: usize>(
        s: x86::Simd,
        w: [&[u8]; W],
        a: [&[Q8KBlock]; R],
    ) -> [[f32; R]; W] {
        x86::q6k(s, w, a)
    }
}
