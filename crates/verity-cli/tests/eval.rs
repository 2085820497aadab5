//! The evaluation harness end to end on SmolLM2 with a few synthetic problems, through the
//! `verity` binary as a user runs it: tasks → eval (every rule, DeepConf-online, online
//! ESC) → table and trace JSONL → the same table again from the trace file (`--from`).

#[path = "../../../tests/common/mod.rs"]
mod common;
use common::*;
use std::ffi::OsString;

const RULES: &str = "greedy,majority,esc:2,borda:0.5,max:self_certainty,deepconf:bottom10:16:50";

/// Runs `verity eval ARGS` and asserts that it fails with a message naming `says`.
fn assert_eval_refuses(args: &[OsString], says: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_verity"))
        .arg("eval")
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(says),
        "{args:?}: {stderr}"
    );
}

/// A JSONL file's lines.
fn json_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `lines` that `keep` keeps, in question order.
fn by_question(
    lines: &[serde_json::Value],
    keep: impl Fn(&serde_json::Value) -> bool,
) -> Vec<&serde_json::Value> {
    let mut v: Vec<_> = lines.iter().filter(|l| keep(l)).collect();
    v.sort_by_key(|l| l["question"].as_u64());
    v
}

#[test]
fn eval_harness_runs_end_to_end_on_smollm2() {
    let dir = temp_dir("eval");
    let bin = env!("CARGO_BIN_EXE_verity");
    let data = dir.join("tasks.jsonl");
    let out = std::process::Command::new(bin)
        .args([
            "tasks",
            "--kind",
            "arithmetic",
            "--difficulty",
            "1",
            "--n",
            "3",
            "--seed",
            "7",
            "--out",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&data).unwrap().lines().count(), 3);

    // Rules `select` and `online` on the same questions, with `extra` arguments.
    let eval_rules = |out_path: &std::path::Path, select: &str, online: &str, extra: &[&str]| {
        std::process::Command::new(bin)
            .args(["eval", "--n", "4", "--max-tokens", "48"])
            .args(["--select", select, "--online", online])
            .args(extra)
            .arg("--model")
            .arg(real_model(SMOLLM2))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(out_path)
            .output()
            .unwrap()
    };
    // Every rule and DeepConf-online.
    let eval = |out_path: &std::path::Path, extra: &[&str]| {
        eval_rules(out_path, RULES, "2:50:16,esc:2", extra)
    };
    let traces = dir.join("run.jsonl");
    let out = eval(&traces, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    for rule in [
        "greedy",
        "majority",
        "borda:0.5",
        "max:self_certainty",
        "deepconf:bottom10:16:50",
        "online deepconf-online:2:50:16",
        "online esc:2",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(rule))
            .unwrap_or_else(|| panic!("no row for {rule} in\n{stdout}"));
        assert!(line.contains('%'), "{line}");
    }
    assert!(stdout.contains("(3 questions, n = 4)"));
    // Every sampled trace and every greedy trace is written, with scores and correctness.
    let lines = json_lines(&traces);
    assert_eq!(
        lines.iter().filter(|l| l["kind"] == "sample").count(),
        3 * 4
    );
    assert_eq!(lines.iter().filter(|l| l["kind"] == "greedy").count(), 3);
    for l in lines.iter().filter(|l| l["kind"] == "sample") {
        assert!(l["scores"]["self_certainty"].is_number(), "{l}");
        assert!(l["correct"].is_boolean());
    }
    // Every rule's answer per question, and DeepConf-online's, are written too.
    let rule_lines = |rule: &str| by_question(&lines, |l| l["kind"] == "rule" && l["rule"] == rule);
    let online = |rule: Option<&str>| {
        by_question(&lines, |l| {
            l["kind"] == "online" && l["rule"].as_str() == rule
        })
    };
    assert_eq!(
        online(Some("deepconf-online:2:50:16")).len(),
        3,
        "DeepConf-online"
    );
    // ESC drawn in the engine decides what its simulation on the saved traces decides (sample
    // i is the same trace in both), having decoded at least the tokens the simulation
    // charges and at most all n samples' tokens.
    let esc_online = online(Some("esc:2"));
    assert_eq!(esc_online.len(), 3);
    for ((live, simulated), all) in esc_online
        .iter()
        .zip(rule_lines("esc:2"))
        .zip(rule_lines("majority"))
    {
        assert_eq!(live["answer"], simulated["answer"], "{live} vs {simulated}");
        let t = |l: &serde_json::Value| l["tokens"].as_u64().unwrap();
        assert!(
            t(simulated) <= t(live) && t(live) <= t(all),
            "{live} {simulated} {all}"
        );
    }
    // Majority's answer is the most common sampled answer, where one is most common.
    let mut unique_modes = 0;
    for m in rule_lines("majority") {
        let mut counts = std::collections::HashMap::new();
        for l in lines
            .iter()
            .filter(|l| l["kind"] == "sample" && l["question"] == m["question"])
        {
            if let Some(a) = l["answer"].as_str() {
                *counts.entry(a.to_string()).or_insert(0) += 1;
            }
        }
        let top = counts.values().copied().max().unwrap_or(0);
        let modes: Vec<_> = counts.iter().filter(|(_, &c)| c == top).collect();
        if let [(answer, _)] = modes[..] {
            assert_eq!(m["answer"].as_str(), Some(answer.as_str()), "{m}");
            unique_modes += 1;
        }
    }
    assert!(
        unique_modes > 0,
        "no question had a unique most common answer to check"
    );
    // Each row's accuracy, and its paired count against majority, from the written lines.
    let majority = rule_lines("majority");
    for rule in ["greedy", "borda:0.5", "max:self_certainty"] {
        let mine = rule_lines(rule);
        assert_eq!(mine.len(), 3, "{rule}");
        let correct = mine.iter().filter(|l| l["correct"] == true).count();
        let gained = mine
            .iter()
            .zip(&majority)
            .filter(|(a, b)| a["correct"] == true && b["correct"] == false)
            .count();
        let lost = mine
            .iter()
            .zip(&majority)
            .filter(|(a, b)| a["correct"] == false && b["correct"] == true)
            .count();
        let row = stdout.lines().find(|l| l.starts_with(rule)).unwrap();
        assert!(
            row.contains(&format!("{:.1}%", 100.0 * correct as f64 / 3.0)),
            "{row}"
        );
        assert!(row.contains(&format!("+{gained} −{lost} (p = ")), "{row}");
    }
    // Questions in flight at once (default 4) or one at a time: the same traces and the
    // same table, since every question has its own seeds and a sample's tokens do not
    // depend on what else is in the batch.
    let sequential = dir.join("sequential.jsonl");
    let out = eval(&sequential, &["--concurrency", "1"]);
    assert!(out.status.success());
    let sorted_lines = |path: &std::path::Path| {
        let mut v: Vec<String> = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    assert_eq!(sorted_lines(&traces), sorted_lines(&sequential));
    // Each row up to its accuracy and interval: equal (wall time differs).
    let accuracy_columns = |stdout: &str| -> Vec<String> {
        stdout
            .lines()
            .filter(|l| l.contains('%'))
            .map(|l| l[..l.rfind('%').unwrap()].to_string())
            .collect()
    };
    assert_eq!(
        accuracy_columns(&stdout),
        accuracy_columns(&String::from_utf8_lossy(&out.stdout))
    );
    // One sample at a time (--parallel 1), an online rule decodes exactly the samples its
    // simulation is charged: no sample is cut mid-way, so the tokens are equal, not just
    // bounded as above. adaptive:0.7 settles on any first answer (P = 0.75), so with its
    // default of 4 in flight three samples would be cut.
    let one_at_a_time = dir.join("parallel1.jsonl");
    let out = eval_rules(
        &one_at_a_time,
        "adaptive:0.7",
        "adaptive:0.7",
        &["--parallel", "1"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines1 = json_lines(&one_at_a_time);
    let (live, simulated) = (
        by_question(&lines1, |l| l["kind"] == "online"),
        by_question(&lines1, |l| l["kind"] == "rule"),
    );
    assert_eq!((live.len(), simulated.len()), (3, 3));
    for (live, simulated) in live.iter().zip(&simulated) {
        assert_eq!(live["answer"], simulated["answer"], "{live} vs {simulated}");
        assert_eq!(live["tokens"], simulated["tokens"], "{live} vs {simulated}");
        assert_eq!(
            live["samples_started"], simulated["samples"],
            "{live} vs {simulated}"
        );
    }
    // --parallel needs --online and at least one sample.
    let model = real_model(SMOLLM2);
    let with_model = |extra: &[&str]| -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--model".into(), model.clone().into()];
        args.extend(["--data".into(), data.clone().into()]);
        args.extend(extra.iter().map(OsString::from));
        args
    };
    assert_eval_refuses(&with_model(&["--parallel", "1"]), "--online");
    assert_eval_refuses(
        &with_model(&["--online", "esc:2", "--parallel", "0"]),
        "--parallel",
    );
    // The live run drew its curve next to the trace file.
    assert!(dir.join("run.curve.png").is_file());
    // Re-scoring the trace file, without a model: every rule's row as the live run printed
    // it (wall time aside), and the curve drawn where asked.
    let png = dir.join("again.png");
    let out = std::process::Command::new(bin)
        .args(["eval", "--select", RULES, "--from"])
        .arg(&traces)
        .arg("--plot")
        .arg(&png)
        .output()
        .unwrap();
    let rescored = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let columns = |row: &str| -> Vec<String> {
        // rule, accuracy, interval (3), tokens/q; then the wall column; then the paired test
        let mut words: Vec<String> = row.split_whitespace().map(str::to_string).collect();
        words.remove(6);
        words
    };
    for rule in RULES.split(',') {
        let find = |text: &str| text.lines().find(|l| l.starts_with(rule)).map(columns);
        assert_eq!(
            find(&stdout),
            find(&rescored),
            "{rule}:\n{stdout}\n{rescored}"
        );
        assert!(find(&rescored).is_some(), "{rule}");
    }
    assert!(
        rescored.contains("N = 1") && rescored.contains("N = 4"),
        "{rescored}"
    );
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");
    // What --from cannot do is refused by name: no model flags are needed, online rules
    // and data conflict with it, and :tune needs a tuning split.
    for (extra, says) in [
        (vec!["--online", "esc:2"], "--online"),
        (vec!["--data", "x.jsonl"], "--data"),
        (vec!["--select", "cisc:logprob:tune"], "--tune-fraction"),
        (vec!["--select", "esc:tune"], "--tune-fraction"),
        (vec!["--tune-fraction", "1.0"], "--tune-fraction"),
    ] {
        let mut args: Vec<OsString> = vec!["--from".into(), traces.clone().into()];
        args.extend(extra.iter().map(OsString::from));
        assert_eval_refuses(&args, says);
    }
    // Bad input: a missing data file and an unknown rule are clear errors.
    let missing: Vec<OsString> = ["--data", "/nonexistent.jsonl", "--model"]
        .into_iter()
        .map(OsString::from)
        .chain([model.clone().into()])
        .collect();
    assert_eval_refuses(&missing, "/nonexistent.jsonl");
    assert_eval_refuses(&with_model(&["--select", "bogus"]), "--select");
}

#[test]
fn rl_loop_runs_end_to_end_on_smollm2_and_writes_a_loadable_adapter() {
    let dir = temp_dir("rl");
    let bin = env!("CARGO_BIN_EXE_verity");
    let data = dir.join("train.jsonl");
    let heldout = dir.join("heldout.jsonl");
    for (path, seed, n) in [(&data, "1", "4"), (&heldout, "2", "2")] {
        let out = std::process::Command::new(bin)
            .args([
                "tasks",
                "--difficulty",
                "1",
                "--seed",
                seed,
                "--n",
                n,
                "--out",
            ])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    let out_dir = dir.join("run");
    let out = std::process::Command::new(bin)
        .args([
            "rl",
            "--steps",
            "2",
            "--group",
            "3",
            "--prompts-per-step",
            "1",
            "--max-tokens",
            "12",
            "--eval-every",
            "1",
            "--reward",
            "ttrl",
            "--lr",
            "1e-3",
            "--overlap",
        ])
        .arg("--model")
        .arg(real_model(SMOLLM2))
        .arg("--data")
        .arg(&data)
        .arg("--eval")
        .arg(&heldout)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("held-out greedy accuracy (2 items): before"),
        "{stdout}"
    );
    let metrics = json_lines(&out_dir.join("metrics.jsonl"));
    assert_eq!(metrics.len(), 2);
    for m in &metrics {
        for key in [
            "reward",
            "loss",
            "entropy",
            "clip_fraction",
            "tokens_per_second",
            "train_seconds",
            "rollout_seconds",
            "heldout_accuracy",
        ] {
            assert!(m.get(key).is_some(), "{key} missing from {m}");
        }
    }
    // The final adapter is a PEFT folder that loads back against the model.
    let model = verity::Model::load(real_model(SMOLLM2), &Default::default()).unwrap();
    let adapter = verity::adapter::load_peft(
        &out_dir.join("adapter"),
        model.config(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(adapter.spec.rank, 8);
    assert!(out_dir.join("checkpoints/policy/LATEST").is_file());
    let png = std::fs::read(out_dir.join("plot.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // `verity eval --adapter` on the saved folder measures what `rl` reported as "after":
    // the same greedy decoding of the same items, through the file instead of the live
    // adapter.
    let after = stdout
        .split("→ after ")
        .nth(1)
        .and_then(|rest| rest.split('%').next())
        .unwrap_or_else(|| panic!("no 'after' in {stdout}"))
        .trim()
        .to_string();
    let eval = |adapter: &std::path::Path| {
        std::process::Command::new(bin)
            .args(["eval", "--select", "greedy", "--max-tokens", "12"])
            .arg("--model")
            .arg(real_model(SMOLLM2))
            .arg("--data")
            .arg(&heldout)
            .arg("--adapter")
            .arg(adapter)
            .output()
            .unwrap()
    };
    let out = eval(&out_dir.join("adapter"));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let greedy = table
        .lines()
        .find(|l| l.starts_with("greedy"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no greedy row in {table}"));
    assert_eq!(greedy, format!("{after}%"), "{table}\n{stdout}");
    let out = eval(&dir.join("no-such-adapter"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-adapter"));
}
