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
