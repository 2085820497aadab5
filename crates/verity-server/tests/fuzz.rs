//! Fuzzing the HTTP API's request parsing, end to end through the router over a tiny
//! random-weight model: mutants of valid completion, chat, feedback and adapter bodies must
//! each get a well-formed answer (a 2xx with the response's shape, or a 4xx in OpenAI's
//! error shape); a 500 or a panic is a failure. `VERITY_FUZZ_CASES=N` sets the cases.

#[path = "../../../tests/common/mod.rs"]
mod common;
use common::fuzz;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request as HttpRequest};
use candle_core::{DType, Device};
use tower::ServiceExt;
use verity::model::config::Architecture;
use verity::{Runtime, RuntimeConfig};
use verity_server::{Limits, ServerConfig};

const SEEDS: &[(&str, &str)] = &[
    (
        "/v1/completions",
        r#"{"model": "tiny.gguf", "prompt": "Hello", "max_tokens": 3, "temperature": 0.7, "top_p": 0.9, "n": 2, "seed": 7, "stop": ["\n", "x"], "logprobs": 2, "logit_bias": {"5": -100}}"#,
    ),
    (
        "/v1/completions",
        r#"{"prompt": [1, 2, 3], "max_tokens": 2, "stream": true, "stream_options": {"include_usage": true}, "verity": {"selection": "majority", "return_scores": true, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1}}"#,
    ),
    (
        "/v1/completions",
        r#"{"prompt": "2+2=", "n": 4, "max_tokens": 4, "verity": {"selection": "esc:2", "parallel": 2, "verifier": "math", "reference": "4"}}"#,
    ),
    (
        "/v1/chat/completions",
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_completion_tokens": 3, "logprobs": true, "top_logprobs": 2, "frequency_penalty": 0.5, "presence_penalty": -0.5}"#,
    ),
    (
        "/v1/chat/completions",
        r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"role": "assistant", "content": null}, {"role": "user", "content": "c"}], "stream": true, "n": 3, "max_tokens": 2, "verity": {"selection": "weighted:self_certainty"}}"#,
    ),
    ("/v1/feedback", r#"{"trace_id": 1, "reward": 1.0}"#),
    (
        "/v1/feedback",
        r#"{"feedback": [{"trace_id": 2, "reward": 0.5}, {"trace_id": 99, "reward": -1}]}"#,
    ),
    (
        "/v1/adapters",
        r#"{"action": "load", "id": "a", "path": "x/v1"}"#,
    ),
    ("/v1/adapters", r#"{"action": "save", "id": "learned"}"#),
];

const JSON_TOKENS: &[&[u8]] = &[
    b"null",
    b"true",
    b"false",
    b"-1",
    b"0",
    b"1e308",
    b"1e-45",
    b"18446744073709551616",
    b"4294967297",
    b"\"\"",
    b"[]",
    b"{}",
    b"\"\\ud800\"",
    b"\"\\u0000\"",
    b"\"n\": 64",
    b"\"max_tokens\": 100000",
    b"\"stream\": true",
    b"\"selection\": \"cisc:logprob:0\"",
    b"\"selection\": \"adaptive:1.5\"",
    b"\"selection\": \"deepconf:bottom10:0:0\"",
    b"\"logit_bias\": {\"999999\": 1}",
    b"\"messages\": []",
    b"\"role\": \"tool\"",
    b"\"prompt\": [4294967295]",
    b"\"prompt\": [[1], [2]]",
    b"\"path\": \"/etc\"",
    b"\"path\": \"../..\"",
    b"\"verity\": {\"parallel\": 0}",
];

/// Values at the edges of what each field accepts.
const EDGE_VALUES: &[&str] = &[
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1",
    "2",
    "65",
    "0.5",
    "-0.0",
    "1e308",
    "-1e308",
    "1e-45",
    "18446744073709551615",
    "18446744073709551616",
    "4294967296",
    "\"\"",
    "\"x\"",
    "\"\\u0000\"",
    "[]",
    "{}",
    "[1, 2]",
    "[[1]]",
    "[\"a\", \"b\", \"c\", \"d\", \"e\"]",
    "{\"a\": 1}",
    "\"majority\"",
    "\"esc:0\"",
    "\"adaptive:2\"",
    "\"cisc:entropy:0\"",
    "\"max:nothing\"",
    "\"deepconf:bottom10:64:10\"",
    "\"math\"",
    "\"user\"",
    "\"load\"",
    "\"save\"",
    "\"remove\"",
    "\"select\"",
    "\"learned\"",
];

/// Replaces a random value inside `v` by an edge value, drops a field or adds an unknown
/// one.
fn mutate_json(v: &mut serde_json::Value, m: &mut fuzz::Mutator, values: &[serde_json::Value]) {
    use serde_json::Value;
    match v {
        Value::Object(map) if !map.is_empty() => {
            let key = map.keys().nth(m.below(map.len())).unwrap().clone();
            match m.below(6) {
                0 => {
                    map.remove(&key);
                }
                1 => {
                    map.insert(
                        "unknown_field".into(),
                        values[m.below(values.len())].clone(),
                    );
                }
                2 | 3 => {
                    map.insert(key, values[m.below(values.len())].clone());
                }
                _ => mutate_json(map.get_mut(&key).unwrap(), m, values),
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let at = m.below(items.len());
            match m.below(4) {
                0 => {
                    items.remove(at);
                }
                1 => items[at] = values[m.below(values.len())].clone(),
                _ => mutate_json(&mut items[at], m, values),
            }
        }
        _ => *v = values[m.below(values.len())].clone(),
    }
}

#[test]
fn every_mutated_request_gets_a_well_formed_answer() {
    let model = common::tiny_dense_model(
        "server-fuzz",
        Architecture::Qwen2,
        5,
        &Device::Cpu,
        DType::F32,
    );
    let runtime = Arc::new(
        Runtime::builder(RuntimeConfig::default())
            .model(model)
            .build()
            .expect("runtime"),
    );
    let config = ServerConfig {
        limits: Limits {
            max_n: 4,
            max_tokens: 4,
            ..Limits::default()
        },
        ..ServerConfig::default()
    };
    let router = verity_server::router(runtime.clone(), config);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seeds: Vec<Vec<u8>> = SEEDS
        .iter()
        .map(|(path, body)| format!("{path} {body}").into_bytes())
        .collect();
    let values: Vec<serde_json::Value> = EDGE_VALUES
        .iter()
        .map(|v| serde_json::from_str(v).unwrap())
        .chain([serde_json::Value::String("x".repeat(5000))])
        .collect();
    let cases = fuzz::cases(1500);
    let mut statuses = std::collections::BTreeMap::new();
    // Half the cases are byte-level mutants (mostly broken JSON), half valid JSON with
    // values swapped for edge values, fields dropped or unknown fields added.
    fuzz::run_with(
        "http",
        seeds.len() + cases,
        |m, i| {
            if i < seeds.len() {
                return seeds[i].clone();
            }
            let (path, body) = SEEDS[m.below(SEEDS.len())];
            if i % 2 == 0 {
                return m.mutate(format!("{path} {body}").as_bytes(), JSON_TOKENS, 0);
            }
            let mut v: serde_json::Value = serde_json::from_str(body).unwrap();
            for _ in 0..1 + m.below(3) {
                mutate_json(&mut v, m, &values);
            }
            format!("{path} {v}").into_bytes()
        },
        |input| {
            // The path is the seed's first word; a mutant of it is a request to a path that
            // may not exist, which must be a 404 like any other.
            let text = String::from_utf8_lossy(input);
            let (path, body) = text.split_once(' ').unwrap_or(("/v1/completions", &text));
            let path = if path.starts_with('/') && path.bytes().all(|b| b.is_ascii_graphic()) {
                path.to_string()
            } else {
                "/v1/completions".to_string()
            };
            let request = HttpRequest::post(path.as_str())
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.as_bytes().to_vec()));
            let Ok(request) = request else {
                return; // not a URI axum could be given
            };
            let (status, bytes, content_type) = rt.block_on(async {
                let response = router.clone().oneshot(request).await.unwrap();
                let status = response.status().as_u16();
                let content_type = response
                    .headers()
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                    .await
                    .unwrap();
                (status, bytes, content_type)
            });
            *statuses.entry(status).or_insert(0usize) += 1;
            let body = String::from_utf8_lossy(&bytes);
            assert!(status != 500, "{path} {text:?} -> 500 {body}");
            if content_type.starts_with("text/event-stream") {
                assert_eq!(status, 200);
                let end = body.trim_end();
                assert!(
                    end.ends_with("data: [DONE]") || end.contains("\"error\""),
                    "a stream that neither finished nor failed: {body}"
                );
                // A stream may only fail for a reason the server would have answered 4xx.
                assert!(!end.contains("server_error"), "{text:?} -> {body}");
                return;
            }
            let v: serde_json::Value = serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{path} {text:?} -> {status}: not JSON ({e}): {body}"));
            if status >= 400 {
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty()),
                    "{status} without a message: {body}"
                );
            } else if path.contains("completions") {
                assert!(
                    v["choices"].as_array().is_some_and(|c| !c.is_empty()),
                    "{body}"
                );
            }
        },
    );
    println!("statuses: {statuses:?}");
    println!("{:?}", runtime.stats());
    // The campaign reached both sides: requests that ran and requests refused.
    assert!(statuses.get(&200).is_some_and(|&n| n > 10), "{statuses:?}");
    assert!(statuses.get(&400).is_some_and(|&n| n > 10), "{statuses:?}");
    let stats = runtime.stats();
    assert_eq!(stats.running_requests, 0);
    assert_eq!(stats.waiting_requests, 0);
}
