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

/// Sends a raw HTTP/1.1 POST; the connection, to read the answer from.
fn send_post(base: &str, path: &str, body: &str) -> TcpStream {
    let addr = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

/// A raw HTTP/1.1 POST; returns (status, headers + body as text).
fn post(base: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = send_post(base, path, body);
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

/// A streamed POST, read up to its first event: by then the server has admitted the
/// request and is decoding it.
struct Streaming {
    reader: BufReader<TcpStream>,
    text: String,
}

impl Streaming {
    /// Posts `body` (which asks for `"stream":true`); `Err` with what the server answered
    /// when that was not an event stream.
    fn start(base: &str, body: &str) -> Result<Self, String> {
        let mut reader = BufReader::new(send_post(base, "/v1/completions", body));
        let mut text = String::new();
        loop {
            let mut line = String::new();
            // (A server that refuses may close before reading the body: a reset.)
            if !matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                return Err(text);
            }
            text.push_str(&line);
            if line.starts_with("data:") {
                return Ok(Self { reader, text });
            }
        }
    }

    /// Reads the rest of the stream; everything received.
    fn finish(mut self) -> String {
        self.reader.read_to_string(&mut self.text).unwrap();
        self.text
    }
}

#[test]
fn full_queue_gets_429_and_shutdown_finishes_in_flight_work() {
    let mut server = start(&["--max-queued", "1"]);
    // One long request holds the only slot (its end-of-text tokens banned, so it runs
    // until it is dropped); another is refused at once. Its first event says it runs.
    let long_body = r#"{"prompt":"Once upon a time","max_tokens":4000,"temperature":0,"stream":true,"logit_bias":{"0":-100,"1":-100,"2":-100}}"#;
    let long = Streaming::start(&server.base, long_body).expect("the long request starts");
    let body = r#"{"prompt":"Once upon a time","max_tokens":96,"temperature":0}"#;
    let (status, text) = post(&server.base, "/v1/completions", body);
    assert_eq!(status, 429, "{text}");
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );
    assert!(long.text.starts_with("HTTP/1.1 200"), "{}", long.text);
    // Dropping the connection cancels the long request and frees the slot.
    drop(long);

    // SIGTERM while a request runs: it completes, then the process exits cleanly.
    let in_flight_body =
        r#"{"prompt":"Once upon a time","max_tokens":96,"temperature":0,"stream":true}"#;
    let deadline = Instant::now() + Duration::from_secs(60);
    let in_flight = loop {
        match Streaming::start(&server.base, in_flight_body) {
            Ok(s) => break s,
            // The cancelled request may still hold the slot for a moment.
            Err(text) if text.starts_with("HTTP/1.1 429") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(text) => panic!("the in-flight request did not start: {text}"),
        }
    };
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let text = in_flight.finish();
    assert!(
        text.contains("\"finish_reason\":\"") && text.contains("data: [DONE]"),
        "the in-flight request was cut off: {text}"
    );
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
