//! Attention for the whole batch on the CPU, decode tokens and prompt chunks alike, in one
//! parallel call per layer.
//!
//! The reference, [`Transformer::attend`](super::Transformer), is about fifteen candle ops
//! per sequence and layer; at batch 16 on a 30-layer model that is thousands of small ops
//! per step, whose dispatch costs more than the arithmetic (a context of a few hundred
//! positions is a few hundred thousand multiply-adds per sequence and layer). Here every
//! sequence's new rows are written into its own KV segment, and then each sequence's
//! segments are read in place: one task per (new row, KV head) computes the scores of the
//! head's query group over the positions up to the row's own, the softmax and the
//! weighted sum of values, and the tasks share out over [`crate::pool::Pool`].
//!
//! A task's arithmetic depends only on its own row's position and sequence, in a fixed
//! order, so a row's result depends neither on the batch it is in nor on how its prompt
//! was cut into chunks. (The reference's matrix products over a chunk's keys do depend on
//! the chunk: greedy answers differed in 1–3% of questions between `verity eval`
//! runs whose concurrency shared each step's prompt budget differently.)

use candle_core::{DType, Device, Storage, StorageRef, Tensor};
use half::slice::HalfFloatSliceExt;
use parking_lot::Mutex;

use super::step::StepInput;
use super::Transformer;
use crate::error::{Error, Result};
use crate::model::cpu_ops::with_cpu_f32;
use crate::pool::Pool;

/// One segment of one sequence as the kernel reads it, for one layer.
struct SegmentView<'a, T> {
    keys: &'a [T],
    values: &'a [T],
    /// Absolute position of its first row, and the rows to read.
    start: usize,
    len: usize,
    /// Elements between positions and between KV heads (`KvSegment::strides`).
    strides: (usize, usize),
}

/// One new row to attend (the i-th is row i of the step's queries): its sequence (an index
/// into the batch) and its absolute position.
#[derive(Clone, Copy)]
pub(super) struct NewRow {
    sequence: usize,
    at: usize,
}

/// The step's new rows in batch order: the same for every layer, so built once a step.
pub(super) fn new_rows(batch: &[StepInput<'_>]) -> Vec<NewRow> {
    batch
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            (0..s.tokens.len()).map(move |j| NewRow {
                sequence: i,
                at: s.kv.len() + j,
            })
        })
        .collect()
}

impl Transformer {
    /// Whether [`Self::attend_cpu`] takes this step: f32 activations on the CPU. (Then it
    /// takes every sequence, so that a sequence's numbers do not depend on its batch.)
    pub(super) fn cpu_attention_fits(&self) -> bool {
        matches!(self.device, Device::Cpu)
            && self.dtype == DType::F32
            && self
                .config
                .num_heads
                .is_multiple_of(self.config.num_kv_heads)
            && std::env::var_os("VERITY_REFERENCE_ATTENTION").is_none()
    }

    /// For every sequence of the batch, adding `tokens.len()` rows ([`new_rows`]) whose
    /// queries, keys and values are consecutive rows of `q` (T, H, d), `k`, `v` (T, KV, d)
    /// in batch order:
    /// writes the keys and values into the sequence's own segment and returns the
    /// attention as (T, H·d), for one layer. A sequence's new rows sit at positions
    /// `kv.len()..`; each sees the positions up to its own, and with a `window` only the
    /// `window` latest of those.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_cpu(
        &self,
        batch: &[StepInput<'_>],
        new_rows: &[NewRow],
        layer: usize,
        window: Option<usize>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let (total, nh, hd) = q.dims3()?;
        if new_rows.len() != total {
            return Err(Error::Internal(format!(
                "CPU attention: {} new rows for {total} queries",
                new_rows.len()
            )));
        }
        let nkv = self.config.num_kv_heads;
        let row = nkv * hd;
        let written = with_cpu_f32(k, |k| {
            with_cpu_f32(v, |v| {
                let mut first = 0;
                for s in batch {
                    let span = first * row..(first + s.tokens.len()) * row;
                    s.kv.own_segment()
                        .write_rows_cpu(layer, &k[span.clone()], &v[span])?;
                    first += s.tokens.len();
                }
                Ok(())
            })
        })?
        .flatten();
        if written.is_none() {
            return Err(Error::Internal(format!(
                "CPU attention: keys {:?} and values {:?} not f32 on the CPU",
                k.dtype(),
                v.dtype()
            )));
        }
        let scale = self.config.attention_scale() as f32;

        // Every segment's storage, held for reading while the tasks run; sequence i's
        // segments are `held[first[i]..first[i + 1]]`.
        let mut held = Vec::new();
        let mut first = Vec::with_capacity(batch.len() + 1);
        for s in batch {
            first.push(held.len());
            let own = s.kv.own_segment();
            let segments = s.kv.shared_segments().iter().map(|seg| (&**seg, seg.len()));
            // The own segment: its stored positions and those this step wrote.
            for (seg, len) in segments.chain([(own, own.len() + s.tokens.len())]) {
                held.push(Held {
                    keys: seg.key_buffer(layer).storage_and_layout().0,
                    values: seg.value_buffer(layer).storage_and_layout().0,
                    start: seg.start(),
                    len,
                    strides: seg.strides(),
                });
            }
        }
        first.push(held.len());
        let kv_dtype = self.kv_dtype();
        let out = with_cpu_f32(q, |q| {
            let job = Job {
                new_rows,
                first: &first,
                window,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
                scale,
                q,
            };
            match kv_dtype {
                DType::F32 => job.run::<f32>(&held),
                DType::F16 => job.run::<half::f16>(&held),
                DType::BF16 => job.run::<half::bf16>(&held),
                other => Err(Error::Internal(format!(
                    "CPU attention over a {other:?} KV cache"
                ))),
            }
        })?
        .ok_or_else(|| Error::Internal("CPU attention: queries not f32 on the CPU".into()))?;
        Ok(Tensor::from_vec(out, (total, nh * hd), &self.device)?)
    }
}

/// A segment's key and value storage, held for reading while the tasks run.
struct Held<'a> {
    keys: StorageRef<'a>,
    values: StorageRef<'a>,
    start: usize,
    len: usize,
    strides: (usize, usize),
}

/// What every task of one layer's call reads.
struct Job<'a> {
    new_rows: &'a [NewRow],
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

impl Job<'_> {
    /// Runs the (new row, KV head) tasks over a KV cache of element type `T`; returns the
    /// attention (T, H·d) flat.
    fn run<T: KvElement>(&self, held: &[Held<'_>]) -> Result<Vec<f32>> {
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let groups = nh / nkv;
        let views = held
            .iter()
            .map(|h| {
                // The last value read: the last head's last row.
                let (position, head) = h.strides;
                let end = if h.len == 0 {
                    0
                } else {
                    (h.len - 1) * position + (nkv - 1) * head + hd
                };
                Ok(SegmentView {
                    keys: rows_of::<T>(&h.keys, end)?,
                    values: rows_of::<T>(&h.values, end)?,
                    start: h.start,
                    len: h.len,
                    strides: h.strides,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = vec![0f32; self.new_rows.len() * nh * hd];
        // Task t = (new row t / nkv, KV head t % nkv) owns output heads h·G..(h+1)·G of
        // its row: a contiguous run of G·d values.
        let outputs: Vec<Mutex<&mut [f32]>> = out.chunks_mut(groups * hd).map(Mutex::new).collect();
        Pool::global().run(outputs.len(), |t| {
            let (r, h) = (t / nkv, t % nkv);
            let new = self.new_rows[r];
            let i = new.sequence;
            attend_one(
                &views[self.first[i]..self.first[i + 1]],
                new.at,
                self.window,
                h,
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
    /// How the x86 kernel loads this type, if it does.
    #[cfg(target_arch = "x86_64")]
    const SIMD: Option<x86::Kind>;
    /// `src` as f32: itself, or converted into `buf`.
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];
}

impl KvElement for f32 {
    #[cfg(target_arch = "x86_64")]
    const SIMD: Option<x86::Kind> = Some(x86::Kind::F32);
    fn as_f32<'a>(src: &'a [f32], _: &'a mut [f32]) -> &'a [f32] {
        src
    }
}

impl KvElement for half::f16 {
    #[cfg(target_arch = "x86_64")]
    const SIMD: Option<x86::Kind> = Some(x86::Kind::F16);
    fn as_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32] {
        src.convert_to_f32_slice(buf);
        buf
    }
}

impl KvElement for half::bf16 {
    #[cfg(target_arch = "x86_64")]
    const SIMD: Option<x86::Kind> = None;
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
/// G·d) at position `at` over the positions of `segments` up to `at`.
#[allow(clippy::too_many_arguments)]
fn attend_one<T: KvElement>(
    segments: &[SegmentView<'_, T>],
    at: usize,
    window: Option<usize>,
    head: usize,
    hd: usize,
    scale: f32,
    queries: &[f32],
    out: &mut [f32],
) {
    let groups = queries.len() / hd;
    let oldest = window.map_or(0, |w| (at + 1).saturating_sub(w));
    // Each segment's visible rows (from the window's oldest position to `at`) as (key,
    // value) of this head, oldest first: found once, so the kernels' loops only index.
    let visible = |seg: &SegmentView<'_, T>| {
        let to = (at + 1).saturating_sub(seg.start).min(seg.len);
        oldest.saturating_sub(seg.start).min(to)..to
    };
    let mut rows = Vec::with_capacity(segments.iter().map(|seg| visible(seg).len()).sum());
    for seg in segments {
        for r in visible(seg) {
            let at = r * seg.strides.0 + head * seg.strides.1;
            rows.push((&seg.keys[at..at + hd], &seg.values[at..at + hd]));
        }
    }
    // scores[g·keys + j]
    let mut scores = vec![0f32; groups * rows.len()];
    #[cfg(target_arch = "x86_64")]
    if let Some(kind) = T::SIMD.filter(|_| x86::fits(hd)) {
        // SAFETY: `fits` checked the CPU's features and the head size.
        unsafe { x86::attend(kind, &rows, hd, scale, queries, &mut scores, out) };
        return;
    }
    attend_portable::<T>(&rows, hd, scale, queries, &mut scores, out);
}

/// [`attend_one`] after the rows are found, in plain Rust (other CPUs, bf16 caches, odd
/// head sizes; and the reference of the x86 kernel's tests).
fn attend_portable<T: KvElement>(
    rows: &[(&[T], &[T])],
    hd: usize,
    scale: f32,
    queries: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let keys = rows.len();
    let mut buf = vec![0f32; hd];
    for (j, (key, _)) in rows.iter().enumerate() {
        let key = T::as_f32(key, &mut buf);
        for (g, query) in queries.chunks_exact(hd).enumerate() {
            scores[g * keys + j] = dot(query, key) * scale;
        }
    }
    for s in scores.chunks_exact_mut(keys.max(1)) {
        softmax_in_place(s);
    }
    out.fill(0.0);
    for (j, (_, value)) in rows.iter().enumerate() {
        let value = T::as_f32(value, &mut buf);
        for (g, o) in out.chunks_exact_mut(hd).enumerate() {
            let w = scores[g * keys + j];
            o.iter_mut().zip(value).for_each(|(o, v)| *o += w * v);
        }
    }
}

/// softmax(s) in place: e^(s − max) through the stats' branch-free exp, then normalized.
/// Eight partial sums, so the loops vectorize (one running sum would force a serial
/// order).
fn softmax_in_place(s: &mut [f32]) {
    const L: usize = 8;
    let mut max = [f32::NEG_INFINITY; L];
    let (chunks, rest) = s.as_chunks::<L>();
    for c in chunks {
        for l in 0..L {
            max[l] = max[l].max(c[l]);
        }
    }
    let max = rest
        .iter()
        .copied()
        .fold(max.into_iter().fold(f32::NEG_INFINITY, f32::max), f32::max);
    for x in s.iter_mut() {
        *x = crate::stats::exp_nonpositive((*x - max).max(-80.0));
    }
    let mut sum = [0f32; L];
    let (chunks, rest) = s.as_chunks::<L>();
    for c in chunks {
        for l in 0..L {
            sum[l] += c[l];
        }
    }
    let sum = sum.iter().sum::<f32>() + rest.iter().sum::<f32>();
    let inv = 1.0 / sum;
    s.iter_mut().for_each(|x| *x *= inv);
}

#[cfg(target_arch = "x86_64")]
mod x86;

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

#[cfg(test)]
mod tests;

#[cfg(test)]
#[cfg(target_arch = "x86_64")]
mod timing;
