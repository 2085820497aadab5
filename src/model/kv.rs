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

impl KvGeometry {
    /// Whether buffers are head-major, (kv_heads, capacity, head_dim), rather than
    /// position-major, (capacity, kv_heads, head_dim). On the CPU a decode step's attention
    /// task reads one head of every position: head-major, that is one run the hardware
    /// prefetcher streams (1.6 against 2.1 µs a task with a cold cache, SmolLM2 at batch
    /// 16). The GPU kernel reads position-major.
    fn head_major(&self) -> bool {
        self.device.is_cpu()
    }
}

/// Keys and values of a run of consecutive positions, for every layer.
/// Layout per layer: (capacity, kv_heads, head_dim), or (kv_heads, capacity, head_dim) where
/// [`KvGeometry::head_major`]. Shared segments are frozen; a sequence appends only to its
/// own.
pub struct KvSegment {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    /// Absolute position of the segment's first token.
    start: usize,
    len: usize,
    capacity: usize,
    head_major: bool,
}

impl KvSegment {
    fn empty(start: usize) -> Self {
        Self {
            keys: Vec::new(),
            values: Vec::new(),
            start,
            len: 0,
            capacity: 0,
            head_major: false,
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
        self.positions(&self.keys[layer], self.len)
    }
    /// Values of `layer` for the stored positions: (len, kv_heads, head_dim), a view.
    pub fn values(&self, layer: usize) -> Result<Tensor> {
        self.positions(&self.values[layer], self.len)
    }

    /// The first `len` positions of a buffer as (len, kv_heads, head_dim), a view.
    fn positions(&self, buffer: &Tensor, len: usize) -> Result<Tensor> {
        if self.head_major {
            Ok(buffer.narrow(1, 0, len)?.transpose(0, 1)?)
        } else {
            Ok(buffer.narrow(0, 0, len)?)
        }
    }

    /// The whole key buffer of `layer` ([`Self::strides`] addresses it), for kernels that
    /// read the segment in place.
    pub(crate) fn key_buffer(&self, layer: usize) -> &Tensor {
        &self.keys[layer]
    }
    /// The whole value buffer of `layer`, as [`Self::key_buffer`].
    pub(crate) fn value_buffer(&self, layer: usize) -> &Tensor {
        &self.values[layer]
    }

    /// Elements between consecutive positions and between consecutive KV heads in a
    /// buffer: (position of the segment, head)'s head_dim values start at
    /// `position · strides.0 + head · strides.1`.
    pub(crate) fn strides(&self) -> (usize, usize) {
        let (kv_heads, head_dim) = self.heads_and_dim();
        if self.head_major {
            (head_dim, self.capacity * head_dim)
        } else {
            (kv_heads * head_dim, head_dim)
        }
    }

    /// (kv_heads, head_dim), read from the buffers' shape; (0, 0) before the first
    /// [`Self::reserve`].
    fn heads_and_dim(&self) -> (usize, usize) {
        match self.keys.first().map(Tensor::dims) {
            Some(&[kv, _, hd]) if self.head_major => (kv, hd),
            Some(&[_, kv, hd]) => (kv, hd),
            _ => (0, 0),
        }
    }

    /// Keys for stored positions plus `extra` pending ones written by [`Self::write`] in this step.
    pub(crate) fn keys_with_pending(&self, layer: usize, extra: usize) -> Result<Tensor> {
        self.positions(&self.keys[layer], self.len + extra)
    }
    pub(crate) fn values_with_pending(&self, layer: usize, extra: usize) -> Result<Tensor> {
        self.positions(&self.values[layer], self.len + extra)
    }

    fn reserve(&mut self, geometry: &KvGeometry, additional: usize) -> Result<()> {
        let needed = self.len + additional;
        if needed <= self.capacity {
            return Ok(());
        }
        // Grow geometrically so a decode loop reallocates O(log n) times.
        let capacity = needed.max(self.capacity * 2).max(16).next_multiple_of(16);
        let head_major = geometry.head_major();
        let (kv, hd) = (geometry.num_kv_heads, geometry.head_dim);
        let (shape, position_dim) = if head_major {
            ((kv, capacity, hd), 1)
        } else {
            ((capacity, kv, hd), 0)
        };
        let mut keys = Vec::with_capacity(geometry.num_layers);
        let mut values = Vec::with_capacity(geometry.num_layers);
        for layer in 0..geometry.num_layers {
            let k = Tensor::zeros(shape, geometry.dtype, &geometry.device)?;
            let v = Tensor::zeros(shape, geometry.dtype, &geometry.device)?;
            if self.len > 0 {
                // The stored rows as (len, kv_heads, head_dim), whatever the old layout,
                // then in the new one.
                let stored = |buffer: &Tensor| -> Result<Tensor> {
                    let rows = self.positions(buffer, self.len)?;
                    Ok(if head_major {
                        rows.transpose(0, 1)?.contiguous()?
                    } else {
                        rows.contiguous()?
                    })
                };
                k.slice_set(&stored(&self.keys[layer])?, position_dim, 0)?;
                v.slice_set(&stored(&self.values[layer])?, position_dim, 0)?;
            }
            keys.push(k);
            values.push(v);
        }
        self.keys = keys;
        self.values = values;
        self.capacity = capacity;
        self.head_major = head_major;
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
        let position_dim = usize::from(self.head_major);
        let as_stored = |t: &Tensor| {
            let t = t.to_dtype(dtype)?;
            if self.head_major {
                t.transpose(0, 1)?.contiguous()
            } else {
                t.contiguous()
            }
        };
        self.keys[layer].slice_set(&as_stored(k)?, position_dim, self.len)?;
        self.values[layer].slice_set(&as_stored(v)?, position_dim, self.len)?;
        Ok(())
    }

    /// Writes new positions' key and value rows (kv_heads·head_dim f32 values each) after
    /// the stored ones, in place, converted to the cache's dtype as candle's `to_dtype`
    /// converts. CPU only: a decode step's few-hundred-byte rows cost less to copy than
    /// the candle ops of a tensor write (several per sequence and layer).
    pub(crate) fn write_rows_cpu(&self, layer: usize, keys: &[f32], values: &[f32]) -> Result<()> {
        let (kv_heads, head_dim) = self.heads_and_dim();
        let row = kv_heads * head_dim;
        if keys.len() != values.len() || !keys.len().is_multiple_of(row.max(1)) {
            return Err(crate::Error::Internal(format!(
                "KV write of {} key and {} value values in rows of {row}",
                keys.len(),
                values.len()
            )));
        }
        // (Head-major, a row past the capacity would land in the next head's rows.)
        let rows = keys.len() / row.max(1);
        if self.len + rows > self.capacity {
            return Err(crate::Error::Internal(format!(
                "KV write of {rows} rows after {} in a segment of {}",
                self.len, self.capacity
            )));
        }
        let (position, head) = self.strides();
        let write = |values| WriteRows {
            values,
            piece: head_dim,
            to: |piece| (self.len + piece / kv_heads) * position + piece % kv_heads * head,
        };
        self.keys[layer].inplace_op1(&write(keys))?;
        self.values[layer].inplace_op1(&write(values))?;
        Ok(())
    }

    fn commit(&mut self, n: usize) {
        self.len += n;
    }
}

/// Copies f32 values into a contiguous CPU buffer in pieces of `piece` values, piece j to
/// element `to(j)`, converting them to its dtype (round to nearest, as candle's
/// `to_dtype`).
struct WriteRows<'a, F> {
    values: &'a [f32],
    piece: usize,
    to: F,
}

impl<F: Fn(usize) -> usize> InplaceOp1 for WriteRows<'_, F> {
    fn name(&self) -> &'static str {
        "kv-write-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        use half::bf16;
        let n = self.piece;
        for (j, src) in self.values.chunks_exact(n.max(1)).enumerate() {
            let start = layout.start_offset() + (self.to)(j);
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
                    .copy_from_slice(src),
                CpuStorage::F16(d) => to_f16(d.get_mut(start..start + n).ok_or_else(room)?, src),
                CpuStorage::BF16(d) => {
                    let d = d.get_mut(start..start + n).ok_or_else(room)?;
                    d.iter_mut()
                        .zip(src)
                        .for_each(|(d, v)| *d = bf16::from_f32(*v));
                }
                other => candle_core::bail!("KV row write into a {:?} cache", other.dtype()),
            }
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
            let position_dim = usize::from(own.head_major);
            for layer in 0..own.keys.len() {
                // (`copy` would clone the whole buffer under the narrowed view.)
                let k = own.keys[layer]
                    .narrow(position_dim, 0, own.len)?
                    .force_contiguous()?;
                let v = own.values[layer]
                    .narrow(position_dim, 0, own.len)?
                    .force_contiguous()?;
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

    /// Rows written one way or another, across a regrowth and a fork, read back as the
    /// rows written: head-major buffers (the CPU) give the position-major views. In f32
    /// and f16 caches (the values are small integers, exact in f16).
    #[test]
    fn head_major_segments_read_back_the_rows_written() {
        for dtype in [DType::F32, DType::F16] {
            rows_read_back_as_written(dtype);
        }
    }

    fn rows_read_back_as_written(dtype: DType) {
        let (layers, kv, hd) = (2, 3, 4);
        let geometry = Arc::new(KvGeometry {
            num_layers: layers,
            num_kv_heads: kv,
            head_dim: hd,
            dtype,
            device: Device::Cpu,
        });
        let rows = |n: usize, seed: usize| -> Vec<f32> {
            (0..n * kv * hd)
                .map(|i| ((i * 7 + seed * 13) % 29) as f32 - 14.0)
                .collect()
        };
        let mut seq = SeqKv::new(geometry);
        let mut written: Vec<Vec<f32>> = vec![Vec::new(); layers * 2];
        // 5 rows through the in-place copy, then 14 through tensors (f16 input, so
        // the slice_set path), past the first capacity of 16.
        seq.reserve(5).unwrap();
        for l in 0..layers {
            let (k, v) = (rows(5, l), rows(5, 10 + l));
            seq.own_segment().write_rows_cpu(l, &k, &v).unwrap();
            written[2 * l].extend(&k);
            written[2 * l + 1].extend(&v);
        }
        seq.commit(5);
        seq.reserve(14).unwrap();
        for l in 0..layers {
            let (k, v) = (rows(14, 20 + l), rows(14, 30 + l));
            let t = |x: &[f32]| {
                Tensor::from_slice(x, (14, kv, hd), &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F16)
                    .unwrap()
            };
            seq.own_segment().write(l, &t(&k), &t(&v)).unwrap();
            // (Small integers are exact in f16.)
            written[2 * l].extend(&k);
            written[2 * l + 1].extend(&v);
        }
        seq.commit(14);
        let read = |seg: &KvSegment, l: usize| -> (Vec<f32>, Vec<f32>) {
            let flat = |t: Tensor| {
                let t = t.to_dtype(DType::F32).unwrap();
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            };
            (flat(seg.keys(l).unwrap()), flat(seg.values(l).unwrap()))
        };
        for l in 0..layers {
            let (k, v) = read(seq.own_segment(), l);
            assert_eq!(
                (&k, &v),
                (&written[2 * l], &written[2 * l + 1]),
                "layer {l}"
            );
        }
        // The fork freezes the 19 rows into a shared segment of exactly 19 positions.
        let child = seq.fork().unwrap();
        let shared = &child.shared_segments()[0];
        assert_eq!(shared.key_buffer(0).elem_count(), 19 * kv * hd);
        for l in 0..layers {
            assert_eq!(
                read(shared, l),
                (written[2 * l].clone(), written[2 * l + 1].clone())
            );
        }
        // In place: position p, head h starts at p·strides.0 + h·strides.1.
        let (position, head) = shared.strides();
        let buffer = shared
            .key_buffer(1)
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for p in 0..19 {
            for h in 0..kv {
                let at = p * position + h * head;
                let want = &written[2][(p * kv + h) * hd..][..hd];
                assert_eq!(&buffer[at..at + hd], want, "position {p}, head {h}");
            }
        }
    }

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
