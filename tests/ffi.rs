//! The C ABI end to end: compiles `bindings/c/examples/borda.c` and
//! `bindings/c/tests/abuse.c` with the system C compiler against the cdylib this
//! `cargo test --release` built, runs them, and checks
//! - the example's traces, selection and answer equal what the Rust [`Runtime`] API gives
//!   for the same request and seed (this process computes them and compares the lines);
//! - the abuse test (every entry point with NULL and invalid arguments) passes, natively
//!   with SmolLM2 and, when valgrind is installed, under valgrind without a model;
//! - the Python bindings' test (`bindings/python/test_verity.py`) passes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use verity::chat::ChatMessage;
use verity::engine::Request;
use verity::runtime::{GenerateRequest, Runtime, RuntimeConfig};

/// The cdylib cargo built for this test run: it sits beside the test executable
/// (`target/<profile>/deps/`). Copied into `dir`, so that a concurrent cargo build
/// replacing it cannot change it under the test.
fn cdylib(dir: &Path) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps folder");
    let name = format!(
        "{}verity{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let candidates = [deps.join(&name), deps.parent().unwrap().join(&name)];
    let found = candidates.iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "no {name} beside the test executable ({}); the lib's `cdylib` crate type must be built",
            deps.display()
        )
    });
    let lib_dir = dir.join("lib");
    std::fs::create_dir_all(&lib_dir).unwrap();
    std::fs::copy(found, lib_dir.join(&name)).expect("copy the cdylib");
    lib_dir
}

fn c_compiler() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".into())
}

/// Compiles one C file of `bindings/c` against the cdylib in `lib_dir`.
fn compile(source: &str, lib_dir: &Path, out: &Path) {
    let c_dir = common::repo().join("bindings/c");
    let output = Command::new(c_compiler())
        .args(["-O1", "-g", "-Wall", "-Wextra", "-Werror", "-std=c11"])
        .arg("-I")
        .arg(&c_dir)
        .arg(c_dir.join(source))
        .arg("-o")
        .arg(out)
        .arg(format!("-L{}", lib_dir.display()))
        // RPATH rather than RUNPATH: it wins over LD_LIBRARY_PATH, which cargo points at
        // target/<profile> (where an older libverity.so may lie).
        .arg(format!(
            "-Wl,--disable-new-dtags,-rpath,{}",
            lib_dir.display()
        ))
        .arg("-lverity")
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler '{}': {e}", c_compiler()));
    assert!(
        output.status.success(),
        "compiling {source} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn run(command: &mut Command) -> (String, Output) {
    let output = command
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    println!(
        "$ {command:?}\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    (stdout, output)
}

// The request borda.c makes.
const PROMPT: &str = "What is 17 * 23? Put the answer in \\boxed{}.";

#[test]
fn c_example_gives_what_the_rust_api_gives() {
    let model = common::real_model(common::SMOLLM2);
    let dir = common::temp_dir("ffi-example");
    let lib = cdylib(&dir);
    let exe = dir.join("borda");
    compile("examples/borda.c", &lib, &exe);
    let (stdout, _) = run(Command::new(&exe).arg(&model));

    // The same request through the Rust API.
    let runtime = Runtime::new(RuntimeConfig {
        model: model.clone(),
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let mut request = Request::chat(vec![ChatMessage::new("user", PROMPT)]);
    request.n = 8;
    request.max_tokens = 128;
    request.sampling.temperature = 0.8;
    request.sampling.top_p = 0.95;
    request.sampling.seed = 42;
    let result = runtime
        .generate(GenerateRequest {
            selection: Some("borda:0.5".parse().unwrap()),
            ..GenerateRequest::new(request)
        })
        .expect("generate");
    let mut expected: Vec<String> = result
        .traces
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "trace {i}: tokens={} self_certainty={:.4} answer={}",
                t.trace.tokens.len(),
                t.scores["self_certainty"],
                t.answer.as_deref().unwrap_or("(none)")
            )
        })
        .collect();
    expected.push(match result.selected {
        Some(i) => format!("selected: {i}"),
        None => "selected: (none)".into(),
    });
    expected.push(format!(
        "answer: {}",
        result.answer.as_deref().unwrap_or("(none)")
    ));
    let printed: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            l.starts_with("trace ") || l.starts_with("selected: ") || l.starts_with("answer: ")
        })
        .collect();
    assert_eq!(printed, expected, "the C example and the Rust API disagree");

    // Feedback went in and the learning step moved the adapter iff it applied.
    let learn = stdout
        .lines()
        .find(|l| l.starts_with("learn: "))
        .expect("a learn line");
    let versions = stdout
        .lines()
        .find(|l| l.starts_with("adapter learned: version "))
        .expect("an adapter version line");
    let applied = learn.starts_with("learn: applied=1");
    let expected_versions = if applied {
        "adapter learned: version 0 -> 1"
    } else {
        "adapter learned: version 0 -> 0"
    };
    assert_eq!(versions, expected_versions, "{learn}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn c_abuse_test_passes() {
    let model = common::real_model(common::SMOLLM2);
    let dir = common::temp_dir("ffi-abuse");
    let lib = cdylib(&dir);
    let exe = dir.join("abuse");
    compile("tests/abuse.c", &lib, &exe);
    let (stdout, _) = run(Command::new(&exe).arg(&model));
    assert!(stdout.contains(", 0 failures"), "{stdout}");

    // Under valgrind the abuse test runs the checks that need no model: every entry point
    // with NULL, made-up and freed handles. valgrind has no AVX-512 support, and this crate
    // builds with target-cpu=native, where the compiler may use AVX-512 anywhere (not only
    // in the model's kernels), so on such a CPU valgrind cannot run it at all.
    let avx512 = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" avx512f"));
    let valgrind = Command::new("valgrind").arg("--version").output();
    match valgrind {
        Ok(_) if avx512 => {
            println!(
                "this CPU has AVX-512, which valgrind cannot run: the abuse test ran natively only"
            )
        }
        Ok(v) if v.status.success() => {
            let (stdout, _) = run(Command::new("valgrind")
                .args(["-q", "--error-exitcode=99", "--track-origins=yes"])
                .arg(&exe));
            assert!(stdout.contains(", 0 failures"), "{stdout}");
        }
        _ => println!("valgrind is not installed: the abuse test ran natively only"),
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn python_bindings_pass_their_tests() {
    let model = common::real_model(common::SMOLLM2);
    let dir = common::temp_dir("ffi-python");
    let lib = cdylib(&dir);
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let script = common::repo().join("bindings/python/test_verity.py");
    let (_, output) = run(Command::new(&python)
        .arg(&script)
        .arg(&model)
        .env("VERITY_LIB", lib.join("libverity.so"))
        .env("PYTHONDONTWRITEBYTECODE", "1"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\nOK"),
        "unittest did not report OK:\n{stderr}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The C status of what the runtime returns keeps its kind: a decode step that fails is
/// `VERITY_ERR_INTERNAL` (verity's fault), a bad parameter `VERITY_ERR_INVALID_ARGUMENT`
/// (the caller's), a runtime being freed under a request `VERITY_ERR_UNAVAILABLE`; and the
/// runtime keeps working after the failed step.
#[test]
fn c_status_codes_tell_internal_failures_from_bad_arguments() {
    use std::ffi::{CStr, CString};
    use verity::ffi::verity_status::*;
    use verity::ffi::*;
    let model = CString::new(common::real_model(common::SMOLLM2).to_str().unwrap()).unwrap();
    let last_error = || {
        unsafe { CStr::from_ptr(verity_last_error()) }
            .to_string_lossy()
            .into_owned()
    };
    unsafe {
        let mut params = verity_runtime_default_params();
        let bad_device = CString::new("cuda:7").unwrap();
        params.device = bad_device.as_ptr();
        let mut rt: *mut verity_runtime = std::ptr::null_mut();
        let status = verity_runtime_new(model.as_ptr(), params, &mut rt);
        assert_eq!(status, VERITY_ERR_INVALID_ARGUMENT, "{}", last_error());
        assert!(last_error().contains("device 'cuda:7'"), "{}", last_error());

        let cpu = CString::new("cpu").unwrap();
        params.device = cpu.as_ptr();
        // A LoRA rank or α a host passes is bounded before anything is allocated: 1<<28
        // used to abort the whole process (allocation failure), SIZE_MAX to panic.
        for rank in [1usize << 28, usize::MAX, 577] {
            let mut p = params;
            p.lora_rank = rank;
            let status = verity_runtime_new(model.as_ptr(), p, &mut rt);
            assert_eq!(
                status,
                VERITY_ERR_OUT_OF_RANGE,
                "rank {rank}: {}",
                last_error()
            );
            assert!(
                last_error().contains(&format!("rank {rank}")),
                "{}",
                last_error()
            );
            assert!(rt.is_null());
        }
        for alpha in [f64::NAN, f64::INFINITY, 1e308] {
            let mut p = params;
            p.lora_alpha = alpha;
            let status = verity_runtime_new(model.as_ptr(), p, &mut rt);
            assert_eq!(
                status,
                VERITY_ERR_OUT_OF_RANGE,
                "alpha {alpha}: {}",
                last_error()
            );
            assert!(last_error().contains("alpha"), "{}", last_error());
        }
        assert_eq!(
            verity_runtime_new(model.as_ptr(), params, &mut rt),
            VERITY_OK,
            "{}",
            last_error()
        );
        let prompt = CString::new("Hello").unwrap();
        let mut request = verity_generate_default_params();
        request.prompt = prompt.as_ptr();
        request.max_tokens = 4;
        let mut out: *mut verity_result = std::ptr::null_mut();

        assert_eq!(verity_test_fail_next_decode_steps(rt, 1), VERITY_OK);
        assert_eq!(verity_generate(rt, &request, &mut out), VERITY_ERR_INTERNAL);
        assert!(
            last_error().contains("decode step failed"),
            "{}",
            last_error()
        );
        assert!(out.is_null());

        assert_eq!(
            verity_generate(rt, &request, &mut out),
            VERITY_OK,
            "{}",
            last_error()
        );
        assert_eq!(verity_result_free(out), VERITY_OK);

        request.temperature = -1.0;
        assert_eq!(
            verity_generate(rt, &request, &mut out),
            VERITY_ERR_INVALID_ARGUMENT
        );
        assert!(last_error().contains("temperature"), "{}", last_error());
        request.temperature = 0.0;
        // A host's mistakes in the request are its own, never INTERNAL: an empty prompt,
        // more samples than a batch holds, more than the ABI allows.
        let empty = CString::new("").unwrap();
        let mut r = request;
        r.prompt = empty.as_ptr();
        assert_eq!(
            verity_generate(rt, &r, &mut out),
            VERITY_ERR_INVALID_ARGUMENT,
            "{}",
            last_error()
        );
        assert!(last_error().contains("no tokens"), "{}", last_error());
        for (n, status, says) in [
            (65, VERITY_ERR_INVALID_ARGUMENT, "batch limit"),
            (VERITY_MAX_SAMPLES + 1, VERITY_ERR_OUT_OF_RANGE, "params.n"),
        ] {
            let mut r = request;
            r.n = n;
            assert_eq!(verity_generate(rt, &r, &mut out), status, "n = {n}");
            assert!(last_error().contains(says), "n = {n}: {}", last_error());
            assert!(!last_error().contains("invalid argument: invalid argument"));
        }
        assert_eq!(verity_runtime_free(rt), VERITY_OK);
    }
    // The one mapping, checked against each kind.
    use verity::Error;
    for (error, status) in [
        (Error::Internal("x".into()), VERITY_ERR_INTERNAL),
        (Error::Unavailable("x".into()), VERITY_ERR_UNAVAILABLE),
        (
            Error::InvalidArgument("x".into()),
            VERITY_ERR_INVALID_ARGUMENT,
        ),
        (Error::OutOfRange("x".into()), VERITY_ERR_OUT_OF_RANGE),
        (Error::NotFound("x".into()), VERITY_ERR_NOT_FOUND),
        (Error::Busy("x".into()), VERITY_ERR_BUSY),
    ] {
        assert_eq!(status_of(&error), status, "{error}");
    }
}
