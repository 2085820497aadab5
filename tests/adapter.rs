//! PEFT adapter folders: key names and `adapter_config.json` as PEFT writes them, bit-exact
//! round trips, saves that fail or crash part-way (in-process hook errors, and child
//! processes killed by `abort()` or by the file-size limit in the middle of the tensor file)
//! leaving the previous version loadable, clear errors for bad folders, numbered versions.

mod common;
use common::*;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use verity::adapter::{
    latest_version, load_peft, peft_key, recover, save_peft, save_peft_with, save_versioned,
    version_dir, SaveStep, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, LATEST_FILE,
};
use verity::model::config::{Architecture, ModelConfig};
use verity::model::{LoraAdapter, LoraSpec, LoraTarget};
use verity::sampling::Rng;
use verity::Error;

const CHILD_ENV: &str = "VERITY_ADAPTER_TEST_CHILD";

fn spec(rank: usize, alpha: f64, targets: &[LoraTarget], use_rslora: bool) -> LoraSpec {
    LoraSpec {
        rank,
        alpha,
        targets: targets.to_vec(),
        use_rslora,
    }
}

/// An adapter whose A and B are all filled from `seed` (B is not zero, so it matters).
fn seeded_adapter(config: &ModelConfig, spec: LoraSpec, seed: u64) -> LoraAdapter {
    let adapter = LoraAdapter::new(config, spec, DType::F32, &Device::Cpu).expect("adapter");
    let mut rng = Rng::new(seed);
    for var in adapter.vars() {
        let shape = var.dims().to_vec();
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect();
        var.set(&Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor"))
            .expect("set");
    }
    adapter
}

type Snapshot = Vec<(
    usize,
    LoraTarget,
    Vec<usize>,
    Vec<u32>,
    Vec<usize>,
    Vec<u32>,
)>;

/// Every pair's shapes and f32 bit patterns.
fn snapshot(adapter: &LoraAdapter) -> Snapshot {
    let bits = |t: &Tensor| -> Vec<u32> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
            .into_iter()
            .map(f32::to_bits)
            .collect()
    };
    adapter
        .pairs()
        .map(|(l, t, p)| {
            (
                l,
                t,
                p.a.dims().to_vec(),
                bits(p.a.as_tensor()),
                p.b.dims().to_vec(),
                bits(p.b.as_tensor()),
            )
        })
        .collect()
}

fn load(dir: &Path, config: &ModelConfig) -> verity::Result<LoraAdapter> {
    load_peft(dir, config, DType::F32, &Device::Cpu)
}

/// Names of the entries of a folder.
fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect()
}

/// Entries beside `dir` that a save made (temporary or set-aside folders).
fn leftovers(dir: &Path) -> Vec<String> {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    entries(dir.parent().unwrap())
        .into_iter()
        .filter(|e| e.starts_with(&format!("{name}.")))
        .collect()
}

/// `dir` is a complete adapter folder: exactly the two files.
fn assert_complete(dir: &Path) {
    let want: BTreeSet<String> = [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
        .map(String::from)
        .into();
    assert_eq!(
        entries(dir),
        want,
        "{} is not a complete adapter",
        dir.display()
    );
}

fn err_text(e: &Error) -> String {
    e.to_string()
}

// ---------------------------------------------------------------- (a) names and fields

#[test]
fn peft_key_names_and_config_fields() {
    let config = tiny_config(Architecture::Llama);
    let dir = temp_dir("adapter-names").join("my-adapter");
    let targets = [LoraTarget::Q, LoraTarget::V, LoraTarget::Down];
    let adapter = seeded_adapter(&config, spec(4, 8.0, &targets, false), 1);
    save_peft(
        &adapter,
        &config,
        &dir,
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    )
    .expect("save");
    assert_complete(&dir);
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));

    let text = std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let expected = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
        "use_rslora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "revision": null,
        "use_dora": false,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    assert_eq!(json, expected);
    // Integral alpha is an integer, as PEFT's `int` field; dropout a float.
    assert!(json["lora_alpha"].is_u64());
    assert!(json["lora_dropout"].is_f64());

    assert_eq!(
        peft_key(0, LoraTarget::Q, false),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    let tensors =
        candle_core::safetensors::load(dir.join(ADAPTER_WEIGHTS_FILE), &Device::Cpu).unwrap();
    let mut want: HashMap<String, Vec<usize>> = HashMap::new();
    for l in 0..2 {
        let p = format!("base_model.model.model.layers.{l}");
        want.insert(format!("{p}.self_attn.q_proj.lora_A.weight"), vec![4, 32]);
        want.insert(format!("{p}.self_attn.q_proj.lora_B.weight"), vec![32, 4]);
        want.insert(format!("{p}.self_attn.v_proj.lora_A.weight"), vec![4, 32]);
        want.insert(format!("{p}.self_attn.v_proj.lora_B.weight"), vec![16, 4]);
        want.insert(format!("{p}.mlp.down_proj.lora_A.weight"), vec![4, 64]);
        want.insert(format!("{p}.mlp.down_proj.lora_B.weight"), vec![32, 4]);
    }
    let got: HashMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    assert_eq!(got, want);
    assert!(tensors.values().all(|t| t.dtype() == DType::F32));

    // Non-integral alpha, rsLoRA and no base model name.
    let dir2 = dir.with_file_name("other");
    let adapter = seeded_adapter(&config, spec(2, 3.5, &[LoraTarget::K], true), 2);
    save_peft(&adapter, &config, &dir2, "").expect("save");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir2.join(ADAPTER_CONFIG_FILE)).unwrap())
            .unwrap();
    assert_eq!(json["lora_alpha"], serde_json::json!(3.5));
    assert_eq!(json["use_rslora"], serde_json::json!(true));
    assert_eq!(json["target_modules"], serde_json::json!(["k_proj"]));
    assert!(json["base_model_name_or_path"].is_null());
}

// ---------------------------------------------------------------- (b) round trips

#[test]
fn round_trip_is_bit_identical() {
    for arch in [Architecture::Llama, Architecture::Qwen2] {
        let config = tiny_config(arch);
        let dir = temp_dir(&format!("adapter-roundtrip-{}", arch.name())).join("a");
        let original = seeded_adapter(&config, spec(4, 16.0, &LoraTarget::ALL, false), 3);
        save_peft(&original, &config, &dir, "base").expect("save");
        let loaded = load(&dir, &config).expect("load");
        assert_eq!(loaded.spec, original.spec);
        assert_eq!(loaded.scale(), original.scale());
        assert_eq!(loaded.scale(), 4.0);
        assert_eq!(loaded.num_layers(), config.num_layers);
        assert_eq!(snapshot(&loaded), snapshot(&original));
        assert_eq!(snapshot(&loaded).len(), 2 * 7);

        // Saving the loaded adapter again writes the same bytes.
        let again = dir.with_file_name("b");
        save_peft(&loaded, &config, &again, "base").unwrap();
        for f in [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE] {
            assert_eq!(
                std::fs::read(dir.join(f)).unwrap(),
                std::fs::read(again.join(f)).unwrap(),
                "{f}"
            );
        }

        // The loaded adapter computes the same update.
        let x = Tensor::rand(-1f32, 1f32, (3, config.hidden_size), &Device::Cpu).unwrap();
        let d0 = original.delta(1, LoraTarget::Q, &x).unwrap().unwrap();
        let d1 = loaded.delta(1, LoraTarget::Q, &x).unwrap().unwrap();
        assert_eq!(
            d0.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            d1.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[test]
fn round_trip_rslora_keeps_scale_and_loads_in_other_dtypes() {
    let config = tiny_config(Architecture::Llama);
    let dir = temp_dir("adapter-rslora").join("a");
    let original = seeded_adapter(
        &config,
        spec(4, 16.0, &[LoraTarget::Up, LoraTarget::O], true),
        4,
    );
    assert_eq!(original.scale(), 8.0);
    save_peft(&original, &config, &dir, "").expect("save");
    let loaded = load(&dir, &config).expect("load");
    assert!(loaded.spec.use_rslora);
    assert_eq!(loaded.scale(), 8.0, "α/√r, not α/r = 4");
    assert_eq!(snapshot(&loaded), snapshot(&original));

    let bf16 = load_peft(&dir, &config, DType::BF16, &Device::Cpu).expect("load bf16");
    let (_, _, pair) = bf16.pairs().next().unwrap();
    assert_eq!(pair.a.dtype(), DType::BF16);
    let (_, _, orig) = original.pairs().next().unwrap();
    let want = orig.a.as_tensor().to_dtype(DType::BF16).unwrap();
    assert_eq!(
        pair.a
            .as_tensor()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        want.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
}

/// Writes a folder the way PEFT's `save_pretrained` might: given config JSON and tensors.
fn write_peft_folder(
    dir: &Path,
    config_json: &serde_json::Value,
    tensors: &HashMap<String, Tensor>,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join(ADAPTER_CONFIG_FILE),
        serde_json::to_string_pretty(config_json).unwrap(),
    )
    .unwrap();
    candle_core::safetensors::save(tensors, dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
}

/// The tensors of `adapter` under PEFT keys with `.{name}` inserted, in `dtype`.
fn named_tensors(
    adapter: &LoraAdapter,
    name: Option<&str>,
    dtype: DType,
) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (l, t, p) in adapter.pairs() {
        for (b, var) in [(false, &p.a), (true, &p.b)] {
            let mut key = peft_key(l, t, b);
            if let Some(name) = name {
                key = key.replace(".weight", &format!(".{name}.weight"));
            }
            out.insert(key, var.as_tensor().to_dtype(dtype).unwrap());
        }
    }
    out
}

#[test]
fn loads_keys_with_adapter_name_and_target_patterns() {
    let config = tiny_config(Architecture::Qwen2);
    let root = temp_dir("adapter-peft-named");
    let original = seeded_adapter(
        &config,
        spec(8, 16.0, &[LoraTarget::Q, LoraTarget::V], false),
        5,
    );

    // `lora_A.default.weight`, bf16 tensors, extra PEFT fields, target_modules as a list.
    let dir = root.join("named");
    let json = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
        "lora_dropout": 0.05, "target_modules": ["v_proj", "q_proj"], "bias": "none",
        "use_rslora": false, "use_dora": false, "fan_in_fan_out": false,
        "base_model_name_or_path": "Qwen/Qwen2.5-0.5B", "layer_replication": null,
        "megatron_core": "megatron.core", "loftq_config": {}, "rank_pattern": {},
        "alpha_pattern": {}, "modules_to_save": null, "inference_mode": true,
    });
    write_peft_folder(
        &dir,
        &json,
        &named_tensors(&original, Some("default"), DType::BF16),
    );
    let loaded = load(&dir, &config).expect("keys with the adapter name load");
    assert_eq!(loaded.spec.targets, vec![LoraTarget::V, LoraTarget::Q]);
    assert_eq!(loaded.scale(), 2.0);
    let want: Vec<_> = snapshot(&original)
        .into_iter()
        .map(|(l, t, sa, _, sb, _)| (l, t, sa, sb))
        .collect();
    let got: Vec<_> = snapshot(&loaded)
        .into_iter()
        .map(|(l, t, sa, _, sb, _)| (l, t, sa, sb))
        .collect();
    assert_eq!(got, want);

    // target_modules as a regular expression (PEFT full-matches module names) and as
    // "all-linear"; path suffixes in a list.
    for targets in [
        serde_json::json!(".*\\.(q_proj|v_proj)"),
        serde_json::json!("all-linear"),
        serde_json::json!(["self_attn.q_proj", "v_proj"]),
    ] {
        let dir = root.join("pattern");
        let _ = std::fs::remove_dir_all(&dir);
        let mut json = json.clone();
        json["target_modules"] = targets.clone();
        write_peft_folder(&dir, &json, &named_tensors(&original, None, DType::F32));
        let loaded = load(&dir, &config).unwrap_or_else(|e| panic!("{targets}: {e}"));
        assert_eq!(snapshot(&loaded), snapshot(&original), "{targets}");
    }

    // Only some layers (layers_to_transform): the others have no update.
    let dir = root.join("partial");
    let mut tensors = named_tensors(&original, None, DType::F32);
    tensors.retain(|k, _| k.contains(".layers.1."));
    let mut json1 = json.clone();
    json1["layers_to_transform"] = serde_json::json!([1]);
    write_peft_folder(&dir, &json1, &tensors);
    let loaded = load(&dir, &config).expect("partial layers load");
    assert!(loaded.get(0, LoraTarget::Q).is_none());
    assert!(loaded.get(1, LoraTarget::Q).is_some());
}

// ---------------------------------------------------------------- (c) interrupted saves

const STEPS: [&str; 5] = ["config", "tensors", "synced", "aside", "committed"];

fn step_name(step: &SaveStep<'_>) -> &'static str {
    match step {
        SaveStep::ConfigWritten(_) => "config",
        SaveStep::TensorsWritten(_) => "tensors",
        SaveStep::Synced(_) => "synced",
        SaveStep::OldMovedAside(_) => "aside",
        SaveStep::Committed(_) => "committed",
    }
}

/// At `TensorsWritten`, cut the tensor file to half its length: the state a crash in the
/// middle of writing it leaves.
fn half_write(step: &SaveStep<'_>) {
    if let SaveStep::TensorsWritten(path) = step {
        let len = std::fs::metadata(path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.set_len(len / 2).unwrap();
    }
}

#[test]
fn failed_save_leaves_previous_version() {
    let config = tiny_config(Architecture::Llama);
    let root = temp_dir("adapter-failed-save");
    let s = spec(4, 8.0, &LoraTarget::ALL, false);
    let old = seeded_adapter(&config, s.clone(), 10);
    let new = seeded_adapter(&config, spec(2, 4.0, &[LoraTarget::K], true), 11);
    for fail_at in STEPS {
        let dir = root.join(fail_at);
        save_peft(&old, &config, &dir, "old").expect("first save");
        let mut seen = Vec::new();
        let result = save_peft_with(&new, &config, &dir, "new", &mut |step| {
            seen.push(step_name(&step));
            if step_name(&step) == fail_at {
                half_write(&step);
                return Err(std::io::Error::other(format!(
                    "injected failure at {fail_at}"
                )));
            }
            Ok(())
        });
        let err = result.expect_err("the hook's failure is reported");
        assert!(err_text(&err).contains("injected failure"), "{err}");
        assert_eq!(seen.last(), Some(&fail_at));
        assert_complete(&dir);
        assert!(
            leftovers(&dir).is_empty(),
            "{fail_at}: {:?}",
            leftovers(&dir)
        );
        let loaded = load(&dir, &config).expect("a version loads");
        if fail_at == "committed" {
            // The new version was already in place when the hook failed.
            assert_eq!(snapshot(&loaded), snapshot(&new));
        } else {
            assert_eq!(snapshot(&loaded), snapshot(&old), "{fail_at}");
            assert_eq!(loaded.spec, s);
        }
    }

    // A failed first save leaves nothing at all.
    let dir = root.join("fresh");
    let result = save_peft_with(&new, &config, &dir, "", &mut |step| {
        half_write(&step);
        match step {
            SaveStep::TensorsWritten(_) => Err(std::io::Error::other("disk full")),
            _ => Ok(()),
        }
    });
    assert!(result.is_err());
    assert!(!dir.exists());
    assert!(leftovers(&dir).is_empty());
    assert!(matches!(load(&dir, &config), Err(Error::Io { .. })));
}

/// A large adapter, so that its tensor file (~3 MB) takes many writes.
fn big_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 256,
        intermediate_size: 1024,
        num_layers: 4,
        num_heads: 8,
        num_kv_heads: 4,
        head_dim: 32,
        ..tiny_config(Architecture::Llama)
    }
}

fn big_adapter(seed: u64) -> LoraAdapter {
    seeded_adapter(&big_config(), spec(32, 32.0, &LoraTarget::ALL, false), seed)
}

/// In a child process started by a crash test: saves `big_adapter(2)` into the folder named
/// by the job and crashes as told; never returns.
fn child_main(job: &str) -> ! {
    let (dir, crash_at) = job.split_once('\t').expect("job");
    let adapter = big_adapter(2);
    let result = save_peft_with(
        &adapter,
        &big_config(),
        Path::new(dir),
        "new",
        &mut |step| {
            if step_name(&step) == crash_at {
                half_write(&step);
                std::process::abort();
            }
            Ok(())
        },
    );
    eprintln!("child: save returned {result:?} instead of crashing");
    std::process::exit(3)
}

fn maybe_child() {
    if let Ok(job) = std::env::var(CHILD_ENV) {
        child_main(&job);
    }
}

/// Re-runs this test binary's `test` in a child process (no core dumps, optionally a
/// file-size limit in 512- or 1024-byte blocks) with `job`; returns its pid and output.
#[cfg(unix)]
fn run_child(test: &str, job: &str, fsize_blocks: Option<u32>) -> (u32, std::process::Output) {
    let exe = std::env::current_exe().expect("test binary");
    let limit = fsize_blocks
        .map(|b| format!("ulimit -f {b}; "))
        .unwrap_or_default();
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -c 0; {limit}exec \"$0\" \"$@\""))
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, job)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn child");
    let pid = child.id();
    (pid, child.wait_with_output().expect("child output"))
}

#[cfg(unix)]
fn killed_by_signal(out: &std::process::Output) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    out.status.signal()
}

#[cfg(unix)]
#[test]
fn killed_save_leaves_previous_version() {
    maybe_child();
    let config = big_config();
    let root = temp_dir("adapter-killed-save");
    let old = big_adapter(1);
    let new_snapshot = snapshot(&big_adapter(2));
    for crash_at in STEPS {
        let dir = root.join(crash_at);
        save_peft(&old, &config, &dir, "old").expect("first save");
        let job = format!("{}\t{crash_at}", dir.display());
        let (pid, out) = run_child("killed_save_leaves_previous_version", &job, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            killed_by_signal(&out),
            Some(6),
            "{crash_at}: the child should abort ({:?}): {stderr}",
            out.status
        );
        let left = leftovers(&dir);
        let expect_new = crash_at == "committed";
        match crash_at {
            "aside" => {
                // Between the two renames: no destination, the old version set aside.
                assert!(!dir.exists());
                assert!(left.iter().any(|e| e.contains(".old-")), "{left:?}");
            }
            _ => assert_complete(&dir),
        }
        if crash_at != "committed" {
            assert!(
                left.iter().any(|e| e.contains(&format!(".tmp-{pid}-"))),
                "{crash_at}: the child's temporary folder: {left:?}"
            );
        }
        // Whatever the crash left, a complete version loads: the old one until the commit.
        let loaded = load(&dir, &config).expect("loads after the crash");
        let want = if expect_new {
            &new_snapshot
        } else {
            &snapshot(&old)
        };
        assert!(
            snapshot(&loaded) == *want,
            "{crash_at}: wrong version loaded"
        );

        // Recovery puts the folder back and clears what the dead child left.
        recover(&dir).expect("recover");
        assert_complete(&dir);
        assert!(
            leftovers(&dir).is_empty(),
            "{crash_at}: {:?}",
            leftovers(&dir)
        );
        assert!(snapshot(&load(&dir, &config).unwrap()) == *want);
    }

    // The next save after a crash succeeds and cleans up by itself.
    let dir = root.join("next");
    save_peft(&old, &config, &dir, "old").unwrap();
    let (_, out) = run_child(
        "killed_save_leaves_previous_version",
        &format!("{}\taside", dir.display()),
        None,
    );
    assert_eq!(killed_by_signal(&out), Some(6));
    let newer = big_adapter(3);
    save_peft(&newer, &config, &dir, "newer").expect("save after crash");
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    assert!(snapshot(&load(&dir, &config).unwrap()) == snapshot(&newer));
}

#[cfg(unix)]
#[test]
fn killed_mid_tensor_write_by_file_size_limit() {
    maybe_child();
    let config = big_config();
    let dir = temp_dir("adapter-fsize-kill").join("adapter");
    let old = big_adapter(1);
    save_peft(&old, &config, &dir, "old").expect("first save");
    let full = std::fs::metadata(dir.join(ADAPTER_WEIGHTS_FILE))
        .unwrap()
        .len();
    assert!(full > 2_000_000, "tensor file of {full} bytes");

    // 64 blocks (32 or 64 KiB): adapter_config.json fits, the tensor file does not, so the
    // kernel kills the child (SIGXFSZ) inside candle's save of the tensor file (safetensors
    // writes a temporary file beside it, first extended to its full size, then renamed). The
    // hook never fires ("never" is no step).
    let job = format!("{}\tnever", dir.display());
    let (pid, out) = run_child("killed_mid_tensor_write_by_file_size_limit", &job, Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        killed_by_signal(&out).is_some(),
        "the child should be killed by a signal ({:?}): {stderr}",
        out.status
    );
    let tmp: Vec<PathBuf> = leftovers(&dir)
        .into_iter()
        .filter(|e| e.contains(&format!(".tmp-{pid}-")))
        .map(|e| dir.with_file_name(e))
        .collect();
    assert_eq!(tmp.len(), 1, "the child's temporary folder: {tmp:?}");
    let in_tmp = entries(&tmp[0]);
    assert!(in_tmp.contains(ADAPTER_CONFIG_FILE), "{in_tmp:?}");
    let partial: Vec<(String, u64)> = in_tmp
        .iter()
        .filter(|e| e.as_str() != ADAPTER_CONFIG_FILE)
        .map(|e| (e.clone(), std::fs::metadata(tmp[0].join(e)).unwrap().len()))
        .collect();
    eprintln!(
        "child killed by signal {:?}; its temporary folder holds {partial:?}",
        killed_by_signal(&out)
    );
    assert!(
        !partial.is_empty() && partial.iter().all(|(_, len)| *len < full),
        "the tensor file was cut short: {partial:?} (complete: {full} bytes)"
    );

    // The destination is the complete old version; nothing half-written is there.
    assert_complete(&dir);
    assert_eq!(
        std::fs::metadata(dir.join(ADAPTER_WEIGHTS_FILE))
            .unwrap()
            .len(),
        full
    );
    assert!(snapshot(&load(&dir, &config).expect("old loads")) == snapshot(&old));

    // The next save removes the dead child's temporary folder.
    let newer = big_adapter(4);
    save_peft(&newer, &config, &dir, "newer").unwrap();
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    assert!(snapshot(&load(&dir, &config).unwrap()) == snapshot(&newer));
}

#[test]
fn loads_during_saves_see_one_complete_version() {
    let config = tiny_config(Architecture::Llama);
    let dir = temp_dir("adapter-concurrent").join("live");
    let a = seeded_adapter(&config, spec(4, 8.0, &LoraTarget::ALL, false), 20);
    let b = seeded_adapter(&config, spec(2, 2.0, &[LoraTarget::Q], true), 21);
    save_peft(&a, &config, &dir, "").unwrap();
    let (snap_a, snap_b) = (snapshot(&a), snapshot(&b));
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 0..60 {
                let next = if i % 2 == 0 { &b } else { &a };
                save_peft(next, &config, &dir, "").expect("save");
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut loads = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) || loads == 0 {
            let loaded = load(&dir, &config).expect("a load during saves");
            let snap = snapshot(&loaded);
            let (want, spec) = if snap == snap_a {
                (&snap_a, &a.spec)
            } else {
                (&snap_b, &b.spec)
            };
            assert!(snap == *want, "tensors of neither version");
            assert_eq!(
                &loaded.spec, spec,
                "config and tensors of different versions"
            );
            loads += 1;
        }
    });
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
}

// ---------------------------------------------------------------- (d) errors

#[test]
fn shape_mismatch_names_key_and_shapes() {
    let config = tiny_config(Architecture::Llama);
    let dir = temp_dir("adapter-shape").join("a");
    let adapter = seeded_adapter(&config, spec(4, 8.0, &[LoraTarget::Down], false), 6);
    save_peft(&adapter, &config, &dir, "").unwrap();

    let other = ModelConfig {
        intermediate_size: 48,
        ..config.clone()
    };
    let err = load(&dir, &other).err().expect("shape mismatch");
    let text = err_text(&err);
    assert!(matches!(err, Error::BadModelFile { .. }), "{text}");
    assert!(
        text.contains("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"),
        "{text}"
    );
    assert!(
        text.contains("[4, 64]") && text.contains("[4, 48]"),
        "{text}"
    );

    // r in the config disagreeing with the tensors.
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["r"] = 2.into();
    std::fs::write(&path, json.to_string()).unwrap();
    let text = err_text(&load(&dir, &config).err().expect("rank mismatch"));
    assert!(
        text.contains("lora_A.weight") && text.contains("[4, 64]") && text.contains("[2, 64]"),
        "{text}"
    );

    // Saving an adapter for another model is refused too.
    let err = save_peft(&adapter, &other, &dir.with_file_name("b"), "")
        .expect_err("save for the wrong config");
    assert!(err_text(&err).contains("down_proj.lora_A.weight"), "{err}");
    assert!(!dir.with_file_name("b").exists());
}

#[test]
fn missing_files_are_io_errors_naming_the_file() {
    let config = tiny_config(Architecture::Llama);
    let root = temp_dir("adapter-missing");
    match load(&root.join("nothing"), &config) {
        Err(Error::Io { path, source }) => {
            assert!(path.ends_with(ADAPTER_CONFIG_FILE), "{}", path.display());
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected an Io error, got {:?}", other.err()),
    }
    let dir = root.join("half");
    let adapter = seeded_adapter(&config, spec(4, 8.0, &[LoraTarget::Q], false), 7);
    save_peft(&adapter, &config, &dir, "").unwrap();
    std::fs::remove_file(dir.join(ADAPTER_WEIGHTS_FILE)).unwrap();
    match load(&dir, &config) {
        Err(Error::Io { path, .. }) => {
            assert!(path.ends_with(ADAPTER_WEIGHTS_FILE), "{}", path.display())
        }
        other => panic!("expected an Io error, got {:?}", other.err()),
    }
}

/// A FIFO as the config (an open would wait for a writer forever), a link to /dev/zero as
/// the weights (a read would never end) and weights larger than any adapter of the model
/// can be: each refused at once, naming the file.
#[cfg(unix)]
#[test]
fn special_and_oversized_files_are_refused_before_reading() {
    let config = tiny_config(Architecture::Llama);
    let root = temp_dir("adapter-special");
    let adapter = seeded_adapter(&config, spec(4, 8.0, &[LoraTarget::Q], false), 9);
    let dir = root.join("fifo");
    save_peft(&adapter, &config, &dir, "").unwrap();
    let config_file = dir.join(ADAPTER_CONFIG_FILE);
    std::fs::remove_file(&config_file).unwrap();
    let c = std::ffi::CString::new(config_file.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = err_text(&load(&dir, &config).err().expect("refused"));
    assert!(
        err.contains(ADAPTER_CONFIG_FILE) && err.contains("FIFO"),
        "{err}"
    );

    let dir = root.join("zero");
    save_peft(&adapter, &config, &dir, "").unwrap();
    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    std::fs::remove_file(&weights).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &weights).unwrap();
    let err = err_text(&load(&dir, &config).err().expect("refused"));
    assert!(
        err.contains(ADAPTER_WEIGHTS_FILE) && err.contains("character device"),
        "{err}"
    );

    let dir = root.join("huge");
    save_peft(&adapter, &config, &dir, "").unwrap();
    let bound = config.num_parameters() as u64 * 8 + (16 << 20);
    std::fs::File::options()
        .write(true)
        .open(dir.join(ADAPTER_WEIGHTS_FILE))
        .unwrap()
        .set_len(bound + 1)
        .unwrap();
    let err = err_text(&load(&dir, &config).err().expect("refused"));
    assert!(
        err.contains(&format!("{} bytes, more than", bound + 1)),
        "{err}"
    );
}

#[test]
fn bad_config_json_is_reported() {
    let config = tiny_config(Architecture::Llama);
    let dir = temp_dir("adapter-bad-json").join("a");
    let adapter = seeded_adapter(&config, spec(4, 8.0, &[LoraTarget::Q], false), 8);
    save_peft(&adapter, &config, &dir, "").unwrap();
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();

    std::fs::write(&path, "{\"peft_type\": \"LORA\", \"r\": ").unwrap();
    let err = load(&dir, &config).err().expect("truncated JSON");
    assert!(
        matches!(&err, Error::BadModelFile { path: p, .. } if p.ends_with(ADAPTER_CONFIG_FILE))
    );
    assert!(err_text(&err).contains("not valid JSON"), "{err}");

    let cases: [(&str, serde_json::Value, &str); 7] = [
        ("peft_type", "IA3".into(), "IA3"),
        ("r", 0.into(), "r must be a positive integer"),
        ("r", "eight".into(), "r must be a positive integer"),
        ("use_dora", true.into(), "DoRA"),
        (
            "rank_pattern",
            serde_json::json!({"q_proj": 8}),
            "rank_pattern",
        ),
        (
            "target_modules",
            serde_json::json!([]),
            "target_modules is empty",
        ),
        ("bias", "all".into(), "bias"),
    ];
    for (key, value, needle) in cases {
        let mut json = good.clone();
        json[key] = value;
        std::fs::write(&path, json.to_string()).unwrap();
        let text = err_text(&load(&dir, &config).err().expect(key));
        assert!(text.contains(needle), "{key}: {text}");
    }
    std::fs::write(&path, "[1, 2]").unwrap();
    assert!(err_text(&load(&dir, &config).err().unwrap()).contains("JSON object"));

    // A tensor file that is not safetensors.
    std::fs::write(&path, good.to_string()).unwrap();
    std::fs::write(dir.join(ADAPTER_WEIGHTS_FILE), b"not safetensors").unwrap();
    let text = err_text(&load(&dir, &config).err().unwrap());
    assert!(
        text.contains(ADAPTER_WEIGHTS_FILE) && text.contains("safetensors"),
        "{text}"
    );
}

#[test]
fn unknown_modules_are_named() {
    let config = tiny_config(Architecture::Llama);
    let root = temp_dir("adapter-unknown");
    let adapter = seeded_adapter(&config, spec(4, 8.0, &[LoraTarget::Q], false), 9);
    let tensors = named_tensors(&adapter, None, DType::F32);
    let json = peft_json(&["q_proj"]);

    // In target_modules.
    let dir = root.join("config");
    write_peft_folder(&dir, &peft_json(&["q_proj", "lm_head", "c_attn"]), &tensors);
    let text = err_text(&load(&dir, &config).err().expect("unknown target"));
    assert!(
        text.contains("lm_head") && text.contains("c_attn"),
        "{text}"
    );
    assert!(text.contains("does not have: lm_head, c_attn"), "{text}");

    // In the tensor keys.
    let dir = root.join("keys");
    let mut extra = tensors.clone();
    let t = Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap();
    extra.insert("base_model.model.lm_head.lora_A.weight".into(), t.clone());
    extra.insert(
        "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight".into(),
        t,
    );
    write_peft_folder(&dir, &json, &extra);
    let text = err_text(&load(&dir, &config).err().expect("unknown module key"));
    assert!(
        text.contains("lm_head") && text.contains("self_attn.qkv_proj"),
        "{text}"
    );

    // Weights for a module that target_modules does not list.
    let dir = root.join("unlisted");
    write_peft_folder(&dir, &peft_json(&["k_proj"]), &tensors);
    let text = err_text(&load(&dir, &config).err().expect("unlisted module"));
    assert!(text.contains("q_proj"), "{text}");
}

fn peft_json(targets: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets,
        "use_rslora": false, "bias": "none",
    })
}

#[test]
fn missing_half_of_a_pair_and_bad_layers_are_reported() {
    let config = tiny_config(Architecture::Llama);
    let root = temp_dir("adapter-missing-pair");
    let adapter = seeded_adapter(
        &config,
        spec(4, 8.0, &[LoraTarget::Q, LoraTarget::Up], false),
        12,
    );
    let json = peft_json(&["q_proj", "up_proj"]);

    let dir = root.join("no-b");
    let mut tensors = named_tensors(&adapter, None, DType::F32);
    tensors.remove("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight");
    write_peft_folder(&dir, &json, &tensors);
    let text = err_text(&load(&dir, &config).err().expect("missing B"));
    assert!(
        text.contains("layer 1 up_proj")
            && text.contains("mlp.up_proj.lora_A.weight")
            && text.contains("no lora_B"),
        "{text}"
    );

    let dir = root.join("no-a");
    let mut tensors = named_tensors(&adapter, None, DType::F32);
    tensors.remove("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    write_peft_folder(&dir, &json, &tensors);
    let text = err_text(&load(&dir, &config).err().expect("missing A"));
    assert!(
        text.contains("layer 0 q_proj") && text.contains("no lora_A"),
        "{text}"
    );

    // A model with fewer layers than the adapter.
    let dir = root.join("layers");
    write_peft_folder(&dir, &json, &named_tensors(&adapter, None, DType::F32));
    let one = ModelConfig {
        num_layers: 1,
        ..config.clone()
    };
    let text = err_text(&load(&dir, &one).err().expect("layer out of range"));
    assert!(
        text.contains("layers.1.") && text.contains("1 layers"),
        "{text}"
    );

    // A target listed without any weights.
    let dir = root.join("listed");
    write_peft_folder(
        &dir,
        &peft_json(&["q_proj", "up_proj", "down_proj"]),
        &named_tensors(&adapter, None, DType::F32),
    );
    let text = err_text(&load(&dir, &config).err().expect("listed without weights"));
    assert!(text.contains("down_proj"), "{text}");

    // Two adapters' tensors mixed in one file.
    let dir = root.join("two-names");
    let mut tensors = named_tensors(&adapter, Some("default"), DType::F32);
    let other = named_tensors(&adapter, Some("other"), DType::F32);
    tensors.extend(other);
    write_peft_folder(&dir, &json, &tensors);
    let text = err_text(&load(&dir, &config).err().expect("two adapters"));
    assert!(text.contains("default") && text.contains("other"), "{text}");
}

#[test]
fn refuses_to_replace_a_folder_that_is_not_an_adapter() {
    let config = tiny_config(Architecture::Llama);
    let dir = temp_dir("adapter-refuse").join("precious");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "keep me").unwrap();
    let adapter = seeded_adapter(&config, spec(4, 8.0, &[LoraTarget::Q], false), 13);
    let err = save_peft(&adapter, &config, &dir, "").expect_err("refused");
    assert!(matches!(err, Error::InvalidArgument(_)));
    assert!(err_text(&err).contains("notes.txt"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "keep me"
    );
    assert!(leftovers(&dir).is_empty());
}

// ---------------------------------------------------------------- (e) versions

#[test]
fn versioned_saves_count_up_and_latest_follows() {
    let config = tiny_config(Architecture::Llama);
    let root = temp_dir("adapter-versions");
    assert_eq!(latest_version(&root, "math").unwrap(), None);
    let mut snapshots = Vec::new();
    for v in 1..=3u64 {
        let adapter = seeded_adapter(&config, spec(4, 8.0, &[LoraTarget::V], false), 100 + v);
        let dir = save_versioned(&adapter, &config, &root, "math").expect("versioned save");
        assert_eq!(dir, root.join("math").join(format!("v{v}")));
        assert_eq!(dir, version_dir(&root, "math", v).unwrap());
        assert_complete(&dir);
        assert_eq!(latest_version(&root, "math").unwrap(), Some(v));
        assert_eq!(
            std::fs::read_to_string(root.join("math").join(LATEST_FILE))
                .unwrap()
                .trim(),
            v.to_string()
        );
        snapshots.push(snapshot(&adapter));
    }
    let want: BTreeSet<String> = ["LATEST", "v1", "v2", "v3"].map(String::from).into();
    assert_eq!(entries(&root.join("math")), want, "no temporary files left");
    for (i, snap) in snapshots.iter().enumerate() {
        let loaded = load(&version_dir(&root, "math", i as u64 + 1).unwrap(), &config).unwrap();
        assert!(snapshot(&loaded) == *snap, "v{}", i + 1);
    }

    // Other names are independent; bad names are refused.
    let adapter = seeded_adapter(&config, spec(4, 8.0, &[LoraTarget::V], false), 200);
    assert_eq!(
        save_versioned(&adapter, &config, &root, "code").unwrap(),
        root.join("code").join("v1")
    );
    assert_eq!(latest_version(&root, "math").unwrap(), Some(3));
    for bad in ["", "..", "a/b", "."] {
        assert!(matches!(
            save_versioned(&adapter, &config, &root, bad),
            Err(Error::InvalidArgument(_))
        ));
    }

    // A version folder whose save crashed before LATEST moved is skipped, not reused.
    std::fs::create_dir(root.join("math").join("v4")).unwrap();
    let dir = save_versioned(&adapter, &config, &root, "math").unwrap();
    assert_eq!(dir, root.join("math").join("v5"));
    assert_eq!(latest_version(&root, "math").unwrap(), Some(5));

    std::fs::write(root.join("math").join(LATEST_FILE), "garbage").unwrap();
    let err = latest_version(&root, "math").expect_err("bad LATEST");
    assert!(err_text(&err).contains("LATEST"), "{err}");
}

/// A rank above the smaller side of a targeted layer (K here: 32 → 16) or above
/// `MAX_LORA_RANK`, or an α that is not a finite f32, is refused before anything is
/// allocated; the largest rank that fits is accepted.
#[test]
fn lora_ranks_and_alphas_the_model_cannot_hold_are_refused() {
    let config = tiny_config(Architecture::Llama);
    let make = |rank: usize, alpha: f64| {
        LoraAdapter::new(
            &config,
            spec(rank, alpha, &[LoraTarget::Q, LoraTarget::K], false),
            DType::F32,
            &Device::Cpu,
        )
    };
    assert_eq!(make(16, 32.0).unwrap().spec.rank, 16);
    for rank in [17, 1 << 28, usize::MAX] {
        match make(rank, 32.0) {
            Err(Error::OutOfRange(m)) => assert!(m.contains(&format!("rank {rank}")), "{m}"),
            Err(e) => panic!("rank {rank}: {e}"),
            Ok(_) => panic!("rank {rank} accepted"),
        }
    }
    // 1e308 is finite as f64 but +inf as the f32 the update is computed in.
    for alpha in [f64::NAN, f64::INFINITY, 1e308, -1e300] {
        match make(4, alpha) {
            Err(Error::OutOfRange(m)) => assert!(m.contains("alpha"), "{m}"),
            Err(e) => panic!("alpha {alpha}: {e}"),
            Ok(_) => panic!("alpha {alpha} accepted"),
        }
    }
}

/// A weight that is not finite as the dtype it is loaded in (NaN, or 1e5 as f16) is refused,
/// naming the tensor: such an adapter used to load and turn every output into noise.
#[test]
fn adapters_with_non_finite_weights_are_refused() {
    let config = tiny_config(Architecture::Llama);
    let root = temp_dir("adapter-non-finite");
    let adapter = seeded_adapter(&config, spec(4, 8.0, &[LoraTarget::Q], false), 3);
    let json = serde_json::json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
    });
    for (name, value, dtype) in [
        ("nan", f32::NAN, DType::F32),
        ("inf", f32::NEG_INFINITY, DType::F32),
        ("f16-overflow", 1e5, DType::F16),
    ] {
        let mut tensors = named_tensors(&adapter, None, DType::F32);
        let key = peft_key(1, LoraTarget::Q, true);
        let b = &tensors[&key];
        let mut values = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values[5] = value;
        tensors.insert(
            key.clone(),
            Tensor::from_vec(values, b.shape(), &Device::Cpu).unwrap(),
        );
        let dir = root.join(name);
        write_peft_folder(&dir, &json, &tensors);
        match load_peft(&dir, &config, dtype, &Device::Cpu) {
            Err(e) => {
                let m = e.to_string();
                assert!(m.contains(&key) && m.contains("non-finite"), "{name}: {m}");
            }
            Ok(_) => panic!("{name}: loaded"),
        }
        // The same folder without the bad value loads.
        write_peft_folder(&dir, &json, &named_tensors(&adapter, None, DType::F32));
        load_peft(&dir, &config, dtype, &Device::Cpu).unwrap();
    }
}
