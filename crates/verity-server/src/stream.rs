//! SSE streaming of one generation (`"stream": true`): token deltas as OpenAI chunks,
//! then each choice's finish chunk, optional usage, and `[DONE]`.

use std::convert::Infallible;
use std::time::Instant;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::openai::{self, Parsed};
use crate::routes::{adapter_version, Kind};
use crate::Shared;
use verity::runtime::{Generation, GenerationEvent};

/// Streams token deltas as SSE chunks, then a final chunk per choice with its finish
/// reason (and the verity field), optional usage, and `[DONE]`. A client that goes away
/// drops the generation, which cancels it.
pub(super) fn stream(
    state: Shared,
    mut generation: Generation,
    parsed: Parsed,
    kind: Kind,
    id: String,
    created: u64,
) -> Response {
    let (tx, mut rx) = mpsc::channel::<SseEvent>(64);
    let n = parsed.request.request.n;
    tokio::spawn(async move {
        let start = Instant::now();
        let model = state.model.clone();
        let object = match kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let chunk = |index: usize, text: &str, first: bool, finish: Option<&str>| -> Value {
            let choice = match kind {
                Kind::Chat => {
                    let mut delta = json!({});
                    if first {
                        delta["role"] = json!("assistant");
                    }
                    if !text.is_empty() || finish.is_none() {
                        delta["content"] = json!(text);
                    }
                    json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
                }
                Kind::Completion => {
                    json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish})
                }
            };
            json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
        };
        let send = |v: Value| {
            let tx = tx.clone();
            async move {
                tx.send(SseEvent::default().data(v.to_string()))
                    .await
                    .is_ok()
            }
        };
        // Text already sent per choice: the final traces may hold text the stream held
        // back (a possible stop string), sent before the finish chunk.
        let mut sent = vec![0usize; n];
        let mut started = vec![false; n];
        let mut first_token = true;
        loop {
            match generation.next().await {
                Some(Ok(GenerationEvent::Token { index, text, .. })) => {
                    if first_token {
                        first_token = false;
                        state.metrics.first_token(start.elapsed().as_secs_f64());
                    }
                    if text.is_empty() && started.get(index).copied().unwrap_or(true) {
                        continue;
                    }
                    let first = !started[index];
                    started[index] = true;
                    sent[index] += text.len();
                    if !send(chunk(index, &text, first && kind == Kind::Chat, None)).await {
                        return;
                    }
                }
                Some(Ok(GenerationEvent::Finished(result))) => {
                    for t in &result.traces {
                        let i = t.trace.index;
                        let rest = t.trace.text.get(sent[i]..).unwrap_or("");
                        if !rest.is_empty() || !started[i] {
                            let first = !started[i] && kind == Kind::Chat;
                            if !send(chunk(i, rest, first, None)).await {
                                return;
                            }
                        }
                        let mut last =
                            chunk(i, "", false, Some(openai::finish_reason(t.trace.finish)));
                        if i + 1 == result.traces.len() {
                            last["verity"] = openai::verity_field(
                                &result,
                                adapter_version(&state, &result),
                                parsed.return_scores,
                            );
                        }
                        if !send(last).await {
                            return;
                        }
                    }
                    if parsed.include_usage {
                        let usage = json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": openai::Usage::of(&result)});
                        if !send(usage).await {
                            return;
                        }
                    }
                    let _ = tx.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    // Headers are sent: the error (with the status it would have had) is
                    // the last event of the stream.
                    let _ = send(ApiError::from(e).body()).await;
                    return;
                }
                None => return,
            }
        }
    });
    let events = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|e| e.map(Ok::<_, Infallible>))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
