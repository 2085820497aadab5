//! Decode attention for the whole batch on the CPU, in one parallel call per layer.
//!
//! The reference, [`Transformer::attend`](super::Transformer), is about fifteen candle ops
//! per sequence and layer; at batch 16 on a 30-layer model that is thousands of small ops
//! per step, whose dispatch costs more than the arithmetic (a context of a few hundred
//! positions is a few hundred thousand multiply-adds per sequence and layer). Here a step
//! where every sequence adds one token reads each sequence's KV segments in place: one task
//! per (sequence, KV head) computes the scores of the head's query group, the softmax and
//! the weighted sum of values, and the tasks share out over [`crate::pool::Pool`].
//!
//! A task's arithmetic depends only on its own sequence, in a fixed order, so a row's
//! result does not depend on the batch it is in.

use candle_core::{DType, Device, Storage, StorageRef, Tensor};
use half::slice::HalfFloatSliceExt;
use parking_lot::Mutex;

use super::step::StepInput;
use super::Transformer;
use crate::error::{Error, Result};
use crate::pool::Pool;

/// One segment of one sequence as the kernel reads it, for one layer.
struct SegmentView<'a, T> {
    keys: &'a [T],
    values: &'a [T],
    /// Absolute position of its first row, and the rows to read.
    start: usize,
    len: usize,
}

impl Transformer {
    /// Whether [`Self::attend_decode_cpu`] takes this step's single-token sequences: f32
    /// on the CPU. (Always, whatever else is in the batch, so that a sequence's numbers
    /// do not depend on its batch.)
    pub(super) fn cpu_decode_fits(&self) -> bool {
        matches!(self.device, Device::Cpu)
            && self.dtype == DType::F32
            && self
                .config
                .num_heads
                .is_multiple_of(self.config.num_kv_heads)
            && std::env::var_os("VERITY_REFERENCE_ATTENTION").is_none()
    }

    /// For the sequences `which` of the batch, each adding one token whose query, key and
    /// value are row `rows[i]` of `q` (T, H, d), `k`, `v` (T, KV, d): writes the key and
    /// value into the sequence's own segment and returns the attention as
    /// (which.len(), H·d), for one layer. Each new token sits at position `kv.len()`; with
    /// a `window` it sees only the `window` latest positions.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_decode_cpu(
        &self,
        batch: &[StepInput<'_>],
        which: &[usize],
        rows: &[usize],
        layer: usize,
        window: Option<usize>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let (_, nh, hd) = q.dims3()?;
        let b = which.len();
        let nkv = self.config.num_kv_heads;
        for (&i, &r) in which.iter().zip(rows) {
            batch[i]
                .kv
                .own_segment()
                .write(layer, &k.narrow(0, r, 1)?, &v.narrow(0, r, 1)?)?;
        }
        let q = q.flatten_all()?.to_vec1::<f32>()?;
        let scale = self.config.attention_scale() as f32;

        // Every segment's storage, held for reading while the tasks run; `first[i]` is
        // sequence i's first segment.
        let mut held = Vec::new();
        let mut first = Vec::with_capacity(b + 1);
        for s in which.iter().map(|&i| &batch[i]) {
            first.push(held.len());
            let own = s.kv.own_segment();
            let segments = s.kv.shared_segments().iter().map(|seg| (&**seg, seg.len()));
            // The own segment: its stored positions and the one this step wrote.
            for (seg, len) in segments.chain([(own, own.len() + 1)]) {
                held.push((
                    seg.key_buffer(layer).storage_and_layout().0,
                    seg.value_buffer(layer).storage_and_layout().0,
                    seg.start(),
                    len,
                ));
            }
        }
        first.push(held.len());
        let job = Job {
            batch,
            which,
            rows,
            first: &first,
            window,
            heads: nh,
            kv_heads: nkv,
            head_dim: hd,
            scale,
            q: &q,
        };
        let out = match self.kv_dtype() {
            DType::F32 => job.run::<f32>(&held)?,
            DType::F16 => job.run::<half::f16>(&held)?,
            DType::BF16 => job.run::<half::bf16>(&held)?,
            other => {
                return Err(Error::Internal(format!(
                    "CPU decode attention over a {other:?} KV cache"
                )))
            }
        };
        Ok(Tensor::from_vec(out, (b, nh * hd), &self.device)?)
    }
}

/// A segment's key and value storage, held for reading, its first position and the rows
/// to read.
type Held<'a> = (StorageRef<'a>, StorageRef<'a>, usize, usize);

/// What every task of one layer's call reads.
struct Job<'a, 'b> {
    batch: &'a [StepInput<'b>],
    which: &'a [usize],
    rows: &'a [usize],
    /// Sequence i's segments are `held[first[i]..first[i + 1]]`.
    first: &'a [usize],
    window: Option<usize>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
    /// The queries, (T, H, d) flat.
    q: &'a [f32],
}

impl Job<'_, '_> {
    /// Runs the (sequence, KV head) tasks over a KV cache of element type `T`; returns the
    /// attention (B, H·d) flat.
    fn run<T: KvElement>(&self, held: &[Held<'_>]) -> Result<Vec<f32>> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let groups = nh / nkv;
        let row = nkv * hd;
        let views = held
            .iter()
            .map(|(keys, values, start, len)| {
                Ok(SegmentView {
                    keys: rows_of::<T>(keys, len * row)?,
                    values: rows_of::<T>(values, len * row)?,
                    start: *start,
                    len: *len,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = vec![0f32; self.which.len() * nh * hd];
        // Task t = (sequence t / nkv, KV head t % nkv) owns output heads h·G..(h+1)·G of
        // its sequence: a contiguous run of G·d values.
        let outputs: Vec<Mutex<&mut [f32]>> = out.chunks_mut(groups * hd).map(Mutex::new).collect();
        Pool::global().run(outputs.len(), |t| {
            let (i, h) = (t / nkv, t % nkv);
            let r = self.rows[i];
            attend_one(
                &views[self.first[i]..self.first[i + 1]],
                self.batch[self.which[i]].kv.len(),
                self.window,
                h,
                nkv,
                hd,
                self.scale,
                &self.q[(r * nh + h * groups) * hd..(r * nh + (h + 1) * groups) * hd],
                &mut outputs[t].lock(),
            );
        });
        drop(outputs);
        Ok(out)
    }
}

/// An element type of the KV cache, read as f32.
trait KvElement: candle_core::WithDType {
    /// `src` as f32: itself, or converted into `buf`.
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl KvElement for f32 {
    fn as_f32<'a>(src: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElement for half::f16 {
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        src.convert_to_f32_slice(buf);
        buf
    }
}

impl KvElement for half::bf16 {
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        src.convert_to_f32_slice(buf);
        buf
    }
}

/// The first `n` values of a CPU storage of `T`.
fn rows_of<T: KvElement>(storage: &Storage, n: usize) -> Result<&[T]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(Error::Internal(
            "CPU decode attention over a device tensor".into(),
        ));
    };
    cpu.as_slice::<T>()?
        .get(..n)
        .ok_or_else(|| Error::Internal("a KV segment shorter than its length".into()))
}

/// Attention of one KV head's query group (G heads of d values: `queries` and `out` are
/// G·d) at position `at` over `segments`.
#[allow(clippy::too_many_arguments)]
fn attend_one<T: KvElement>(
    segments: &[SegmentView<'_, T>],
    at: usize,
    window: Option<usize>,
    head: usize,
    kv_heads: usize,
    hd: usize,
    scale: f32,
    queries: &[f32],
    out: &mut [f32],
) {
    let groups = queries.len() / hd;
    let oldest = window.map_or(0, |w| (at + 1).saturating_sub(w));
    let visible = |seg: &SegmentView<'_, T>| {
        let from = oldest.saturating_sub(seg.start).min(seg.len);
        from..seg.len
    };
    let keys: usize = segments.iter().map(|s| visible(s).len()).sum();
    // scores[g·keys + j]
    let mut scores = vec![0f32; groups * keys];
    let mut buf = vec![0f32; hd];
    let mut j = 0;
    for seg in segments {
        for r in visible(seg) {
            let key = T::as_f32(&seg.keys[(r * kv_heads + head) * hd..][..hd], &mut buf);
            for (g, query) in queries.chunks_exact(hd).enumerate() {
                scores[g * keys + j] = dot(query, key) * scale;
            }
            j += 1;
        }
    }
    for s in scores.chunks_exact_mut(keys.max(1)) {
        let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in s.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        s.iter_mut().for_each(|x| *x *= inv);
    }
    out.fill(0.0);
    let mut j = 0;
    for seg in segments {
        for r in visible(seg) {
            let value = T::as_f32(&seg.values[(r * kv_heads + head) * hd..][..hd], &mut buf);
            for (g, o) in out.chunks_exact_mut(hd).enumerate() {
                let w = scores[g * keys + j];
                o.iter_mut().zip(value).for_each(|(o, v)| *o += w * v);
            }
            j += 1;
        }
    }
}

/// A dot product in 16 independent lanes, so the compiler can keep it in vector registers
/// (a single running sum would force a serial order).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    sum
}
