//! Decode and prefill speed on a real GGUF, next to the machine's memory-bandwidth roofline.
//!
//! `cargo bench --bench decode [-- MODEL.gguf]` (default: SmolLM2-135M Q4_1 in models/).
//! Single-sequence decode reads every weight once per token, so its ceiling is
//! bandwidth / bytes-per-token; the report gives the fraction of it reached.

use std::time::Instant;

use verity::model::StepInput;
use verity::{LoadOptions, Model};

/// Read bandwidth in bytes/s: all cores summing a 512 MiB buffer, best of 5.
fn measure_bandwidth() -> f64 {
    let words: usize = 64 << 20; // 512 MiB of u64
    let buf: Vec<u64> = (0..words as u64).collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut best = 0f64;
    for _ in 0..5 {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(words.div_ceil(threads))
                .map(|chunk| s.spawn(move || chunk.iter().fold(0u64, |a, &x| a.wrapping_add(x))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(0))
                .fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max((words * 8) as f64 / start.elapsed().as_secs_f64());
    }
    best
}

/// CPU time of all this process's threads, in seconds (Linux; 0 elsewhere). Unlike wall
/// time it barely moves when other processes share the cores; run with
/// VERITY_THREADS=1 RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 to leave out threads that
/// spin while idle.
fn process_cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 * 1e-9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    verity::pin_thread_count();
    let path = std::env::args()
        .skip(1)
        .find(|a| a.ends_with(".gguf") || std::path::Path::new(a).is_dir())
        .unwrap_or_else(|| verity::runtime::DEFAULT_MODEL.into());
    // `-- --device cuda:0` (the device option as everywhere; the CPU by default).
    let args: Vec<String> = std::env::args().collect();
    let device = match args.windows(2).find(|w| w[0] == "--device") {
        Some(w) => match w[1].parse::<verity::DeviceSpec>().and_then(|d| d.resolve()) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("--device: {e}");
                std::process::exit(2);
            }
        },
        None => candle_core::Device::Cpu,
    };
    let options = LoadOptions {
        device,
        format: if std::env::var("VERITY_DENSE").is_ok() {
            verity::WeightFormat::Dense
        } else {
            verity::WeightFormat::Quantized
        },
        ..Default::default()
    };
    let model = match Model::load(&path, &options) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot load {path}: {e} (run models/fetch.sh)");
            std::process::exit(1);
        }
    };
    let t = &model.transformer;
    let prompt: Vec<u32> = model
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog. ", false)
        .unwrap()
        .into_iter()
        .cycle()
        .take(128)
        .collect();

    // Prefill: 128 tokens in one step.
    let mut prefill = Vec::new();
    for _ in 0..5 {
        let mut kv = t.new_kv();
        let start = Instant::now();
        t.forward_step(&mut [StepInput {
            tokens: &prompt,
            kv: &mut kv,
            adapter: None,
            all_logits: false,
        }])
        .unwrap();
        prefill.push(prompt.len() as f64 / start.elapsed().as_secs_f64());
    }

    // Decode: 128 single-token steps after a 16-token prompt, logits copied to the host
    // as a sampler would.
    let mut decode = Vec::new();
    let mut decode_cpu = Vec::new();
    for _ in 0..3 {
        let mut kv = t.new_kv();
        kv.reserve(16 + 128).unwrap();
        t.forward_step(&mut [StepInput {
            tokens: &prompt[..16],
            kv: &mut kv,
            adapter: None,
            all_logits: false,
        }])
        .unwrap();
        let mut token = prompt[16];
        let start = Instant::now();
        let start_cpu = process_cpu_seconds();
        for _ in 0..128 {
            let logits = t
                .forward_step(&mut [StepInput {
                    tokens: &[token],
                    kv: &mut kv,
                    adapter: None,
                    all_logits: false,
                }])
                .unwrap();
            let row: Vec<f32> = logits.squeeze(0).unwrap().to_vec1().unwrap();
            token = verity::sampling::argmax(&row);
        }
        decode.push(128.0 / start.elapsed().as_secs_f64());
        decode_cpu.push((process_cpu_seconds() - start_cpu) / 128.0);
    }

    let bandwidth = measure_bandwidth();
    let bytes = t.weight_bytes_per_token() as f64;
    let roofline = bandwidth / bytes;
    let decode = median(decode);
    println!("model:        {path} ({})", t.weight_types());
    println!(
        "prefill:      {:.0} tok/s (128-token prompt, median of 5)",
        median(prefill)
    );
    println!("decode:       {decode:.1} tok/s (batch 1, 128 tokens, median of 3)");
    println!(
        "decode CPU:   {:.2} ms per token, all threads together",
        1e3 * median(decode_cpu)
    );
    println!(
        "bandwidth:    {:.1} GB/s measured ({} threads)",
        bandwidth / 1e9,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("weights read: {:.1} MB per token", bytes / 1e6);
    println!(
        "roofline:     {roofline:.0} tok/s; decode reaches {:.0}% of it",
        100.0 * decode / roofline
    );
}
