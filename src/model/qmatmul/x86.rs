//! The x86-64 instruction-set levels the kernels (`packed_x86`, `packed_k_x86`) are built
//! for, detected at run time: [`Simd`] is a token that proves the CPU has them.

/// Proof of the CPU's features, and the kernels they allow: only [`Simd::detect`]
/// makes one.
#[derive(Debug, Clone, Copy)]
pub(super) enum Simd {
    /// AVX2, FMA and F16C.
    Avx2(Private),
    /// And AVX-VNNI (256-bit `vpdpbusd`).
    AvxVnni(Private),
    /// And AVX-512 F/BW/VL/VNNI: 512-bit kernels.
    Avx512(Private),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Private(());

impl Simd {
    /// The best level this CPU has; `VERITY_QMATMUL_SIMD=avx2|avxvnni` caps it.
    pub(super) fn detect() -> Option<Self> {
        if !(is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        {
            return None;
        }
        let cap = std::env::var("VERITY_QMATMUL_SIMD").unwrap_or_default();
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        Some(if avx512 && cap.is_empty() {
            Simd::Avx512(Private(()))
        } else if is_x86_feature_detected!("avxvnni") && cap != "avx2" {
            Simd::AvxVnni(Private(()))
        } else {
            Simd::Avx2(Private(()))
        })
    }

    /// Every level this CPU has, lowest first (for tests).
    #[cfg(test)]
    pub(super) fn all() -> Vec<Self> {
        let Some(best) = Self::detect() else {
            return Vec::new();
        };
        let mut v = vec![Simd::Avx2(Private(()))];
        if is_x86_feature_detected!("avxvnni") {
            v.push(Simd::AvxVnni(Private(())));
        }
        if let Simd::Avx512(_) = best {
            v.push(best);
        }
        v
    }
}
