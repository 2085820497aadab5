//! Fuzzing the file parsers a user or client can point verity at: GGUF files, HF folders
//! (safetensors header, config.json), PEFT adapter folders (adapter_config.json and the
//! tensor file). Every mutant of a valid file must load or be refused with an error; none
//! may panic (a panic across the C ABI is caught, but in the HTTP server's adapter loads it
//! would be a 500, and an abort would take the host down). Also: the tokenizer's cheap
//! lower bound on a text's tokens never exceeds the real count.
//!
//! `VERITY_FUZZ_CASES=N` sets the cases per target (default: a CI-sized campaign).

mod common;
use common::fuzz;
use common::*;

use std::path::Path;

use candle_core::{DType, Device};
use verity::adapter::{load_peft, save_peft, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE};
use verity::model::config::Architecture;
use verity::model::{LoraAdapter, LoraSpec, LoraTarget, WeightFormat};
use verity::{LoadOptions, Model};

fn dense() -> LoadOptions {
    LoadOptions {
        format: WeightFormat::Dense,
        dtype: Some(DType::F32),
        ..Default::default()
    }
}

/// Tokens that make structure out of a mutant: JSON values at their edges, and the GGUF
/// type tags and key names.
const JSON_TOKENS: &[&[u8]] = &[
    b"null",
    b"true",
    b"-1",
    b"0",
    b"1e308",
    b"-1e308",
    b"18446744073709551616",
    b"4294967296",
    b"\"\"",
    b"\"x\"",
    b"[]",
    b"{}",
    b"NaN",
    b"\"\\ud800\"",
    b"\"\\u0000\"",
    b"\"q_proj\"",
    b"\"lora_alpha\": ",
    b"\"r\": ",
    b"\"target_modules\": ",
    b"\"dtype\": \"F16\"",
    b"\"shape\": [4294967295, 4294967295]",
    b"\"data_offsets\": [0, 18446744073709551615]",
    b"\"num_hidden_layers\": ",
    b"\"rope_scaling\": ",
];

const GGUF_TOKENS: &[&[u8]] = &[
    b"GGUF",
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0, 0, 0, 0, 0, 0, 0, 0],
    &[9, 0, 0, 0],
    &[8, 0, 0, 0],
    b"llama.block_count",
    b"general.alignment",
    b"tokenizer.ggml.tokens",
];

#[test]
fn gguf_files() {
    let dir = temp_dir("fuzz-gguf");
    let config = tiny_config(Architecture::Llama);
    let seed = dir.join("seed.gguf");
    write_tiny_gguf(&seed, &config, &tiny_weights(&config, 3), None);
    let bytes = std::fs::read(&seed).unwrap();
    // The header (metadata and tensor infos) comes first; the data after it.
    let focus = header_len_guess(&bytes);
    // Inputs that once panicked, replayed first (each must now be refused).
    let corpus = repo().join("tests/fuzz-corpus/gguf");
    let mut found: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    found.sort();
    assert!(
        found.len() >= 4,
        "the corpus in {} is missing",
        corpus.display()
    );
    for p in &found {
        let err = Model::load(p, &dense()).err().map(|e| e.to_string());
        assert!(err.is_some(), "{} loaded", p.display());
    }
    let mut seeds = vec![bytes];
    seeds.extend(found.iter().map(|p| std::fs::read(p).unwrap()));
    let path = dir.join("mutant.gguf");
    let (mut loaded, mut refused) = (0, 0);
    fuzz::run(
        "gguf",
        &seeds,
        GGUF_TOKENS,
        focus,
        fuzz::cases(1500),
        |input| {
            std::fs::write(&path, input).unwrap();
            match Model::load(&path, &dense()) {
                Ok(_) => loaded += 1,
                Err(_) => refused += 1,
            }
        },
    );
    println!("gguf: {loaded} loaded, {refused} refused");
    assert!(
        refused > 0 && loaded > 0,
        "{loaded} loaded, {refused} refused"
    );
}

/// Where the tensor data of a tiny GGUF starts, roughly: the header holds the tokenizer's
/// strings, so take the offset of the last tensor name plus a margin.
fn header_len_guess(bytes: &[u8]) -> usize {
    let needle = b"output_norm.weight";
    bytes
        .windows(needle.len())
        .rposition(|w| w == needle)
        .map_or(bytes.len(), |p| p + 256)
}

#[test]
fn hf_folders() {
    let dir = temp_dir("fuzz-hf");
    let config = tiny_config(Architecture::Qwen2);
    let weights = tiny_weights(&config, 4);
    let gguf = dir.join("tiny.gguf");
    write_tiny_gguf(&gguf, &config, &weights, None);
    let tokenizer = Model::load(&gguf, &dense())
        .unwrap()
        .tokenizer
        .to_json()
        .unwrap();
    let seed = dir.join("seed");
    write_tiny_hf(&seed, &config, &weights, &tokenizer);
    let mutant = dir.join("mutant");
    write_tiny_hf(&mutant, &config, &weights, &tokenizer);
    for file in ["model.safetensors", "config.json"] {
        fuzz_file_in_folder(&seed, &mutant, file, fuzz::cases(1000), |dir| {
            Model::load(dir, &dense()).is_ok()
        });
    }
}

/// Fuzzes one file of a folder (`seed` holds the valid one): each mutant is written into
/// `mutant` (a copy of the folder) and `loads` must return without panicking, loading
/// some mutants and refusing others. A JSON file is mutated anywhere, a safetensors file
/// mostly in its 8-byte length and JSON header.
fn fuzz_file_in_folder(
    seed: &Path,
    mutant: &Path,
    file: &str,
    cases: usize,
    mut loads: impl FnMut(&Path) -> bool,
) {
    let bytes = std::fs::read(seed.join(file)).unwrap();
    let focus = if file.ends_with(".json") {
        bytes.len()
    } else {
        8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
    };
    let (mut loaded, mut refused) = (0, 0);
    fuzz::run(
        file,
        std::slice::from_ref(&bytes),
        JSON_TOKENS,
        focus,
        cases,
        |input| {
            std::fs::write(mutant.join(file), input).unwrap();
            if loads(mutant) {
                loaded += 1;
            } else {
                refused += 1;
            }
        },
    );
    std::fs::write(mutant.join(file), &bytes).unwrap();
    println!("{file}: {loaded} loaded, {refused} refused");
    assert!(
        refused > 0 && loaded > 0,
        "{file}: {loaded} loaded, {refused} refused"
    );
}

#[test]
fn adapter_folders() {
    let root = temp_dir("fuzz-adapter");
    let config = tiny_config(Architecture::Llama);
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        targets: vec![LoraTarget::Q, LoraTarget::V, LoraTarget::Down],
        use_rslora: false,
    };
    let adapter = LoraAdapter::new(&config, spec, DType::F32, &Device::Cpu).unwrap();
    let seed = root.join("seed");
    save_peft(&adapter, &config, &seed, "").unwrap();
    let mutant = root.join("mutant");
    save_peft(&adapter, &config, &mutant, "").unwrap();
    for file in [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE] {
        fuzz_file_in_folder(&seed, &mutant, file, fuzz::cases(2000), |dir| {
            load(dir, &config).is_ok()
        });
    }
}

fn load(dir: &Path, config: &verity::model::config::ModelConfig) -> verity::Result<LoraAdapter> {
    load_peft(dir, config, DType::F32, &Device::Cpu)
}

/// `Tokenizer::tokens_at_least` is a lower bound: checked against real tokenization on
/// mutants of text with long whitespace and punctuation runs, words, digits, special
/// tokens and non-ASCII text, for SmolLM2 and (when present) Qwen2.5's tokenizer.
#[test]
fn token_lower_bound_never_exceeds_the_real_count() {
    let mut models = vec![common::real_model(SMOLLM2)];
    let qwen = common::repo().join("models").join(QWEN_05B);
    if qwen.is_file() {
        models.push(qwen);
    }
    let seeds: Vec<Vec<u8>> = [
        "The answer is 42.\n\n".repeat(20),
        " ".repeat(3000),
        "-".repeat(2000) + &"=".repeat(500) + &"#".repeat(500),
        "ManagementPlaneProtection".repeat(100),
        "<|im_start|>user\nhi<|im_end|>".repeat(30),
        "e\u{301}\u{1100}\u{1161}\u{11a8} 日本語のテキスト ".repeat(50),
        "0123456789".repeat(200),
        "\t\n \r\n".repeat(300),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    for path in models {
        let tokenizer = verity::tokenizer::Tokenizer::from_gguf_file(&path).unwrap();
        let mut tightest = 0f64;
        fuzz::run(
            "tokens_at_least",
            &seeds,
            &[b"    ", b"word ", b"\xc3\xa9", b"<|im_end|>", b"----"],
            0,
            fuzz::cases(400),
            |input| {
                let text = String::from_utf8_lossy(input);
                let real = tokenizer.encode(&text, true).unwrap().len();
                let bound = tokenizer.tokens_at_least(&text);
                assert!(bound <= real, "{bound} > {real} tokens for {text:?}");
                if real > 0 {
                    tightest = tightest.max(bound as f64 / real as f64);
                }
            },
        );
        // Useful as well as sound: on some text the bound is within a factor of 4.
        assert!(
            tightest > 0.25,
            "{}: bound at most {tightest} of the real count",
            path.display()
        );
    }
}
