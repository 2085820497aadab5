//! Error kinds over HTTP, in process: a decode step that fails is a 500 `server_error`
//! (also as the last event of a stream that already started), a bad parameter a 400
//! naming it, and the server keeps serving after the failure; adapter paths that leave the
//! adapter folder are 400s; a client that stalls or floods is cut off without holding up
//! anyone else.

#[path = "../../../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use verity::{Runtime, RuntimeConfig};
use verity_server::ServerConfig;

/// A raw HTTP/1.1 POST; returns (status, body).
fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A runtime over SmolLM2, saving adapters under `adapter_dir`.
fn smollm2(adapter_dir: Option<std::path::PathBuf>) -> Arc<Runtime> {
    Arc::new(
        Runtime::new(RuntimeConfig {
            model: common::real_model(common::SMOLLM2),
            adapter_dir,
            ..RuntimeConfig::default()
        })
        .expect("runtime"),
    )
}

/// A server on a free local port for `runtime`; stop it with the sender, then join.
fn serve(
    runtime: Arc<Runtime>,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    serve_with(runtime, ServerConfig::default())
}

/// [`serve`] with `config` (its address is ignored).
fn serve_with(
    runtime: Arc<Runtime>,
    config: ServerConfig,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            verity_server::serve_on(listener, runtime, config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
    });
    (addr, stop, server)
}

#[test]
fn decode_failures_are_500_and_bad_parameters_400() {
    let runtime = smollm2(None);
    let (addr, stop, server) = serve(runtime.clone());
    let body = r#"{"prompt": "Hello", "max_tokens": 4}"#;

    runtime.fail_next_decode_steps(1);
    let (status, text) = post(addr, "/v1/completions", body);
    assert_eq!(status, 500, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"]["type"], "server_error", "{text}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("decode step failed"));

    // Streaming: the headers went out before the failure, so the error (with the status it
    // would have had) is the stream's last event.
    runtime.fail_next_decode_steps(1);
    let (status, text) = post(
        addr,
        "/v1/completions",
        r#"{"prompt": "Hello", "max_tokens": 4, "stream": true}"#,
    );
    assert_eq!(status, 200, "{text}");
    let last = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .next_back()
        .expect("an event");
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["error"]["code"], 500, "{text}");

    let (status, text) = post(addr, "/v1/completions", body);
    assert_eq!(
        status, 200,
        "the server serves on after a failed step: {text}"
    );

    let (status, text) = post(
        addr,
        "/v1/completions",
        r#"{"prompt": "Hello", "max_tokens": 4, "temperature": -1}"#,
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("temperature"), "{text}");

    let _ = stop.send(());
    server.join().unwrap();
}

/// Clients name adapter folders inside the server's adapter_dir only: an absolute path,
/// `..` or a link out of it is a 400 that writes and reads nothing (`"path": "/"` used to
/// create `/learned/v1`); without an adapter_dir no path is accepted at all.
#[test]
fn adapter_paths_stay_inside_the_adapter_dir() {
    let root = common::temp_dir("server-adapter-root");
    let outside = common::temp_dir("server-adapter-outside");
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
    let runtime = smollm2(Some(root.clone()));
    let (addr, stop, server) = serve(runtime);
    let action = |action: &str, path: &str| {
        post(
            addr,
            "/v1/adapters",
            &serde_json::json!({"action": action, "id": "learned", "path": path}).to_string(),
        )
    };
    for bad in ["/", "/tmp", "../x", "a/../../x", "escape", "escape/deeper"] {
        for verb in ["save", "load"] {
            let (status, text) = action(verb, bad);
            assert_eq!(status, 400, "{verb} {bad}: {text}");
            assert!(text.contains("path"), "{verb} {bad}: {text}");
        }
    }
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside"
    );

    // Inside the root: saved under root/kept/learned/v1, and loaded back from there.
    let (status, text) = action("save", "kept");
    assert_eq!(status, 200, "{text}");
    let saved = root.canonicalize().unwrap().join("kept/learned/v1");
    assert!(saved.join("adapter_config.json").is_file(), "{text}");
    let (status, text) = action("load", "kept/learned/v1");
    assert_eq!(status, 200, "{text}");
    // Client mistakes inside the root are 4xx naming the path, relative to the root: no
    // such folder (404), a file where a folder should be, a folder that is not an adapter.
    std::fs::write(root.join("file"), "x").unwrap();
    std::fs::create_dir_all(root.join("broken")).unwrap();
    std::fs::write(root.join("broken/adapter_config.json"), "{").unwrap();
    std::fs::write(root.join("broken/adapter_model.safetensors"), "not tensors").unwrap();
    for (verb, path, want) in [
        ("load", "missing", 404),
        ("load", "file", 400),
        ("load", "broken", 400),
        ("save", "file", 400),
    ] {
        let (status, text) = action(verb, path);
        assert_eq!(status, want, "{verb} {path}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], "path", "{text}");
        let root_text = root.canonicalize().unwrap().display().to_string();
        assert!(!text.contains(&root_text), "{verb} {path}: {text}");
    }
    let _ = stop.send(());
    server.join().unwrap();

    // No adapter_dir: paths are refused, saying how to allow them.
    let runtime = smollm2(None);
    let (addr, stop, server) = serve(runtime);
    let (status, text) = post(
        addr,
        "/v1/adapters",
        r#"{"action": "load", "id": "x", "path": "kept"}"#,
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("--adapter-dir"), "{text}");
    let _ = stop.send(());
    server.join().unwrap();
}

/// Values a client could not have meant are 400s naming the parameter, not silently
/// read as something else: `stream_options` that is not an object (or has unknown or
/// non-boolean fields), a user or system message without content, and min_traces beyond
/// what the runtime keeps.
#[test]
fn nonsense_values_are_400s_naming_the_parameter() {
    let runtime = smollm2(None);
    let (addr, stop, server) = serve(runtime);
    let user = serde_json::json!([{"role": "user", "content": "Hi"}]);
    let cases = [
        (
            serde_json::json!({"messages": user, "stream": true, "stream_options": "x"}),
            "stream_options",
        ),
        (
            serde_json::json!({"messages": user, "stream_options": {"include_usage": 1}}),
            "stream_options.include_usage",
        ),
        (
            serde_json::json!({"messages": user, "stream_options": {"usage": true}}),
            "stream_options",
        ),
        (
            serde_json::json!({"messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            serde_json::json!({"messages": [{"role": "system", "content": null}, {"role": "user", "content": "Hi"}]}),
            "messages[0].content",
        ),
        (
            serde_json::json!({"messages": user, "n": 4, "verity": {"selection": "majority", "parallel": 2}}),
            "verity.parallel",
        ),
        (
            serde_json::json!({"messages": user, "n": 4, "verity": {"selection": "esc:2", "parallel": 0}}),
            "verity.parallel",
        ),
        (
            serde_json::json!({"messages": user, "n": 4, "verity": {"selection": "esc:0"}}),
            "verity.selection",
        ),
        (
            serde_json::json!({"messages": user, "n": 4, "verity": {"selection": "deepconf-online:8:90:64:2"}}),
            "verity.selection",
        ),
        (
            serde_json::json!({"messages": user, "chat_template_kwargs": {"enable_thinking": false},
                "verity": {"chat_template_kwargs": {"enable_thinking": true}}}),
            "chat_template_kwargs",
        ),
    ];
    for (body, param) in cases {
        let (status, text) = post(addr, "/v1/chat/completions", &body.to_string());
        assert_eq!(status, 400, "{body}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"]["param"], param, "{body}: {text}");
    }
    // What is meant still works: usage asked for properly, an empty assistant turn.
    let ok = serde_json::json!({
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": null},
            {"role": "user", "content": "Go"},
        ],
        "max_tokens": 2, "stream": true, "stream_options": {"include_usage": true},
    });
    let (status, text) = post(addr, "/v1/chat/completions", &ok.to_string());
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"usage\""), "{text}");
    // Chat-template variables: vLLM's field is taken; one the template reserves is a 400,
    // and so is the field on plain completions (there is no template there).
    let kwargs = serde_json::json!({"messages": user, "max_tokens": 2,
        "chat_template_kwargs": {"enable_thinking": false}});
    let (status, text) = post(addr, "/v1/chat/completions", &kwargs.to_string());
    assert_eq!(status, 200, "{text}");
    let clash = serde_json::json!({"messages": user, "max_tokens": 2,
        "verity": {"chat_template_kwargs": {"messages": []}}});
    let (status, text) = post(addr, "/v1/chat/completions", &clash.to_string());
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("'messages'"), "{text}");
    let plain = serde_json::json!({"prompt": "Hi", "max_tokens": 2,
        "verity": {"chat_template_kwargs": {"enable_thinking": false}}});
    let (status, text) = post(addr, "/v1/completions", &plain.to_string());
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("verity.chat_template_kwargs"), "{text}");
    // DeepConf online per request: 2 warm-up samples, then 4 more at most, each stopped
    // once its confidence falls below the warm-up's median; the slots are refilled, so
    // all 6 start.
    let deepconf = serde_json::json!({
        "messages": [{"role": "user", "content": "What is 2 + 2? Put the answer in \\boxed{}."}],
        "n": 6, "max_tokens": 32, "temperature": 1.0, "seed": 4,
        "verity": {"selection": "deepconf-online:2:50:8"},
    });
    let (status, text) = post(addr, "/v1/chat/completions", &deepconf.to_string());
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["verity"]["traces"].as_array().map(Vec::len),
        Some(6),
        "{text}"
    );
    // A sequential rule with one sample at a time: esc:1 settles on the first sample
    // with an answer, so it never needs all 6.
    let esc = serde_json::json!({
        "messages": [{"role": "user", "content": "What is 2 + 2? Put the answer in \\boxed{}."}],
        "n": 6, "max_tokens": 48, "temperature": 0.3, "seed": 3,
        "verity": {"selection": "esc:1", "parallel": 1},
    });
    let (status, text) = post(addr, "/v1/chat/completions", &esc.to_string());
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let settled = v["verity"]["settled_after"].as_u64();
    let started = v["verity"]["traces"].as_array().map(Vec::len);
    // The first sample boxes an answer here, so one sample settles it and no other starts.
    assert_eq!(settled, Some(1), "{text}");
    assert_eq!(started, Some(1), "{text}");
    assert!(v["verity"]["answer"].is_string(), "{text}");
    let (status, text) = post(
        addr,
        "/v1/learn",
        r#"{"action": "start", "min_traces": 1000000000000000000}"#,
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("trace_capacity"), "{text}");
    let _ = stop.send(());
    server.join().unwrap();
}

/// Reads until the server closes the connection (or `limit` passes: then None).
fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Option<String> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(String::from_utf8_lossy(&got).into_owned())
            }
            Err(_) => return None,
        }
    }
}

#[test]
fn stalled_flooding_and_oversized_clients_are_cut_off() {
    let runtime = smollm2(None);
    let config = ServerConfig {
        max_connections: 3,
        header_timeout: Duration::from_millis(800),
        body_timeout: Duration::from_millis(800),
        ..ServerConfig::default()
    };
    let (addr, stop, server) = serve_with(runtime.clone(), config.clone());
    let margin = Duration::from_secs(10);

    // Half-sent headers: the connection is closed after the header timeout (which starts
    // when the server accepts it, after `started`).
    let started = Instant::now();
    let mut half = TcpStream::connect(addr).unwrap();
    write!(half, "POST /v1/completions HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert!(
        read_until_closed(&mut half, margin).is_some(),
        "half-sent headers kept open"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));

    // An idle keep-alive connection is closed the same way after its answer.
    let mut idle = TcpStream::connect(addr).unwrap();
    write!(idle, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let text = read_until_closed(&mut idle, margin).expect("idle keep-alive kept open");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");

    // Headers in, body stalled: 408.
    let mut stalled = TcpStream::connect(addr).unwrap();
    write!(
        stalled,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\""
    )
    .unwrap();
    let text = read_until_closed(&mut stalled, margin).expect("stalled body kept open");
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("did not arrive within 0.8 s"), "{text}");

    // A body declared larger than the limit: 413 before it is read, in OpenAI's shape.
    let mut large = TcpStream::connect(addr).unwrap();
    write!(
        large,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        (2 << 20) + 1
    )
    .unwrap();
    let text = read_until_closed(&mut large, margin).expect("an answer");
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("larger than 2097152 bytes"), "{text}");

    // A prompt too long for the context however it tokenizes is refused without
    // tokenizing it (SmolLM2: 8192 tokens of at most a few dozen bytes each).
    let prompt = "word ".repeat(380_000);
    let (status, text) = post(
        addr,
        "/v1/completions",
        &format!(r#"{{"prompt": "{prompt}", "max_tokens": 1}}"#),
    );
    assert_eq!(status, 400, "{}", &text[..text.len().min(300)]);
    assert!(text.contains("1900000 bytes is at least"), "{text}");

    stop.send(()).unwrap();
    server.join().unwrap();

    // Three connections held open: the fourth is answered 503 and closed... (A server
    // whose header timeout cannot close the held ones first, however slow this thread.)
    let (addr, stop, server) = serve_with(
        runtime,
        ServerConfig {
            header_timeout: Duration::from_secs(600),
            ..config
        },
    );
    let held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let mut extra = TcpStream::connect(addr).unwrap();
    let text = read_until_closed(&mut extra, margin).expect("no answer");
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("too many open connections"), "{text}");
    // ...and once they are gone, requests are served again (as soon as the server has
    // seen them close).
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, text) = loop {
        let (status, text) = post(
            addr,
            "/v1/completions",
            r#"{"prompt": "Hi", "max_tokens": 2}"#,
        );
        if status != 503 || Instant::now() > deadline {
            break (status, text);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 200, "{text}");

    stop.send(()).unwrap();
    server.join().unwrap();
}
