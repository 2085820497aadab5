//! Unit tests of the whole module: every instruction-set level against the scalar
//! reference, against candle's `QMatMul` and the f32 product; batch independence of
//! every row; and `forward`'s shapes, dtypes and refusals.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::Module;

use super::*;

const TYPES: [GgmlDType; 5] = [
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q6K,
];

/// Deterministic values in (-1, 1), with some larger outliers as real activations have.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            if i.is_multiple_of(97) {
                4.0 * v
            } else {
                v
            }
        })
        .collect()
}

fn weight(ty: GgmlDType, n: usize, k: usize, seed: u64) -> QTensor {
    let w = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
    QTensor::quantize(&w, ty).unwrap()
}

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Scalar];
    #[cfg(target_arch = "x86_64")]
    v.extend(x86::Simd::all().into_iter().map(Isa::X86));
    v
}

/// Our product, on the repacked weight.
fn ours(isa: Isa, w: &QTensor, x: &[f32], m: usize) -> Vec<f32> {
    let p = PackedWeight::new(w).unwrap().unwrap();
    driver::run_packed(isa, &p, x, m).unwrap()
}

fn is_packed(ty: GgmlDType) -> bool {
    packed::PackedType::of(ty).is_some()
}

fn is_k(ty: GgmlDType) -> bool {
    matches!(ty, GgmlDType::Q4K | GgmlDType::Q6K)
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
}

/// ‖a − b‖ / ‖b‖.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f32 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

/// Largest |a − b| relative to the largest |b|.
fn max_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |s, v| s.max(v.abs()));
    a.iter().zip(b).fold(0f32, |e, (x, y)| e.max((x - y).abs())) / scale
}

fn shapes(ty: GgmlDType) -> (usize, usize) {
    match ty {
        GgmlDType::Q4K | GgmlDType::Q6K => (48, 768),
        // A last column group of 8 (40 = 16 + 16 + 8), 5 blocks.
        _ => (40, 160),
    }
}

#[test]
fn simd_matches_scalar() {
    for ty in TYPES {
        let (n, k) = shapes(ty);
        let w = weight(ty, n, k, 1);
        for m in [1, 3, 8, 17] {
            let x = values(m * k, 100 + m as u64);
            let levels = isas();
            let results: Vec<Vec<f32>> = levels.iter().map(|&isa| ours(isa, &w, &x, m)).collect();
            for (isa, y) in levels.iter().zip(&results).skip(1) {
                // Repacked weights: every level runs the scalar kernel's operations.
                if is_packed(ty) {
                    assert!(
                        same_bits(y, &results[0]),
                        "{ty:?} {isa:?} m={m}: not the scalar bits"
                    );
                }
                let e = max_err(y, &results[0]);
                assert!(e < 1e-4, "{ty:?} {isa:?} m={m}: max error {e}");
            }
            // AVX-VNNI computes the same integers as AVX2 in the same order, so the
            // same floats.
            #[cfg(target_arch = "x86_64")]
            if let [_, Isa::X86(x86::Simd::Avx2(_)), Isa::X86(x86::Simd::AvxVnni(_)), ..] =
                levels[..]
            {
                assert!(same_bits(&results[1], &results[2]));
            }
        }
    }
}

#[test]
fn activation_blocks_are_the_same_on_every_level() {
    // Random blocks, a block of zeros, one whose largest value is negative, and one of
    // exact ties: with max 127 the scale is 1, so v + 0.5 must round to the even side.
    let mut x = values(32 * 12, 7);
    x.extend([0.0; 32]);
    x.extend((0..32).map(|i| if i == 5 { -3.0 } else { i as f32 / 16.0 }));
    x.extend((0..32).map(|i| {
        if i == 0 {
            127.0
        } else {
            (i as f32 - 16.0) + 0.5
        }
    }));
    let blocks = x.len() / 32;
    let reference: Vec<packed::Q8Block> = x.chunks(32).map(packed::quantize_block).collect();
    // The scalar reference itself on the ties: round half to even.
    let ties = &reference[blocks - 1];
    assert_eq!(ties.d, 1.0);
    for i in 1..32 {
        let v = i as f32 - 16.0 + 0.5;
        let even = if (v - 0.5) as i32 % 2 == 0 {
            v - 0.5
        } else {
            v + 0.5
        };
        assert_eq!(ties.qs[i] as f32, even, "value {v}");
    }
    for isa in isas() {
        let mut got = vec![packed::Q8Block::ZERO; blocks];
        packed::quantize_row(isa, &x, &mut got);
        for (b, (g, r)) in got.iter().zip(&reference).enumerate() {
            assert_eq!(g.qs, r.qs, "{isa:?} block {b}");
            assert_eq!(
                (g.d.to_bits(), g.s.to_bits(), g.sum),
                (r.d.to_bits(), r.s.to_bits(), r.sum),
                "{isa:?} block {b}"
            );
        }
    }
}

#[test]
fn repacking_keeps_every_value() {
    for ty in TYPES {
        // 37 columns: a last group of 5; 3 blocks per column (2 super-blocks).
        let k = if is_k(ty) { 512 } else { 96 };
        let w = weight(ty, 37, k, 7);
        let p = PackedWeight::new(&w).unwrap().unwrap();
        assert_eq!((p.shape(), p.dtype()), ((37, k), ty));
        let theirs: Vec<f32> = w
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(same_bits(&p.dequantize(), &theirs), "{ty:?}");
        // Bytes per value as in the GGUF blocks (within the padding of the last group).
        let gguf = w.storage_size_in_bytes() as f64 / 37.0;
        let ours = p.size_in_bytes() as f64 / 48.0;
        // (Q4_K's scales and mins take a byte each: 2,368 bytes a tile, not 16 · 144.)
        let allowed = if ty == GgmlDType::Q4K {
            gguf * 2368.0 / 2304.0
        } else {
            gguf
        };
        assert!(
            (ours - allowed).abs() < 1e-9,
            "{ty:?}: {ours} bytes a column, GGUF {gguf}"
        );
    }
    // Other types are not repacked.
    assert!(PackedWeight::new(&weight(GgmlDType::Q5K, 8, 256, 8))
        .unwrap()
        .is_none());
}

#[test]
fn close_to_candle_and_to_dense() {
    for ty in TYPES {
        let (n, k) = shapes(ty);
        let w = weight(ty, n, k, 2);
        let dense = w.dequantize(&Device::Cpu).unwrap();
        let candle = QMatMul::from_qtensor(weight(ty, n, k, 2)).unwrap();
        for m in [1, 3, 8, 17] {
            let x = values(m * k, 200 + m as u64);
            let xt = Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
            let exact: Vec<f32> = xt
                .matmul(&dense.t().unwrap())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let theirs: Vec<f32> = candle
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for isa in isas() {
                let y = ours(isa, &w, &x, m);
                // Both quantize activations to 8 bits in the same way, but candle keeps
                // f16 scales for the 32-value types. The f32 product has no activation
                // rounding at all, and 256-value blocks round coarser.
                let k_quant = matches!(ty, GgmlDType::Q4K | GgmlDType::Q6K);
                let (tc, td) = if k_quant { (1e-5, 2e-2) } else { (2e-3, 1e-2) };
                let (ec, ed) = (rel_err(&y, &theirs), rel_err(&y, &exact));
                assert!(ec < tc, "{ty:?} {isa:?} m={m}: {ec} from candle");
                assert!(ed < td, "{ty:?} {isa:?} m={m}: {ed} from the f32 product");
            }
        }
    }
}

#[test]
fn a_row_does_not_depend_on_its_batch() {
    for ty in TYPES {
        // Big enough that m = 17 runs on several threads; an odd number of 32-value
        // blocks for the 512-bit kernels' last half pair.
        let k = if ty.block_size() == 32 { 544 } else { 512 };
        // 17 column groups of 16 (an odd number: a last kernel call of one group).
        let n = 272;
        let w = weight(ty, n, k, 3);
        let m = 17;
        let x = values(m * k, 300);
        for isa in isas() {
            let batch = ours(isa, &w, &x, m);
            for i in 0..m {
                let alone = ours(isa, &w, &x[i * k..(i + 1) * k], 1);
                let row = &batch[i * n..(i + 1) * n];
                assert!(
                    same_bits(row, &alone),
                    "{ty:?} {isa:?}: row {i} differs in a batch of {m}"
                );
            }
            // And in a batch of 3 that starts at another offset of the tile.
            let three = ours(isa, &w, &x[5 * k..8 * k], 3);
            assert!(same_bits(&three, &batch[5 * n..8 * n]));
        }
    }
}

#[test]
fn forward_keeps_shape_and_dtype_and_rejects_what_it_cannot_do() {
    let x = Tensor::from_vec(values(2 * 3 * 256, 5), (2, 3, 256), &Device::Cpu).unwrap();
    let bad = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
    let q4k = PackedWeight::new(&weight(GgmlDType::Q4K, 8, 256, 4))
        .unwrap()
        .unwrap();
    let q4_1 = PackedWeight::new(&weight(GgmlDType::Q4_1, 8, 256, 4))
        .unwrap()
        .unwrap();
    type Product<'a> = Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>;
    let products: [Product; 2] = [Box::new(|x| q4k.forward(x)), Box::new(|x| q4_1.forward(x))];
    for f in &products {
        let y = f(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, 8]);
        let flat = f(&x.reshape((6, 256)).unwrap()).unwrap();
        let (a, b): (Vec<f32>, Vec<f32>) = (
            y.flatten_all().unwrap().to_vec1().unwrap(),
            flat.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(a, b);
        let half = f(&x.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(half.dtype(), DType::BF16);
        // Wrong inner size.
        assert!(f(&bad).is_err());
    }
    // A type without a kernel here.
    let q4_0 = weight(GgmlDType::Q4_0, 8, 64, 6);
    assert!(PackedWeight::new(&q4_0).unwrap().is_none());
    // Weights that take different activation blocks, on one input: each as alone.
    let many = PackedWeight::forward_many(&[&q4k, &q4_1], &x).unwrap();
    for (y, w) in many.iter().zip([&q4k, &q4_1]) {
        let alone = w.forward(&x).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            alone.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
