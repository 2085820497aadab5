//! A timing harness, not a test: a decode step's attention with a cold cache.

use half::f16;

use super::*;

/// Attention as a batch-16 decode step of SmolLM2 meets it: 16 sequences × 30 layers,
/// 3 KV heads of 64, 40 visible positions, the cache evicted by ~2.8 MB of "weights"
/// streamed between layers. Not a test: `cargo test --release --lib
/// attention_with_a_cold_cache -- --ignored --nocapture`.
#[test]
#[ignore]
fn attention_with_a_cold_cache() {
    let (seqs, layers, nkv, hd, positions, keys, groups) = (16, 30, 3, 64, 72, 40, 3);
    let kv: Vec<Vec<(Vec<f16>, Vec<f16>)>> = (0..layers)
        .map(|l| {
            (0..seqs)
                .map(|s| {
                    let v = |o: usize| {
                        (0..positions * nkv * hd)
                            .map(|i| {
                                f16::from_f32(((i * 31 + s * 7 + l + o) % 97) as f32 / 97.0 - 0.5)
                            })
                            .collect::<Vec<_>>()
                    };
                    (v(0), v(1))
                })
                .collect()
        })
        .collect();
    let mut weights = vec![1u8; 96 << 20];
    let q: Vec<f32> = (0..groups * hd)
        .map(|i| (i % 13) as f32 / 13.0 - 0.5)
        .collect();
    let mut out = vec![0f32; groups * hd];
    let mut scores = vec![0f32; groups * keys];
    for round in 0..3 {
        let mut spent = std::time::Duration::ZERO;
        let mut per_head = [std::time::Duration::ZERO; 3];
        let mut sink = 0u64;
        for _step in 0..20 {
            for (l, layer) in kv.iter().enumerate() {
                // A layer's weights stream through the caches between its attentions.
                let w = &mut weights[(l * 2_900_000) % (90 << 20)..][..2_900_000];
                for c in w.chunks(64) {
                    sink = sink.wrapping_add(c[0] as u64);
                }
                let t = std::time::Instant::now();
                for (k, v) in layer {
                    for (h, spent_on_head) in per_head.iter_mut().enumerate() {
                        let th = std::time::Instant::now();
                        let rows: Vec<(&[f16], &[f16])> = (0..keys)
                            .map(|r| {
                                let at = (r * nkv + h) * hd;
                                (&k[at..at + hd], &v[at..at + hd])
                            })
                            .collect();
                        // SAFETY: this machine's features, checked first.
                        assert!(x86::fits(hd));
                        unsafe {
                            x86::attend(x86::Kind::F16, &rows, hd, 0.125, &q, &mut scores, &mut out)
                        };
                        *spent_on_head += th.elapsed();
                    }
                }
                spent += t.elapsed();
                std::hint::black_box(&mut out);
            }
            weights[sink as usize % 1000] ^= 1;
        }
        let per_task = spent.as_nanos() as f64 / (20 * layers * seqs * nkv) as f64;
        let ph = per_head.map(|d| d.as_nanos() as f64 / (20 * layers * seqs) as f64);
        // The same task again and again, its rows in L1.
        let (k, v) = &kv[0][0];
        let rows: Vec<(&[f16], &[f16])> = (0..keys)
            .map(|r| (&k[r * nkv * hd..][..hd], &v[r * nkv * hd..][..hd]))
            .collect();
        let t = std::time::Instant::now();
        for _ in 0..10_000 {
            // SAFETY: as above.
            unsafe { x86::attend(x86::Kind::F16, &rows, hd, 0.125, &q, &mut scores, &mut out) };
            std::hint::black_box(&mut out);
        }
        let hot = t.elapsed().as_nanos() as f64 / 10_000.0;
        eprintln!(
            "round {round}: {per_task:.0} ns a task, by KV head {ph:.0?} (in a row's order); {hot:.0} ns with the rows in L1"
        );
    }
}
