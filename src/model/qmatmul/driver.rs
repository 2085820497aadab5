//! The driver of one product: quantize the activation rows once, split the output
//! columns among threads, and run a weight type's kernels over tiles of activation rows
//! (the `qmatmul` module documentation describes the scheme and why it is deterministic).

use parking_lot::Mutex;

use super::packed::{self, PackedWeight, Q8Block, LANES};
use super::packed_k;
#[cfg(target_arch = "x86_64")]
use super::packed_k_x86;
#[cfg(target_arch = "x86_64")]
use super::packed_x86;
use super::quant::{quantize_q8k, Q8KBlock, QK_K};
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::Isa;
use crate::error::{Error, Result};
use crate::pool::Pool;

/// Below this many multiply-adds (m · out · in) a product runs on the calling thread.
const MIN_PARALLEL_WORK: usize = 1 << 18;

/// `y = x · Wᵀ` on a repacked weight: returns y as m rows of n values (`x` holds m rows
/// of k values).
pub(super) fn run_packed(isa: Isa, p: &PackedWeight, x: &[f32], m: usize) -> Result<Vec<f32>> {
    let mut ys = run_packed_many(isa, &[p], x, m)?;
    Ok(ys.pop().unwrap_or_default())
}

/// `y_i = x · W_iᵀ` for several repacked weights of the same input width (q, k and v; gate
/// and up): the activations are quantized once and all the weights' columns are shared out
/// in one pool call. Each y_i is what [`run_packed`] returns for W_i alone.
pub(super) fn run_packed_many(
    isa: Isa,
    ps: &[&PackedWeight],
    x: &[f32],
    m: usize,
) -> Result<Vec<Vec<f32>>> {
    let Some(k) = ps.first().map(|p| p.shape().1) else {
        return Ok(Vec::new());
    };
    if let Some(p) = ps.iter().find(|p| p.shape().1 != k) {
        return Err(Error::InvalidArgument(format!(
            "qmatmul: weights of {k} and {} inputs on one activation",
            p.shape().1
        )));
    }
    if x.len() != m * k {
        return Err(Error::InvalidArgument(format!(
            "qmatmul: {} inputs for m = {m} rows of {k}",
            x.len()
        )));
    }
    let work: usize = ps.iter().map(|p| p.shape().0).sum::<usize>() * k * m;
    if work == 0 {
        // (Empty sums when k = 0.)
        return Ok(ps.iter().map(|p| vec![0f32; m * p.shape().0]).collect());
    }
    // Not zeroed: the columns fill every element (a batch's logits are megabytes, and
    // zeroing them was a few percent of a step). `columns_of` sets the lengths once the
    // kernels have run.
    let ys: Vec<Vec<f32>> = ps
        .iter()
        .map(|p| Vec::with_capacity(m * p.shape().0))
        .collect();
    if ps.iter().any(|p| p.ty.is_k() != ps[0].ty.is_k()) {
        return Err(Error::InvalidArgument(format!(
            "qmatmul: {:?} weights take other activation blocks than K-quants",
            ps.iter().map(|p| p.ty).collect::<Vec<_>>()
        )));
    }
    Ok(if ps[0].ty.is_k() {
        columns_of::<Q8KBlock>(isa, ps, x, k, ys, work)
    } else {
        columns_of::<Q8Block>(isa, ps, x, k, ys, work)
    })
}

/// [`run_packed_many`] after the checks, with activation blocks A.
fn columns_of<A: PackedAct>(
    isa: Isa,
    ps: &[&PackedWeight],
    x: &[f32],
    k: usize,
    mut ys: Vec<Vec<f32>>,
    work: usize,
) -> Vec<Vec<f32>> {
    let nb = ps[0].blocks();
    let acts = quantize_rows(x, k, nb, A::ZERO, |x, out| A::quantize_row(isa, x, out));
    let acts: Vec<&[A]> = acts.chunks_exact(nb).collect();
    // Threads own disjoint column ranges of each y, written through these pointers.
    let outs: Vec<SharedRows> = ys
        .iter_mut()
        .zip(ps)
        .map(|(y, p)| SharedRows {
            ptr: y.as_mut_ptr(),
            n: p.shape().0,
        })
        .collect();
    // The column blocks of all the weights, one after the other.
    let blocks: Vec<usize> = ps
        .iter()
        .map(|p| p.groups().div_ceil(GROUPS_PER_CALL))
        .collect();
    let total: usize = blocks.iter().sum();
    let columns = |range: std::ops::Range<usize>| {
        let (mut w, mut first) = (0, 0);
        for cb in range {
            while cb >= first + blocks[w] {
                first += blocks[w];
                w += 1;
            }
            packed_columns(isa, ps[w], cb - first, &acts, &outs[w]);
        }
    };
    let pool = Pool::global();
    if pool.threads() <= 1 || work < min_parallel_work() {
        columns(0..total);
    } else {
        // Many chunks per thread, so that a thread the OS does not run loses its share to
        // the others (`pool`), and the last chunk, which one thread runs while the other
        // waits, is short. (32 a thread against 8: the waits at the end of SmolLM2's
        // batch-16 products went from ~9.4% to ~8.3% of the step's samples.)
        let per_chunk = total.div_ceil(32 * pool.threads()).max(1);
        let chunks = total.div_ceil(per_chunk);
        pool.run(chunks, |c| {
            columns(c * per_chunk..total.min((c + 1) * per_chunk))
        });
    }
    drop(outs);
    let m = acts.len();
    for (y, p) in ys.iter_mut().zip(ps) {
        // SAFETY: the capacity is m · n, and `packed_columns` wrote every element: the
        // column blocks cover every group of every weight, the tiles every row, and each
        // group its LANES columns or the last ones n has. (A panic in a kernel leaves the
        // length at 0.)
        unsafe { y.set_len(m * p.shape().0) };
    }
    ys
}

/// m rows of k values, each quantized to `per_row` blocks by `quantize_row`, into one
/// vector (row r's blocks at r · per_row). With enough values the rows are shared out over
/// the pool; a row's blocks depend on that row only, so the result is the same either way.
fn quantize_rows<A: Copy + Send + Sync>(
    x: &[f32],
    k: usize,
    per_row: usize,
    zero: A,
    quantize_row: impl Fn(&[f32], &mut [A]) + Sync,
) -> Vec<A> {
    let m = x.len() / k;
    let mut out = vec![zero; m * per_row];
    let pool = Pool::global();
    if m < 2 || pool.threads() <= 1 || x.len() < MIN_PARALLEL_QUANTIZE {
        for (x, out) in x.chunks_exact(k).zip(out.chunks_exact_mut(per_row)) {
            quantize_row(x, out);
        }
        return out;
    }
    let rows_per_chunk = m.div_ceil(2 * pool.threads());
    let parts: Vec<Mutex<&mut [A]>> = out
        .chunks_mut(rows_per_chunk * per_row)
        .map(Mutex::new)
        .collect();
    pool.run(parts.len(), |c| {
        let rows = &x[c * rows_per_chunk * k..x.len().min((c + 1) * rows_per_chunk * k)];
        let mut part = parts[c].lock();
        for (x, out) in rows.chunks_exact(k).zip(part.chunks_exact_mut(per_row)) {
            quantize_row(x, out);
        }
    });
    drop(parts);
    out
}

/// Below this many activation values, quantizing them is not worth a pool call.
const MIN_PARALLEL_QUANTIZE: usize = 1 << 16;

/// Column groups per kernel call.
const GROUPS_PER_CALL: usize = 2;

/// y's rows, shared by the threads that write disjoint columns of them.
struct SharedRows {
    ptr: *mut f32,
    n: usize,
}

// SAFETY: threads write disjoint elements (`packed_columns` of distinct column blocks).
unsafe impl Sync for SharedRows {}

/// Columns of column block `cb` (groups GROUPS_PER_CALL·cb, …) for every activation row.
/// The activation blocks of the repacked types, and the register-tile kernels that read
/// them: [`Q8Block`] for the 32-value types, [`Q8KBlock`] for the K-quants.
trait PackedAct: Copy + Send + Sync {
    const ZERO: Self;
    /// Row `x` (k values) into its blocks.
    fn quantize_row(isa: Isa, x: &[f32], out: &mut [Self]);
    /// Activation rows `rows` (up to the level's tile) against column groups `groups`
    /// (starting at group g0 of p): `out[r * groups.len() + g]`.
    fn tile(
        isa: Isa,
        p: &PackedWeight,
        g0: usize,
        groups: &[&[u8]],
        rows: &[&[Self]],
        out: &mut [[f32; LANES]],
    );
}

impl PackedAct for Q8Block {
    const ZERO: Self = Q8Block::ZERO;
    fn quantize_row(isa: Isa, x: &[f32], out: &mut [Self]) {
        packed::quantize_row(isa, x, out)
    }
    fn tile(
        isa: Isa,
        p: &PackedWeight,
        g0: usize,
        groups: &[&[u8]],
        rows: &[&[Self]],
        out: &mut [[f32; LANES]],
    ) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::X86(s) => packed_x86::tile(s, p.ty, groups, rows, out),
            Isa::Scalar => scalar_tile(groups.len(), rows.len(), out, |g, one| {
                packed::group_scalar(p, g0 + g, rows, one)
            }),
        }
    }
}

impl PackedAct for Q8KBlock {
    const ZERO: Self = Q8KBlock::ZERO;
    fn quantize_row(_: Isa, x: &[f32], out: &mut [Self]) {
        for (o, x) in out.iter_mut().zip(x.chunks(QK_K)) {
            *o = quantize_q8k(x);
        }
    }
    fn tile(
        isa: Isa,
        p: &PackedWeight,
        g0: usize,
        groups: &[&[u8]],
        rows: &[&[Self]],
        out: &mut [[f32; LANES]],
    ) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::X86(s) => packed_k_x86::tile(s, p.ty, groups, rows, out),
            Isa::Scalar => scalar_tile(groups.len(), rows.len(), out, |g, one| {
                packed_k::group_scalar(p, g0 + g, rows, one)
            }),
        }
    }
}

/// A tile through a scalar kernel of one group at a time.
fn scalar_tile(
    groups: usize,
    rows: usize,
    out: &mut [[f32; LANES]],
    group: impl Fn(usize, &mut [[f32; LANES]]),
) {
    let mut one = [[0f32; LANES]; 4];
    for g in 0..groups {
        group(g, &mut one[..rows]);
        for (r, y) in one[..rows].iter().enumerate() {
            out[r * groups + g] = *y;
        }
    }
}

/// Columns of column block `cb` (groups GROUPS_PER_CALL·cb, …) for every activation row.
fn packed_columns<A: PackedAct>(
    isa: Isa,
    p: &PackedWeight,
    cb: usize,
    acts: &[&[A]],
    y: &SharedRows,
) {
    let g0 = cb * GROUPS_PER_CALL;
    // (On the stack: this runs thousands of times per decode step.)
    let mut held: [&[u8]; GROUPS_PER_CALL] = [&[]; GROUPS_PER_CALL];
    let count = p.groups().min(g0 + GROUPS_PER_CALL) - g0;
    for (g, slot) in held[..count].iter_mut().enumerate() {
        *slot = p.group(g0 + g);
    }
    let groups = &held[..count];
    let rows_per_tile = match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::X86(x86::Simd::Avx512(_)) => packed_x86::ROWS_512,
        #[cfg(target_arch = "x86_64")]
        Isa::X86(_) => packed_x86::ROWS_256,
        Isa::Scalar => 4,
    };
    let mut out = [[0f32; LANES]; 4 * GROUPS_PER_CALL];
    for (t, tile) in acts.chunks(rows_per_tile).enumerate() {
        let out = &mut out[..tile.len() * groups.len()];
        A::tile(isa, p, g0, groups, tile, out);
        for (r, row) in (t * rows_per_tile..).zip(0..tile.len()) {
            for g in 0..groups.len() {
                let y_row = &out[row * groups.len() + g];
                let c0 = (g0 + g) * LANES;
                let len = LANES.min(p.n - c0);
                let to = unsafe { y.ptr.add(r * y.n + c0) };
                // SAFETY: row r < m and columns c0..c0 + len < n lie in y, and no other
                // thread writes them (they belong to column block cb). A whole group is a
                // fixed-size copy (a few vector moves; a copy of run-time length is a
                // library call, and this runs for every row and group of every product).
                if len == LANES {
                    unsafe { to.cast::<[f32; LANES]>().write_unaligned(*y_row) };
                } else {
                    unsafe { std::ptr::copy_nonoverlapping(y_row.as_ptr(), to, len) };
                }
            }
        }
    }
}

fn min_parallel_work() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("VERITY_QMATMUL_MIN_PARALLEL")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MIN_PARALLEL_WORK)
    })
}
