// Decode attention for a whole batch in one launch per layer: every sequence adds one token,
// whose key and value rows this kernel first writes into the sequence's own KV segment, then
// attends over all its segments (shared prompt segments, then its own). The reference is
// `Transformer::attend` (src/model/llama/step.rs), candle ops one sequence at a time.
//
// One block per (sequence, KV head) reads each key and value row once for the G query heads
// of that KV head; its warps split the positions and keep an online softmax each, merged at
// the end. Lane l holds dimensions l, l+32, ... of a head (head_dim <= 32*PER).
//
// table: 3 u64 per segment: keys base address, values base address (that layer's
// (capacity, n_kv, head_dim) tensors), positions to read. Sequence b owns segments
// seg_start[b] .. seg_start[b+1]-1, its own segment last; the new row goes at that segment's
// last position.

// NVRTC has no <math.h>.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define WARPS_A 4
#define GMAX 8
#define PER 4

struct Bf16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float ld(T x) { return __uint_as_float(((unsigned)x) << 16); }
    static __device__ __forceinline__ T st(float f) {
        unsigned u = __float_as_uint(f);
        u += 0x7fffu + ((u >> 16) & 1u); // round to nearest even
        return (T)(u >> 16);
    }
};
struct F16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float ld(T x) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    }
    static __device__ __forceinline__ T st(float f) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};
struct F32 {
    typedef float T;
    static __device__ __forceinline__ float ld(T x) { return x; }
    static __device__ __forceinline__ T st(float f) { return f; }
};

template <typename D>
__device__ void decode_attention(const typename D::T *__restrict__ q,
                                 const typename D::T *__restrict__ k_new,
                                 const typename D::T *__restrict__ v_new,
                                 const unsigned long long *__restrict__ table,
                                 const int *__restrict__ seg_start, typename D::T *__restrict__ out,
                                 int n_heads, int n_kv, int head_dim, float scale) {
    typedef typename D::T T;
    __shared__ float sm_m[WARPS_A][GMAX];
    __shared__ float sm_l[WARPS_A][GMAX];
    __shared__ float sm_acc[WARPS_A][GMAX][32 * PER];

    const int b = blockIdx.x, h = blockIdx.y;
    const int groups = n_heads / n_kv;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int s0 = seg_start[b], s1 = seg_start[b + 1];
    const size_t row = (size_t)n_kv * head_dim;

    // 1. The new key and value rows into the own segment's last position.
    {
        const unsigned long long *own = table + 3 * (s1 - 1);
        T *kd = (T *)own[0];
        T *vd = (T *)own[1];
        const size_t at = (size_t)(own[2] - 1) * row + (size_t)h * head_dim;
        const size_t from = (size_t)b * row + (size_t)h * head_dim;
        for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
            kd[at + i] = k_new[from + i];
            vd[at + i] = v_new[from + i];
        }
    }
    __syncthreads();

    // 2. Each warp: an online softmax over every WARPS_A-th position, for G query heads.
    float qv[GMAX][PER], acc[GMAX][PER], m[GMAX], l[GMAX];
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int e = 0; e < PER; ++e) {
            const int d = lane + 32 * e;
            const int head = h * groups + g;
            qv[g][e] = (g < groups && d < head_dim)
                           ? D::ld(q[((size_t)b * n_heads + head) * head_dim + d]) * scale
                           : 0.f;
            acc[g][e] = 0.f;
        }
    }
    for (int s = s0; s < s1; ++s) {
        const T *kb = (const T *)table[3 * s];
        const T *vb = (const T *)table[3 * s + 1];
        const int len = (int)table[3 * s + 2];
        for (int i = warp; i < len; i += WARPS_A) {
            const size_t base = (size_t)i * row + (size_t)h * head_dim;
            float kk[PER], vv[PER];
#pragma unroll
            for (int e = 0; e < PER; ++e) {
                const int d = lane + 32 * e;
                kk[e] = d < head_dim ? D::ld(kb[base + d]) : 0.f;
                vv[e] = d < head_dim ? D::ld(vb[base + d]) : 0.f;
            }
#pragma unroll
            for (int g = 0; g < GMAX; ++g) {
                if (g >= groups) break;
                float dot = 0.f;
#pragma unroll
                for (int e = 0; e < PER; ++e) dot += qv[g][e] * kk[e];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
                const float m_new = fmaxf(m[g], dot);
                const float c = expf(m[g] - m_new);
                const float p = expf(dot - m_new);
                l[g] = l[g] * c + p;
#pragma unroll
                for (int e = 0; e < PER; ++e) acc[g][e] = acc[g][e] * c + p * vv[e];
                m[g] = m_new;
            }
        }
    }

    // 3. Merge the warps' partial softmaxes.
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
        if (lane == 0) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
#pragma unroll
        for (int e = 0; e < PER; ++e) sm_acc[warp][g][lane + 32 * e] = acc[g][e];
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < groups * head_dim; idx += blockDim.x) {
        const int g = idx / head_dim, d = idx % head_dim;
        float mx = -INFINITY;
        for (int w = 0; w < WARPS_A; ++w) mx = fmaxf(mx, sm_m[w][g]);
        float total = 0.f, o = 0.f;
        for (int w = 0; w < WARPS_A; ++w) {
            const float c = sm_m[w][g] == -INFINITY ? 0.f : expf(sm_m[w][g] - mx);
            total += sm_l[w][g] * c;
            o += sm_acc[w][g][d] * c;
        }
        const int head = h * groups + g;
        out[((size_t)b * n_heads + head) * head_dim + d] = D::st(o / total);
    }
}

#define ENTRY(name, D)                                                                          \
    extern "C" __global__ void name(const D::T *q, const D::T *k_new, const D::T *v_new,        \
                                    const unsigned long long *table, const int *seg_start,      \
                                    D::T *out, int n_heads, int n_kv, int head_dim,             \
                                    float scale) {                                              \
        decode_attention<D>(q, k_new, v_new, table, seg_start, out, n_heads, n_kv, head_dim,   \
                            scale);                                                             \
    }

ENTRY(verity_decode_attention_bf16, Bf16)
ENTRY(verity_decode_attention_f16, F16)
ENTRY(verity_decode_attention_f32, F32)
