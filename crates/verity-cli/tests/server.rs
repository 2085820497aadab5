//! The HTTP server end to end: `verity serve` on SmolLM2, driven by the official `openai`
//! Python client (crates/verity-cli/tests/server_client.py: completions, chat, n > 1, streaming, logprobs,
//! the verity extensions, bad requests, feedback → learn, a 32 × 20 load test), then a
//! full queue answered with 429 + Retry-After, and a graceful shutdown on SIGTERM that
//! lets an in-flight request finish.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `verity serve` on a free port and waits for its "serving" line.
fn start(extra: &[&str]) -> Server {
    let model = common::real_model(common::SMOLLM2);
    let mut child = Command::new(env!("CARGO_BIN_EXE_verity"))
        .args(["serve", "--port", "0", "--model"])
        .arg(&model)
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start verity serve");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("verity serve exited before serving")
            .expect("read stderr");
        if let Some(rest) = line.split("on http://").nth(1) {
            break format!("http://{}", rest.split_whitespace().next().unwrap());
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Server { child, base }
}

/// A raw HTTP/1.1 POST; returns (status, headers + body as text).
fn post(base: &str, path: &str, body: &str) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

#[test]
fn openai_client_extensions_learning_and_load() {
    let key = "test-key-123";
    let server = start(&["--api-key", key]);
    let out = Command::new("python3")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/server_client.py"))
        .args([&server.base, key, &server.child.id().to_string()])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'openai'"),
        "the server test needs the openai client: python3 -m pip install openai"
    );
    assert!(
        out.status.success(),
        "server client checks failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for line in stdout.lines().filter(|l| l.starts_with("LOAD ")) {
        eprintln!("{line}");
    }
    assert!(stdout.contains("server client checks passed"));
}

#[test]
fn full_queue_gets_429_and_shutdown_finishes_in_flight_work() {
    let mut server = start(&["--max-queued", "1"]);
    let body = r#"{"prompt":"Once upon a time","max_tokens":96,"temperature":0}"#;
    // One long request holds the only slot; the others are refused at once.
    let base = server.base.clone();
    let long = std::thread::spawn(move || post(&base, "/v1/completions", body));
    std::thread::sleep(Duration::from_millis(300));
    let (status, text) = post(&server.base, "/v1/completions", body);
    assert_eq!(status, 429, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );
    let (status, text) = long.join().unwrap();
    assert_eq!(status, 200, "{text}");

    // SIGTERM while a request runs: it completes, then the process exits cleanly.
    let base = server.base.clone();
    let in_flight = std::thread::spawn(move || post(&base, "/v1/completions", body));
    std::thread::sleep(Duration::from_millis(300));
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (status, text) = in_flight.join().unwrap();
    assert_eq!(status, 200, "the in-flight request was cut off: {text}");
    assert!(text.contains("\"finish_reason\""), "{text}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "exit status {exit}");
}
