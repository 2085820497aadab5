// What the decode step needs of each logits row, reduced on the GPU so that only a few
// numbers per row cross to the host (64 rows of a 152k vocabulary are 39 MB a step).
// Compiled at run time with NVRTC; `RowReduce::cpu_fwd` in src/engine/reduce.rs is the reference it is
// tested against (same outputs, same tie rules). Output row layout (doubles):
//   [0] token (-1: the host picks it)   [1] its log-prob     [2] entropy
//   [3] self-certainty                  [4] top-k confidence [5] max logit
//   [6] logsumexp                       [7] sum e^((z-max)/T) [8] candidates   [9] unused
//   [10, 10+W) candidate ids, [10+W, 10+2W) their logits, by logit (desc), then id (asc).
// One block per row; thread t owns the contiguous chunk [t*chunk, (t+1)*chunk), so the
// block-wide scans below run in vocabulary order and every result is deterministic.

// NVRTC has no <math.h>.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define THREADS 1024
#define WARPS (THREADS / 32)
#define CANDIDATES 64
#define HEADER 10
#define PARAMS 4
#define FULL_MASK 0xffffffffu

// Larger float, larger key (finite values and infinities; NaN is not expected).
__device__ __forceinline__ unsigned order_key(float f) {
    unsigned b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ void better(float &v, int &i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// Block-wide max; the lowest index among equal maxima. Every thread gets the result.
__device__ void block_argmax(float &v, int &i, float *sv, int *si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1)
        better(v, i, __shfl_down_sync(FULL_MASK, v, o), __shfl_down_sync(FULL_MASK, i, o));
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = i;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < WARPS ? sv[lane] : -INFINITY;
        i = lane < WARPS ? si[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1)
            better(v, i, __shfl_down_sync(FULL_MASK, v, o), __shfl_down_sync(FULL_MASK, i, o));
        if (lane == 0) {
            sv[0] = v;
            si[0] = i;
        }
    }
    __syncthreads();
    v = sv[0];
    i = si[0];
    __syncthreads();
}

// Exclusive prefix sum over the threads in order; `total` gets the sum of all.
// `s` needs WARPS + 1 slots.
template <typename T>
__device__ T block_exclusive_scan(T x, T *s, T &total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    T incl = x;
    for (int o = 1; o < 32; o <<= 1) {
        T y = __shfl_up_sync(FULL_MASK, incl, o);
        if (lane >= o) incl += y;
    }
    if (lane == 31) s[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        T w = lane < WARPS ? s[lane] : T(0);
        T wi = w;
        for (int o = 1; o < 32; o <<= 1) {
            T y = __shfl_up_sync(FULL_MASK, wi, o);
            if (lane >= o) wi += y;
        }
        if (lane < WARPS) s[lane] = wi - w;
        if (lane == 31) s[WARPS] = wi;
    }
    __syncthreads();
    T r = s[warp] + incl - x;
    total = s[WARPS];
    __syncthreads();
    return r;
}

template <typename T>
__device__ T block_sum(T x, T *s) {
    T total;
    block_exclusive_scan(x, s, total);
    return total;
}

// logits: rows x vocab f32, rows `row_stride` apart. params: rows x 4 doubles
// (1/T, uniform draw u in [0,1), mode: 0 greedy, 1 sample the whole softmax, 2 the host
// picks; candidates wanted: 0 or 1). conf_k: k of the top-k confidence, 1 <= conf_k <= CANDIDATES.
extern "C" __global__ void verity_row_reduce(const float *__restrict__ logits, int vocab,
                                             int row_stride, const double *__restrict__ params,
                                             int conf_k, double *__restrict__ out) {
    __shared__ float s_f[WARPS];
    __shared__ int s_i[WARPS];
    __shared__ double s_d[WARPS + 1];
    __shared__ int s_n[WARPS + 1];
    __shared__ unsigned hist[256];
    __shared__ unsigned s_digit;
    __shared__ int s_remaining;
    __shared__ float cand_z[CANDIDATES];
    __shared__ int cand_i[CANDIDATES];
    __shared__ int s_token;

    const int row = blockIdx.x, tid = threadIdx.x;
    const float *z = logits + (size_t)row * row_stride;
    double *o = out + (size_t)row * (HEADER + 2 * CANDIDATES);
    const double inv_t = params[row * PARAMS + 0];
    const double u = params[row * PARAMS + 1];
    const int mode = (int)params[row * PARAMS + 2];
    const bool with_candidates = params[row * PARAMS + 3] != 0.0;
    const int chunk = (vocab + THREADS - 1) / THREADS;
    const int lo = min(tid * chunk, vocab), hi = min(lo + chunk, vocab);

    // 1. The max and the arg-max.
    float m = -INFINITY;
    int am = 0x7fffffff;
    for (int j = lo; j < hi; ++j) better(m, am, z[j], j);
    block_argmax(m, am, s_f, s_i);

    // 2. With d = z - max: S = sum e^d, sum e^d d, sum d, and the tempered mass.
    float se = 0.f, sed = 0.f, sd = 0.f, st = 0.f;
    for (int j = lo; j < hi; ++j) {
        const float d = z[j] - m;
        const float e = expf(d);
        se += e;
        if (e > 0.f) sed += e * d;
        sd += d;
        if (mode == 1 || mode == 2) st += expf((float)(d * inv_t));
    }
    const double S = block_sum((double)se, s_d);
    const double SED = block_sum((double)sed, s_d);
    const double SD = block_sum((double)sd, s_d);
    const double ST = block_sum((double)st, s_d);
    const double ln_s = log(S);

    // 3. The top candidates: a radix select of the want-th largest key, 8 bits a pass
    // (the costliest part: skipped when the row needs no cut, top log-probs or statistics).
    const int want = with_candidates ? min(CANDIDATES, vocab) : 0;
    if (want > 0) {
    unsigned prefix = 0u, mask = 0u;
    int remaining = want;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += THREADS) hist[b] = 0u;
        __syncthreads();
        for (int j = lo; j < hi; ++j) {
            const unsigned k = order_key(z[j]);
            if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            int cum = 0, d = 255;
            for (; d > 0; --d) {
                if (cum + (int)hist[d] >= remaining) break;
                cum += (int)hist[d];
            }
            s_digit = (unsigned)d;
            s_remaining = remaining - cum;
        }
        __syncthreads();
        prefix |= s_digit << shift;
        mask |= 0xffu << shift;
        remaining = s_remaining;
        __syncthreads();
    }
    // Every key above the threshold, and the first `remaining` equal to it (lowest ids).
    int n_above = 0, n_equal = 0, total_n;
    for (int j = lo; j < hi; ++j) {
        const unsigned k = order_key(z[j]);
        n_above += k > prefix;
        n_equal += k == prefix;
    }
    int at_above = block_exclusive_scan(n_above, s_n, total_n);
    int at_equal = block_exclusive_scan(n_equal, s_n, total_n);
    for (int j = lo; j < hi; ++j) {
        const unsigned k = order_key(z[j]);
        if (k > prefix) {
            cand_z[at_above] = z[j];
            cand_i[at_above] = j;
            ++at_above;
        } else if (k == prefix) {
            if (at_equal < remaining) {
                cand_z[want - remaining + at_equal] = z[j];
                cand_i[want - remaining + at_equal] = j;
            }
            ++at_equal;
        }
    }
    __syncthreads();
    // Rank sort of the candidates: by logit (desc), then id (asc); ranks are distinct.
    float my_z = 0.f;
    int my_i = 0, rank = 0;
    if (tid < want) {
        my_z = cand_z[tid];
        my_i = cand_i[tid];
        for (int j = 0; j < want; ++j) {
            const float oz = cand_z[j];
            const int oi = cand_i[j];
            rank += (oz > my_z) || (oz == my_z && oi < my_i);
        }
    }
    __syncthreads();
    if (tid < want) {
        cand_z[rank] = my_z;
        cand_i[rank] = my_i;
    }
    } // want > 0
    if (tid == 0) s_token = -1;
    __syncthreads();

    // 4. The token: the arg-max, or the draw u through the tempered softmax in
    // vocabulary order (chunk masses scanned, then one chunk walked).
    int token = -1;
    if (mode == 0) {
        token = am;
    } else if (mode == 1) {
        double mass;
        const double before = block_exclusive_scan((double)st, s_d, mass);
        const double target = u * mass;
        if (st > 0.f && target >= before && target < before + (double)st) {
            const float left = (float)(target - before);
            float acc = 0.f;
            int last = -1;
            for (int j = lo; j < hi; ++j) {
                const float w = expf((float)((z[j] - m) * inv_t));
                if (w > 0.f) last = j;
                acc += w;
                if (left < acc) {
                    last = j;
                    break;
                }
            }
            s_token = last;
        }
        __syncthreads();
        // A draw that rounding put past the last chunk takes the most likely token.
        token = s_token >= 0 ? s_token : am;
    }

    if (tid == 0) {
        const int k = min(conf_k, want);
        double top = 0.0;
        for (int j = 0; j < k; ++j) top += (double)(cand_z[j] - m);
        o[0] = (double)token;
        o[1] = token >= 0 ? (double)(z[token] - m) - ln_s : 0.0;
        o[2] = ln_s - SED / S;
        o[3] = ln_s - SD / (double)vocab - log((double)vocab);
        o[4] = k > 0 ? ln_s - top / (double)k : 0.0;
        o[5] = (double)m;
        o[6] = (double)m + ln_s;
        o[7] = ST;
        o[8] = (double)want;
        o[9] = 0.0;
    }
    if (tid < CANDIDATES) {
        o[HEADER + tid] = tid < want ? (double)cand_i[tid] : -1.0;
        o[HEADER + CANDIDATES + tid] = tid < want ? (double)cand_z[tid] : -INFINITY;
    }
}
