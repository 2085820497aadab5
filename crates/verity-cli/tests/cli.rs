//! The `verity` binary as a user meets it: bad arguments get errors naming the flag, a
//! missing model names the path, and a greedy run on a tiny model is deterministic.

#[path = "../../../tests/common/mod.rs"]
mod common;
use common::*;

use verity::model::config::Architecture;

fn tiny_files(arch: Architecture, name: &str) -> std::path::PathBuf {
    let dir = temp_dir(name);
    let config = tiny_config(arch);
    let weights = tiny_weights(&config, 3);
    let gguf = dir.join("tiny.gguf");
    write_tiny_gguf(&gguf, &config, &weights, None);
    gguf
}

#[test]
fn cli_rejects_non_utf8_prompts_and_missing_models() {
    use std::os::unix::ffi::OsStrExt;
    let gguf = tiny_files(Architecture::Qwen2, "cli");
    let bin = env!("CARGO_BIN_EXE_verity");
    let out = std::process::Command::new(bin)
        .args(["generate", "--model"])
        .arg(&gguf)
        .arg("--prompt")
        .arg(std::ffi::OsStr::from_bytes(b"caf\xe9"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--prompt is not valid UTF-8"), "{stderr}");

    let out = std::process::Command::new(bin)
        .args(["info", "--model", "/nonexistent/model.gguf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/model.gguf"));

    // And a working run on the tiny model: greedy output is deterministic.
    let run = || {
        std::process::Command::new(bin)
            .args([
                "generate",
                "--chat",
                "--max-tokens",
                "8",
                "--prompt",
                "hi",
                "--model",
            ])
            .arg(&gguf)
            .output()
            .unwrap()
    };
    let (a, b) = (run(), run());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);

    // A system message only exists in a chat: without --chat it is refused, not dropped.
    let out = std::process::Command::new(bin)
        .args([
            "generate", "--system", "be brief", "--prompt", "hi", "--model",
        ])
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--chat"), "{stderr}");
}

#[test]
fn an_unusable_device_is_an_error_naming_the_flag() {
    let gguf = tiny_files(Architecture::Qwen2, "cli-device");
    let bin = env!("CARGO_BIN_EXE_verity");
    let run = |device: &str| {
        std::process::Command::new(bin)
            .args(["info", "--device", device, "--model"])
            .arg(&gguf)
            .output()
            .unwrap()
    };
    let out = run("tpu");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--device") && stderr.contains("auto, cpu, cuda"),
        "{stderr}"
    );
    if !verity::device::cuda_built() {
        let out = run("cuda:0");
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--device") && stderr.contains("--features cuda"),
            "{stderr}"
        );
    }
    let out = run("cpu");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("device:        cpu (asked for: cpu)"),
        "{stdout}"
    );
}

/// `serve` on an address other machines reach needs an API key or an explicit opt-out, and
/// says so before loading anything (the model path here does not even exist).
#[test]
fn serve_refuses_a_public_address_without_an_api_key() {
    let serve = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_verity"))
            .args(["serve", "--host", "0.0.0.0"])
            .args(extra)
            .args(["--model", "/nonexistent/model.gguf"])
            .env_remove("VERITY_API_KEY")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = serve(&[]);
    assert!(
        stderr.contains("--api-key") && stderr.contains("--insecure-no-api-key"),
        "{stderr}"
    );
    // With the opt-out the address is accepted and the (missing) model is the next error.
    let stderr = serve(&["--insecure-no-api-key"]);
    assert!(
        !stderr.contains("--insecure-no-api-key") && stderr.contains("/nonexistent"),
        "{stderr}"
    );
}

fn run_ok(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verity"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "verity {:?} failed: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn f32s(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// The tiny Qwen2 model as a GGUF file and, through `bench tokenizer`, as a Hugging Face
/// folder with the GGUF's tokenizer: the way the GPU check makes its random models.
fn tiny_gguf_and_hf(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = temp_dir(name);
    let config = tiny_config(Architecture::Qwen2);
    let weights = tiny_weights(&config, 5);
    let gguf = dir.join("tiny.gguf");
    write_tiny_gguf(&gguf, &config, &weights, None);
    let hf = dir.join("hf");
    verity::model::testing::save(&hf, &config, &weights).unwrap();
    run_ok(&[
        "bench".as_ref(),
        "tokenizer".as_ref(),
        "--model".as_ref(),
        gguf.as_os_str(),
        "--out".as_ref(),
        hf.as_os_str(),
    ]);
    (gguf, hf)
}

#[test]
fn bench_tokenizer_writes_a_folder_that_loads_like_the_gguf() {
    let (gguf, hf) = tiny_gguf_and_hf("bench-tokenizer");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(hf.join(f).is_file(), "{f} missing");
    }
    let config = read_json(&hf.join("tokenizer_config.json"));
    assert_eq!(config["chat_template"].as_str(), Some(TINY_TEMPLATE));
    assert_eq!(config["eos_token"].as_str(), Some("<|im_end|>"));
    let from_gguf = verity::Tokenizer::from_gguf_file(&gguf).unwrap();
    let from_hf = verity::Tokenizer::from_hf_dir(&hf).unwrap();
    assert_eq!(from_hf.vocab_size(), from_gguf.vocab_size());
    let text = "the thin hen";
    assert_eq!(
        from_hf.encode(text, false).unwrap(),
        from_gguf.encode(text, false).unwrap()
    );
    // A file that is no model is an error naming the flag.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verity"))
        .args([
            "bench",
            "tokenizer",
            "--model",
            "/nonexistent.gguf",
            "--out",
        ])
        .arg(hf.join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model /nonexistent.gguf"));
}

#[test]
fn bench_logits_writes_the_row_and_a_greedy_continuation_the_engine_agrees_with() {
    let (gguf, hf) = tiny_gguf_and_hf("bench-logits");
    let dir = hf.parent().unwrap().to_path_buf();
    let logits = |model: &std::path::Path, out: &std::path::Path| {
        run_ok(&[
            "bench".as_ref(),
            "logits".as_ref(),
            "--device".as_ref(),
            "cpu".as_ref(),
            "--ids".as_ref(),
            "5,17,200,42,9".as_ref(),
            "--steps".as_ref(),
            "6".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        read_json(out)
    };
    let a = logits(&hf, &dir.join("hf.json"));
    let row = f32s(&a["logits"]);
    assert_eq!(row.len(), 300);
    assert_eq!(a["vocab_size"], 300);
    assert_eq!(a["device"], "cpu");
    assert_eq!(a["prompt_ids"], serde_json::json!([5, 17, 200, 42, 9]));
    let greedy = a["greedy"].as_array().unwrap();
    assert_eq!(greedy.len(), 6);
    // The first greedy token is the row's arg-max, its log-prob the row's log-softmax.
    let (best, &max) = row
        .iter()
        .enumerate()
        .max_by(|x, y| x.1.total_cmp(y.1))
        .unwrap();
    assert_eq!(greedy[0]["id"], best);
    let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
    let logprob = greedy[0]["logprob"].as_f64().unwrap() as f32;
    assert!(
        (logprob - (max - lse)).abs() < 1e-4,
        "{logprob} vs {}",
        max - lse
    );
    assert!(greedy[0]["top2_gap"].as_f64().unwrap() >= 0.0);
    // The engine decodes the same tokens with the same statistics; the device statistics
    // (candle ops) match src/stats.rs.
    let engine_tokens: Vec<u64> = a["engine"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect();
    let direct_tokens: Vec<u64> = greedy.iter().map(|g| g["id"].as_u64().unwrap()).collect();
    assert_eq!(engine_tokens, direct_tokens);
    for (i, g) in greedy.iter().enumerate() {
        for field in ["logprob", "entropy", "self_certainty", "confidence"] {
            let host = g["stats"][field].as_f64().unwrap();
            let device = g["device_stats"][field].as_f64().unwrap();
            let engine = a["engine"]["stats"][i][field].as_f64().unwrap();
            assert!((host - device).abs() < 1e-3, "{field}: {host} vs {device}");
            assert!((host - engine).abs() < 1e-3, "{field}: {host} vs {engine}");
        }
    }
    // The GGUF of the same weights gives the same row.
    let b = logits(&gguf, &dir.join("gguf.json"));
    let diff = row
        .iter()
        .zip(f32s(&b["logits"]))
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-3, "HF folder vs GGUF: max |Δ| {diff}");

    // An id outside the vocabulary is an error naming the flag.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verity"))
        .args(["bench", "logits", "--device", "cpu", "--ids", "1,300"])
        .arg("--model")
        .arg(&hf)
        .arg("--out")
        .arg(dir.join("bad.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--ids") && stderr.contains("300"),
        "{stderr}"
    );
}

#[test]
fn bench_train_saves_an_adapter_that_bench_logits_applies() {
    let (_, hf) = tiny_gguf_and_hf("bench-train");
    let dir = hf.parent().unwrap().to_path_buf();
    let peft = dir.join("peft");
    let report = dir.join("train.json");
    let out = run_ok(&[
        "bench".as_ref(),
        "train".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--model".as_ref(),
        hf.as_os_str(),
        "--prompts".as_ref(),
        "2".as_ref(),
        "--group".as_ref(),
        "2".as_ref(),
        "--prompt-tokens".as_ref(),
        "6".as_ref(),
        "--completion-tokens".as_ref(),
        "5".as_ref(),
        "--rank".as_ref(),
        "2".as_ref(),
        "--alpha".as_ref(),
        "4".as_ref(),
        "--micro-batch".as_ref(),
        "2".as_ref(),
        "--lr".as_ref(),
        "0.05".as_ref(),
        "--steps".as_ref(),
        "2".as_ref(),
        "--save-peft".as_ref(),
        peft.as_os_str(),
        "--json".as_ref(),
        report.as_os_str(),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("hand-off"));
    let r = read_json(&report);
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    for s in steps {
        assert_eq!(s["applied"], true, "{s}");
        assert_eq!(s["tokens"], 2 * 2 * 5);
        assert!(s["handoff_seconds"].as_f64().unwrap() >= 0.0);
    }
    assert!(r["step_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(r["rank"], 2);
    let config = read_json(&peft.join("adapter_config.json"));
    assert_eq!(config["r"], 2);
    assert_eq!(config["target_modules"].as_array().unwrap().len(), 7);

    // The adapter changes the logits, and the engine applies it like the direct path.
    let logits = |adapter: Option<&std::path::Path>, out: &std::path::Path| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "bench".as_ref(),
            "logits".as_ref(),
            "--device".as_ref(),
            "cpu".as_ref(),
            "--ids".as_ref(),
            "3,1,4,1,5".as_ref(),
            "--steps".as_ref(),
            "4".as_ref(),
            "--model".as_ref(),
            hf.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter".as_ref(), a.as_os_str()]);
        }
        run_ok(&args);
        read_json(out)
    };
    let base = logits(None, &dir.join("base.json"));
    let tuned = logits(Some(&peft), &dir.join("tuned.json"));
    assert_eq!(tuned["adapter"].as_str(), Some(peft.to_str().unwrap()));
    let moved = f32s(&base["logits"])
        .iter()
        .zip(f32s(&tuned["logits"]))
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-3, "the adapter does not change the logits");
    let direct: Vec<&serde_json::Value> = tuned["greedy"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| &g["id"])
        .collect();
    let engine: Vec<&serde_json::Value> = tuned["engine"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(direct, engine);
}

#[test]
fn bench_decode_writes_json_with_a_prompt_of_the_given_length() {
    let gguf = tiny_files(Architecture::Qwen2, "bench-decode");
    let report = gguf.parent().unwrap().join("decode.json");
    let out = run_ok(&[
        "bench".as_ref(),
        "decode".as_ref(),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--model".as_ref(),
        gguf.as_os_str(),
        "--batches".as_ref(),
        "1,3".as_ref(),
        "--stats-batches".as_ref(),
        "3".as_ref(),
        "--repeats".as_ref(),
        "1".as_ref(),
        "--rounds".as_ref(),
        "2".as_ref(),
        "--tokens".as_ref(),
        "4".as_ref(),
        "--prompt-tokens".as_ref(),
        "20".as_ref(),
        "--json".as_ref(),
        report.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("batch   3"), "{stdout}");
    assert!(stdout.contains("after a prompt of 20 tokens"), "{stdout}");
    let r = read_json(&report);
    assert_eq!(r["device"], "cpu");
    assert_eq!(r["prompt_tokens"], 20);
    assert_eq!(r["new_tokens"], 4);
    assert!(r["weight_bytes_per_token"].as_u64().unwrap() > 0);
    let batches = r["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 2);
    for (row, b) in batches.iter().zip([1u64, 3]) {
        assert_eq!(row["batch"], b);
        assert_eq!(
            row["generated_tokens"],
            b * 4,
            "EOS must not end a sequence"
        );
        assert!(row["tokens_per_second"].as_f64().unwrap() > 0.0);
        // Two rounds, and the row is the best of them.
        let rounds: Vec<f64> = row["rounds_tokens_per_second"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap())
            .collect();
        assert_eq!(rounds.len(), 2);
        let best = rounds.iter().copied().fold(0.0, f64::max);
        assert!((row["tokens_per_second"].as_f64().unwrap() - best).abs() < 1e-9 * best);
    }
    let stats = r["stats"].as_array().unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(stats[0]["batch"], 3);
    assert_eq!(stats[0]["with_stats"]["generated_tokens"], 12);
    assert_eq!(stats[0]["without_stats"]["generated_tokens"], 12);
    assert!(stats[0]["extra_time_percent"].as_f64().unwrap().is_finite());
    assert_eq!(r["shared_prompt"]["n"], 16);

    // A zero batch is an error naming the flag.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verity"))
        .args(["bench", "decode", "--device", "cpu", "--batches", "0"])
        .arg("--model")
        .arg(&gguf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--batches"));
}

/// Every architecture through the binary: `info` names it, `sample --n 16` draws 16 traces
/// of one prefilled prompt, and `rl` runs 2 GRPO steps and saves a PEFT adapter under the
/// architecture's module names (Phi-3's fused `qkv_proj` and `gate_up_proj`). The tiny
/// fixtures get a ChatML template (rl renders chats); Phi-3's LongRoPE context of 64 is too
/// short for the task prompts, so its copy uses plain RoPE (the block is what is exercised).
#[test]
fn sample_and_rl_run_on_every_architecture() {
    let bin = env!("CARGO_BIN_EXE_verity");
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{args:?}\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let root = temp_dir("every-arch");
    let data = root.join("tasks.jsonl");
    run(&[
        "tasks".as_ref(),
        "--n".as_ref(),
        "2".as_ref(),
        "--out".as_ref(),
        data.as_os_str(),
    ]);
    let fixtures = repo().join("tests/fixtures/tiny");
    let chatml = std::fs::read_to_string(fixtures.join("qwen3/tokenizer_config.json")).unwrap();
    for (name, arch, modules) in [
        ("qwen3", "qwen3", &["q_proj", "gate_proj"][..]),
        ("llama3", "llama", &["q_proj", "gate_proj"]),
        ("mistral", "llama", &["q_proj", "gate_proj"]),
        ("gemma3", "gemma3", &["q_proj", "gate_proj"]),
        ("phi3", "phi3", &["qkv_proj", "gate_up_proj"]),
    ] {
        let model = root.join(name);
        std::fs::create_dir_all(&model).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(fixtures.join(name).join(f), model.join(f)).unwrap();
        }
        std::fs::write(model.join("tokenizer_config.json"), &chatml).unwrap();
        if name == "phi3" {
            let path = model.join("config.json");
            let mut c: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            c["rope_parameters"] = serde_json::json!({"rope_type": "default",
                "rope_theta": 1e4, "partial_rotary_factor": 0.75});
            std::fs::write(&path, c.to_string()).unwrap();
        }
        let m = model.as_os_str();
        let info = run(&["info".as_ref(), "--model".as_ref(), m]);
        assert!(info.contains(&format!("architecture:  {arch}")), "{info}");
        let sample = run(&[
            "sample".as_ref(),
            "--model".as_ref(),
            m,
            "--n".as_ref(),
            "16".as_ref(),
            "--max-tokens".as_ref(),
            "6".as_ref(),
            "--prompt".as_ref(),
            "2 + 2 =".as_ref(),
        ]);
        assert!(
            sample.contains("── sample 15 ") && !sample.contains("── sample 16 "),
            "{name}: {sample}"
        );
        let out = root.join(format!("{name}-rl"));
        run(&[
            "rl".as_ref(),
            "--model".as_ref(),
            m,
            "--data".as_ref(),
            data.as_os_str(),
            "--steps".as_ref(),
            "2".as_ref(),
            "--group".as_ref(),
            "2".as_ref(),
            "--prompts-per-step".as_ref(),
            "1".as_ref(),
            "--max-tokens".as_ref(),
            "8".as_ref(),
            "--reward".as_ref(),
            "ttrl".as_ref(),
            "--eval-every".as_ref(),
            "1".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ]);
        // Without labels, the policy of every probe step is kept for scoring afterwards.
        for step in ["step-0001", "step-0002"] {
            let snapshot = out.join("checkpoints/steps").join(step);
            assert!(
                snapshot.join("adapter_model.safetensors").is_file()
                    && snapshot.join("adapter_config.json").is_file(),
                "{name}: no snapshot {}",
                snapshot.display()
            );
        }
        // The guard's label-free signals: finished agreement counts only rollouts that
        // finished with an answer, so it is at most the plain agreement and the share
        // answered, and nothing when every rollout ran to the token limit.
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        for line in metrics.lines() {
            let m: serde_json::Value = serde_json::from_str(line).unwrap();
            let get = |k: &str| {
                m[k].as_f64()
                    .unwrap_or_else(|| panic!("{name}: {k} missing from {m}"))
            };
            let (finished, answered) = (get("finished_agreement"), get("answered"));
            assert!(
                finished <= get("agreement") + 1e-9 && finished <= answered + 1e-9,
                "{name}: {m}"
            );
            assert!((0.0..=1.0).contains(&get("echoed")), "{name}: {m}");
            if get("truncated") == 1.0 {
                assert_eq!((finished, answered), (0.0, 0.0), "{name}: {m}");
            }
        }
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap();
        let targets = config["target_modules"].as_array().unwrap();
        for module in modules {
            assert!(targets.iter().any(|t| t == module), "{name}: {targets:?}");
        }
    }
    // A model without a chat template: rl and eval say why before they write anything.
    for (command, out) in [
        ("rl", root.join("no-template-rl")),
        ("eval", root.join("no-template.jsonl")),
    ] {
        let failed = std::process::Command::new(bin)
            .arg(command)
            .arg("--model")
            .arg(fixtures.join("llama3"))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(
            !failed.status.success() && stderr.contains("no chat template"),
            "{command}: {stderr}"
        );
        assert!(
            !out.exists(),
            "{command} wrote {} before failing",
            out.display()
        );
    }
}
