//! Kernel timings on the shapes of the models in models/ (not a test: run with
//! `cargo test --release --lib qmatmul::timing -- --ignored --nocapture`).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};

use super::*;

/// CPU time of this thread in ns (Linux), 0 elsewhere.
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Batch-1 products over ~100 MB of distinct weights, as a decode step streams them.
#[test]
#[ignore]
fn timing_streaming() {
    let (n, k) = (1536, 576);
    let ty = GgmlDType::Q4_1;
    let count = 180; // 180 × 0.55 MB
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let w = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), ty).unwrap();
    let ws: Vec<PackedWeight> = (0..count)
        .map(|_| PackedWeight::new(&w).unwrap().unwrap())
        .collect();
    let x: Vec<f32> = (0..k)
        .map(|i| ((i * 31) % 200) as f32 / 100.0 - 1.0)
        .collect();
    for _ in 0..3 {
        let (start, start_cpu) = (Instant::now(), thread_cpu_ns());
        for w in &ws {
            std::hint::black_box(driver::run_packed(Isa::detect(), w, &x, 1).unwrap());
        }
        let wall = start.elapsed().as_secs_f64();
        let cpu = (thread_cpu_ns() - start_cpu) as f64 * 1e-9;
        let bytes = (count * ws[0].size_in_bytes()) as f64;
        println!(
            "streaming {count} x Q4_1 {n}x{k}: {:.2} ms wall ({:.1} GB/s), {:.2} ms this thread",
            wall * 1e3,
            bytes / wall / 1e9,
            cpu * 1e3
        );
    }
}

#[test]
#[ignore]
fn timing() {
    let shapes = [
        (GgmlDType::Q4_1, 576, 576),
        (GgmlDType::Q4_1, 1536, 576),
        (GgmlDType::Q4_1, 576, 1536),
        (GgmlDType::Q8_0, 49152, 576),
        (GgmlDType::Q5_0, 4864, 896),
        (GgmlDType::Q4K, 4864, 896 * 2),
        (GgmlDType::Q6K, 896, 4864),
    ];
    let filter = std::env::var("QMATMUL_TIMING").unwrap_or_default();
    for (ty, n, k) in shapes {
        if !filter.is_empty() && !format!("{ty:?}").contains(&filter) {
            continue;
        }
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let w = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), ty).unwrap();
        let packed = PackedWeight::new(&w).unwrap();
        for m in [1, 16, 64] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31) % 200) as f32 / 100.0 - 1.0)
                .collect();
            let x = Tensor::from_vec(x, (m, k), &Device::Cpu).unwrap();
            let iters = (1e9 / (n * k * m) as f64).clamp(3.0, 2000.0) as usize;
            let (mut wall, mut cpu) = (f64::MAX, f64::MAX);
            for _ in 0..3 {
                let (start, start_cpu) = (Instant::now(), thread_cpu_ns());
                for _ in 0..iters {
                    std::hint::black_box(match &packed {
                        Some(p) => p.forward(&x).unwrap(),
                        None => unreachable!("every timed type is repacked"),
                    });
                }
                wall = wall.min(start.elapsed().as_secs_f64() / iters as f64);
                cpu = cpu.min((thread_cpu_ns() - start_cpu) as f64 * 1e-9 / iters as f64);
            }
            // With RAYON_NUM_THREADS=1 all work runs on this thread, and its CPU
            // time is what the kernels cost even when other processes share the cores.
            println!(
                "{ty:?} {n}x{k} m={m}: {:.1} us wall, {:.1} us this thread; {:.1} GMAC/s per thread CPU",
                wall * 1e6,
                cpu * 1e6,
                (n * k * m) as f64 / cpu / 1e9
            );
        }
    }
}
