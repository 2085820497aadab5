//! The kernels against softmax attention computed in f64.

use half::f16;

use super::*;

/// Deterministic values in (-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// softmax(q·k · scale) · v per head, in f64 from the f32 values.
fn reference(keys: &[Vec<f32>], vals: &[Vec<f32>], q: &[f32], hd: usize, scale: f32) -> Vec<f64> {
    let mut out = Vec::new();
    for q in q.chunks_exact(hd) {
        let s: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter()
                    .zip(k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let z: f64 = e.iter().sum();
        for d in 0..hd {
            out.push(e.iter().zip(vals).map(|(w, v)| w / z * v[d] as f64).sum());
        }
    }
    out
}

fn check<T: KvElement>(convert: impl Fn(f32) -> T, back: impl Fn(&T) -> f32) {
    for (hd, groups, keys) in [
        (64, 3, 72),
        (64, 7, 5),
        (128, 1, 33),
        (16, 9, 200),
        (24, 2, 1),
        (64, 3, 6),
        (40, 4, 3),
    ] {
        let ks: Vec<Vec<T>> = (0..keys)
            .map(|j| values(hd, j as u64 + 1).into_iter().map(&convert).collect())
            .collect();
        let vs: Vec<Vec<T>> = (0..keys)
            .map(|j| {
                values(hd, 1000 + j as u64)
                    .into_iter()
                    .map(&convert)
                    .collect()
            })
            .collect();
        let q: Vec<f32> = values(groups * hd, 7).iter().map(|v| 4.0 * v).collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let rows: Vec<(&[T], &[T])> = ks.iter().zip(&vs).map(|(k, v)| (&k[..], &v[..])).collect();
        let mut scores = vec![0f32; groups * keys];
        let mut portable = vec![0f32; groups * hd];
        attend_portable::<T>(&rows, hd, scale, &q, &mut scores, &mut portable);
        let as_f32 = |r: &Vec<Vec<T>>| -> Vec<Vec<f32>> {
            r.iter().map(|r| r.iter().map(&back).collect()).collect()
        };
        let want = reference(&as_f32(&ks), &as_f32(&vs), &q, hd, scale);
        let err = |got: &[f32]| {
            got.iter()
                .zip(&want)
                .fold(0f64, |e, (g, w)| e.max((*g as f64 - w).abs()))
        };
        assert!(
            err(&portable) < 2e-6,
            "portable hd {hd} G {groups}: {}",
            err(&portable)
        );
        #[cfg(target_arch = "x86_64")]
        if let Some(kind) = T::SIMD.filter(|_| x86::fits(hd)) {
            let mut simd = vec![0f32; groups * hd];
            // SAFETY: `fits` checked the features and the head size.
            unsafe { x86::attend(kind, &rows, hd, scale, &q, &mut scores, &mut simd) };
            assert!(err(&simd) < 2e-6, "x86 hd {hd} G {groups}: {}", err(&simd));
        }
    }
}

#[test]
fn both_kernels_match_softmax_attention_in_f64() {
    check::<f32>(|v| v, |v| *v);
    check::<f16>(f16::from_f32, |v| v.to_f32());
    check::<half::bf16>(half::bf16::from_f32, |v| v.to_f32());
}
