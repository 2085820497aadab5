//! The KV cache of one sequence, as reference-counted segments.
//!
//! A sequence's keys and values are a chain of frozen, shared segments followed by one
//! segment it owns and appends to. Forking a sequence (the N samples of one prompt) freezes
//! what it has into a shared segment and gives each child an empty segment of its own: the
//! prompt is prefilled once and held once, and attention reads the shared segment in place
//! (scores are computed per segment and joined before the softmax, so nothing is copied).
//! We chose segments over fixed-size pages because the sharing we need is "one prompt, many
//! continuations", where a segment is exactly the shared unit and attention stays a few
//! large matrix products instead of a gather over page tables.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};

use crate::error::Result;
use crate::model::cpu_ops::with_cpu_f32;

/// Sizes every segment of one model shares.
#[derive(Debug, Clone)]
pub struct KvGeometry {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    pub device: Device,
}

/// Keys and values of a run of consecutive positions, for every layer.
/// Layout per layer: (capacity, kv_heads, head_dim), token-major so appends are contiguous.
/// Shared segments are frozen; a sequence appends only to its own.
pub struct KvSegment {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// Absolute position of the segment's first token.
    start: usize,
    len: usize,
    capacity: usize,
}

impl KvSegment {
    fn empty(start: usize) -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            start,
            len: 0,
            capacity: 0,
        }
    }

    /// Absolute position (in the sequence) of the segment's first token.
    pub fn start(&self) -> usize {
        self.start
    }
    /// Positions stored in the segment.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the segment stores no position.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keys of `layer` for the stored positions: (len, kv_heads, head_dim), a view.
    pub fn keys(&self, layer: usize) -> Result<Tensor> {
        Ok(self.keys[layer].narrow(0, 0, self.len)?)
    }
    /// Values of `layer` for the stored positions: (len, kv_heads, head_dim), a view.
    pub fn values(&self, layer: usize) -> Result<Tensor> {
        Ok(self.values[layer].narrow(0, 0, self.len)?)
    }

    /// The whole key buffer of `layer`, (capacity, kv_heads, head_dim), for kernels that
    /// address the segment directly.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn key_buffer(&self, layer: usize) -> &Tensor {
        &self.keys[layer]
    }
    /// The whole value buffer of `layer`, as [`Self::key_buffer`].
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn value_buffer(&self, layer: usize) -> &Tensor {
        &self.values[layer]
    }

    /// Keys for stored positions plus `extra` pending ones written by [`Self::write`] in this step.
    pub(crate) fn keys_with_pending(&self, layer: usize, extra: usize) -> Result<Tensor> {
        Ok(self.keys[layer].narrow(0, 0, self.len + extra)?)
    }
    pub(crate) fn values_with_pending(&self, layer: usize, extra: usize) -> Result<Tensor> {
        Ok(self.values[layer].narrow(0, 0, self.len + extra)?)
    }

    fn reserve(&mut self, geometry: &KvGeometry, additional: usize) -> Result<()> {
        let needed = self.len + additional;
        if needed <= self.capacity {
            return Ok(());
        }
        // Grow geometrically so a decode loop reallocates O(log n) times.
        let capacity = needed.max(self.capacity * 2).max(16).next_multiple_of(16);
        let shape = (capacity, geometry.num_kv_heads, geometry.head_dim);
        let mut keys = Vec::with_capacity(geometry.num_layers);
        let mut values = Vec::with_capacity(geometry.num_layers);
        for layer in 0..geometry.num_layers {
            let k = Tensor::zeros(shape, geometry.dtype, &geometry.device)?;
            let v = Tensor::zeros(shape, geometry.dtype, &geometry.device)?;
            if self.len > 0 {
                k.slice_set(&self.keys(layer)?.contiguous()?, 0, 0)?;
                v.slice_set(&self.values(layer)?.contiguous()?, 0, 0)?;
            }
            keys.push(k);
            values.push(v);
        }
        self.keys = keys;
        self.values = values;
        self.capacity = capacity;
        Ok(())
    }

    /// Writes new rows (n, kv_heads, head_dim) after the stored ones; they count once
    /// [`Self::commit`] is called (after every layer has written).
    pub(crate) fn write(&self, layer: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        if self.keys[layer].device().is_cpu() {
            let written =
                with_cpu_f32(k, |k| with_cpu_f32(v, |v| self.write_rows_cpu(layer, k, v)))?;
            if written.flatten().is_some() {
                return Ok(());
            }
        }
        let dtype = self.keys[layer].dtype();
        self.keys[layer].slice_set(&k.to_dtype(dtype)?.contiguous()?, 0, self.len)?;
        self.values[layer].slice_set(&v.to_dtype(dtype)?.contiguous()?, 0, self.len)?;
        Ok(())
    }

    /// Writes new positions' key and value rows (kv_heads·head_dim f32 values each) after
    /// the stored ones, in place, converted to the cache's dtype as candle's `to_dtype`
    /// converts. CPU only: a decode step's few-hundred-byte rows cost less to copy than
    /// the candle ops of a tensor write (several per sequence and layer).
    pub(crate) fn write_rows_cpu(&self, layer: usize, keys: &[f32], values: &[f32]) -> Result<()> {
        let row: usize = self.keys[layer].dims()[1..].iter().product();
        if keys.len() != values.len() || !keys.len().is_multiple_of(row.max(1)) {
            return Err(crate::Error::Internal(format!(
                "KV write of {} key and {} value values in rows of {row}",
                keys.len(),
                values.len()
            )));
        }
        let at = self.len * row;
        self.keys[layer].inplace_op1(&WriteRows { at, values: keys })?;
        self.values[layer].inplace_op1(&WriteRows { at, values })?;
        Ok(())
    }

    fn commit(&mut self, n: usize) {
        self.len += n;
    }
}

/// Copies f32 values into a contiguous CPU buffer at element `at`, converting them to its
/// dtype (round to nearest, as candle's `to_dtype`).
struct WriteRows<'a> {
    at: usize,
    values: &'a [f32],
}

impl InplaceOp1 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "kv-write-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        use half::bf16;
        let start = layout.start_offset() + self.at;
        let n = self.values.len();
        let room = || {
            candle_core::Error::Msg(format!(
                "KV row write of {n} values at {start} past the buffer ({:?})",
                layout.shape()
            ))
        };
        match storage {
            CpuStorage::F32(d) => d
                .get_mut(start..start + n)
                .ok_or_else(room)?
                .copy_from_slice(self.values),
            CpuStorage::F16(d) => {
                to_f16(d.get_mut(start..start + n).ok_or_else(room)?, self.values)
            }
            CpuStorage::BF16(d) => {
                let d = d.get_mut(start..start + n).ok_or_else(room)?;
                d.iter_mut()
                    .zip(self.values)
                    .for_each(|(d, v)| *d = bf16::from_f32(*v));
            }
            other => candle_core::bail!("KV row write into a {:?} cache", other.dtype()),
        }
        Ok(())
    }
}

/// `src` rounded to f16 (to nearest, ties to even) into `dst`: eight at a time with F16C
/// (half's conversions check the CPU for every value or every call, which cost more than
/// a decode step's few-hundred-value rows).
fn to_f16(dst: &mut [half::f16], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") {
        // SAFETY: F16C is there.
        return unsafe { to_f16_f16c(dst, src) };
    }
    dst.iter_mut()
        .zip(src)
        .for_each(|(d, v)| *d = half::f16::from_f32(*v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn to_f16_f16c(dst: &mut [half::f16], src: &[f32]) {
    use std::arch::x86_64::*;
    let n = dst.len().min(src.len());
    let whole = n - n % 8;
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 ≤ n, within both slices.
        unsafe {
            let v = _mm256_loadu_ps(src.as_ptr().add(i));
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(dst.as_mut_ptr().add(i).cast(), h);
        }
    }
    for i in whole..n {
        dst[i] = half::f16::from_f32(src[i]);
    }
}

/// The cache of one sequence: shared frozen segments, then its own.
pub struct SeqKv {
    geometry: Arc<KvGeometry>,
    shared: Vec<Arc<KvSegment>>,
    own: KvSegment,
}

impl SeqKv {
    /// An empty cache; [`Transformer::new_kv`](super::Transformer::new_kv) is the public way.
    pub(crate) fn new(geometry: Arc<KvGeometry>) -> Self {
        Self {
            geometry,
            shared: Vec::new(),
            own: KvSegment::empty(0),
        }
    }

    /// Positions stored (shared and own).
    pub fn len(&self) -> usize {
        self.own.start + self.own.len
    }
    /// True when the cache holds no position.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frozen segments this sequence reads first, oldest first; forks of one parent
    /// hold the same `Arc`s.
    pub fn shared_segments(&self) -> &[Arc<KvSegment>] {
        &self.shared
    }
    /// The segment this sequence appends to, after the shared ones.
    pub fn own_segment(&self) -> &KvSegment {
        &self.own
    }
    /// Positions this sequence holds alone (not shared with a fork).
    pub fn own_len(&self) -> usize {
        self.own.len
    }

    /// Makes room for `additional` positions in the own segment.
    pub fn reserve(&mut self, additional: usize) -> Result<()> {
        let geometry = self.geometry.clone();
        self.own.reserve(&geometry, additional)
    }

    pub(crate) fn commit(&mut self, n: usize) {
        self.own.commit(n)
    }

    /// A new sequence that continues from everything this one holds, sharing it.
    /// This sequence's own positions become a shared frozen segment for both.
    pub fn fork(&mut self) -> Result<SeqKv> {
        self.freeze()?;
        Ok(SeqKv {
            geometry: self.geometry.clone(),
            shared: self.shared.clone(),
            own: KvSegment::empty(self.len()),
        })
    }

    fn freeze(&mut self) -> Result<()> {
        if self.own.len == 0 {
            return Ok(());
        }
        let start = self.len();
        let mut own = std::mem::replace(&mut self.own, KvSegment::empty(start));
        // Frozen segments never grow again: give back the spare capacity.
        if own.capacity > own.len {
            for layer in 0..own.keys.len() {
                let k = own.keys(layer)?.copy()?;
                let v = own.values(layer)?.copy()?;
                own.keys[layer] = k;
                own.values[layer] = v;
            }
            own.capacity = own.len;
        }
        self.shared.push(Arc::new(own));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The F16C conversion rounds as half's `from_f32` does: ties to even, subnormals,
    /// overflow to infinity, the tail past the last eight.
    #[test]
    fn f16_rows_round_as_half_does() {
        let mut src: Vec<f32> = (0..4000).map(|i| (i as f32 - 2000.0) * 0.0137).collect();
        // Exact ties between two f16 values (1 + 2^-11 lies halfway between 1 and
        // 1 + 2^-10), subnormals, the largest finite value and past it.
        src.extend([
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            -(1.0 + 2f32.powi(-11)),
            3.0e-6,
            -5.9e-8,
            1e-9,
            65504.0,
            65520.0,
            1e6,
            -1e6,
            f32::INFINITY,
        ]);
        let mut ours = vec![half::f16::ZERO; src.len()];
        to_f16(&mut ours, &src);
        for (o, v) in ours.iter().zip(&src) {
            assert_eq!(o.to_bits(), half::f16::from_f32(*v).to_bits(), "{v}");
        }
        let mut nan = [half::f16::ZERO; 1];
        to_f16(&mut nan, &[f32::NAN]);
        assert!(nan[0].is_nan());
    }
}
