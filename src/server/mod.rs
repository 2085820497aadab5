//! The HTTP API (`verity serve`): OpenAI-compatible completions and chat completions
//! (with SSE streaming), verity's extensions (selection among N samples, per-token
//! scores, adapters), feedback and learning control, health and Prometheus metrics.
//! Everything goes through one shared [`Runtime`].

mod openai;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::engine::Event;
use crate::error::Error;
use crate::runtime::{GenerateResult, Runtime, BASE_ADAPTER};
pub use openai::Limits;
use openai::{BadRequest, ChatBody, CompletionBody, Parsed, ResponseMeta};

/// How the server listens and what it accepts.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// Requests must carry `Authorization: Bearer <key>` (all but `/health`).
    pub api_key: Option<String>,
    pub limits: Limits,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            limits: Limits::default(),
        }
    }
}

struct AppState {
    runtime: Arc<Runtime>,
    config: ServerConfig,
    model: String,
    next_id: AtomicU64,
    /// (time, generated tokens) at the last `/metrics` scrape, for tokens/s.
    last_scrape: Mutex<(Instant, u64)>,
    http_requests: AtomicU64,
    http_errors: AtomicU64,
    /// Time to first token of the last streamed requests, seconds (a bounded window).
    ttft: Mutex<std::collections::VecDeque<f64>>,
}

type Shared = Arc<AppState>;

/// An error response in OpenAI's shape.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
        }
    }
}

impl From<BadRequest> for ApiError {
    fn from(b: BadRequest) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: b.message,
            param: b.param,
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidArgument(_)
            | Error::PromptTooLong { .. }
            | Error::Tokenizer(_)
            | Error::ChatTemplate(_)
            | Error::Config(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::BAD_REQUEST => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            _ => "server_error",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.status.as_u16(),
        }});
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The router over `runtime`; [`serve`] binds it.
pub fn router(runtime: Arc<Runtime>, config: ServerConfig) -> Router {
    let model = runtime.model_name();
    let generated = runtime.stats().generated_tokens;
    let state = Arc::new(AppState {
        runtime,
        config,
        model,
        next_id: AtomicU64::new(1),
        last_scrape: Mutex::new((Instant::now(), generated)),
        http_requests: AtomicU64::new(0),
        http_errors: AtomicU64::new(0),
        ttft: Mutex::new(std::collections::VecDeque::new()),
    });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/feedback", post(feedback))
        .route("/v1/learn", get(learn_status).post(learn))
        .route("/v1/adapters", get(adapters).post(adapter_action))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .route("/health", get(health))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .with_state(state)
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish.
pub async fn serve(
    runtime: Arc<Runtime>,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    serve_on(listener, runtime, config, shutdown).await
}

/// [`serve`] on a listener already bound (port 0 in tests).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    runtime: Arc<Runtime>,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(runtime, config);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn authorize(State(state): State<Shared>, request: HttpRequest, next: Next) -> Response {
    state.http_requests.fetch_add(1, Ordering::Relaxed);
    if let Some(key) = &state.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            state.http_errors.fetch_add(1, Ordering::Relaxed);
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (Authorization: Bearer <key>)",
            )
            .into_response();
        }
    }
    let response = next.run(request).await;
    if response.status().is_client_error() || response.status().is_server_error() {
        state.http_errors.fetch_add(1, Ordering::Relaxed);
    }
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn health(State(state): State<Shared>) -> Json<Value> {
    let s = state.runtime.stats();
    Json(json!({
        "status": "ok",
        "model": state.model,
        "running_requests": s.running_requests,
        "waiting_requests": s.waiting_requests,
    }))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn models(State(state): State<Shared>) -> Json<Value> {
    let created = now();
    let mut data = vec![
        json!({"id": state.model, "object": "model", "created": created, "owned_by": "verity"}),
    ];
    for a in state.runtime.adapters() {
        data.push(json!({"id": a.id, "object": "model", "created": created, "owned_by": "verity", "parent": state.model, "verity": a}));
    }
    Json(json!({"object": "list", "data": data}))
}

/// Which endpoint a generation came through.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(state): State<Shared>, body: Bytes) -> ApiResult<Response> {
    let body: CompletionBody = openai::parse_body(&body)?;
    let tokenizer = &state.runtime.model().tokenizer;
    let mut parsed = openai::parse_completion(&body, &state.config.limits, tokenizer)?;
    adapter_from_model(&state, body.model.as_deref(), &mut parsed);
    generate(state, parsed, Kind::Completion).await
}

async fn chat_completions(State(state): State<Shared>, body: Bytes) -> ApiResult<Response> {
    let body: ChatBody = openai::parse_body(&body)?;
    let tokenizer = &state.runtime.model().tokenizer;
    let mut parsed = openai::parse_chat(&body, &state.config.limits, tokenizer)?;
    adapter_from_model(&state, body.model.as_deref(), &mut parsed);
    generate(state, parsed, Kind::Chat).await
}

/// A `model` that names a loaded adapter selects it (as vLLM serves LoRA adapters),
/// unless `verity.adapter` says otherwise.
fn adapter_from_model(state: &AppState, model: Option<&str>, parsed: &mut Parsed) {
    if parsed.request.request.adapter.is_some() {
        return;
    }
    if let Some(m) = model {
        if m != state.model && state.runtime.adapter_version(m).is_ok() {
            parsed.request.request.adapter = Some(m.to_string());
        }
    }
}

fn meta_id(state: &AppState, kind: Kind) -> String {
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    match kind {
        Kind::Completion => format!("cmpl-{n}"),
        Kind::Chat => format!("chatcmpl-{n}"),
    }
}

async fn generate(state: Shared, parsed: Parsed, kind: Kind) -> ApiResult<Response> {
    let generation = state.runtime.submit(parsed.request.clone())?;
    let id = meta_id(&state, kind);
    let created = now();
    if parsed.stream {
        return Ok(stream(state, generation, parsed, kind, id, created));
    }
    let result = generation.result().await?;
    let body = respond(&state, &parsed, kind, &id, created, &result);
    Ok(Json(body).into_response())
}

fn adapter_version(state: &AppState, result: &GenerateResult) -> u64 {
    result
        .adapter
        .as_deref()
        .and_then(|a| state.runtime.adapter_version(a).ok())
        .unwrap_or(0)
}

fn respond(
    state: &AppState,
    parsed: &Parsed,
    kind: Kind,
    id: &str,
    created: u64,
    result: &GenerateResult,
) -> Value {
    let meta = ResponseMeta {
        id,
        created,
        model: &state.model,
        logprobs: parsed.logprobs,
        return_scores: parsed.return_scores,
        adapter_version: adapter_version(state, result),
    };
    let tokenizer = &state.runtime.model().tokenizer;
    match kind {
        Kind::Chat => openai::chat_response(tokenizer, &meta, result),
        Kind::Completion => openai::completion_response(tokenizer, &meta, result),
    }
}

/// Streams token deltas as SSE chunks, then a final chunk per choice with its finish
/// reason (and the verity field), optional usage, and `[DONE]`. A client that goes away
/// drops the generation, which cancels it.
fn stream(
    state: Shared,
    mut generation: crate::runtime::Generation,
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
                Some(Event::Token { index, text, .. }) => {
                    if first_token {
                        first_token = false;
                        let mut w = state.ttft.lock();
                        if w.len() >= 1024 {
                            w.pop_front();
                        }
                        w.push_back(start.elapsed().as_secs_f64());
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
                Some(Event::Done(completion)) => {
                    let result = generation.finish(completion);
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
                Some(Event::Error(message)) => {
                    let error = json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": 400}});
                    let _ = send(error).await;
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackItem {
    trace_id: u64,
    reward: f64,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FeedbackBody {
    One(FeedbackItem),
    Many { feedback: Vec<FeedbackItem> },
}

/// `{"trace_id": 3, "reward": 1.0}` or `{"feedback": [...]}`; all or nothing is not
/// promised: items are applied in order and the first unknown id is reported.
async fn feedback(State(state): State<Shared>, body: Bytes) -> ApiResult<Json<Value>> {
    let body: FeedbackBody = openai::parse_body(&body)?;
    let items = match body {
        FeedbackBody::One(item) => vec![item],
        FeedbackBody::Many { feedback } => feedback,
    };
    if items.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "no feedback given"));
    }
    for (i, item) in items.iter().enumerate() {
        state
            .runtime
            .feedback(item.trace_id, item.reward)
            .map_err(|e| {
                let mut err = ApiError::from(e);
                err.message = format!("feedback[{i}]: {}", err.message);
                err
            })?;
    }
    Ok(Json(json!({
        "accepted": items.len(),
        "pending": state.runtime.feedback_pending(),
    })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LearnBody {
    /// start | stop | step | status
    action: String,
    min_traces: Option<usize>,
}

async fn learn_status(State(state): State<Shared>) -> Json<Value> {
    Json(json!(state.runtime.learning_status()))
}

async fn learn(State(state): State<Shared>, body: Bytes) -> ApiResult<Json<Value>> {
    let body: LearnBody = openai::parse_body(&body)?;
    let runtime = state.runtime.clone();
    let step = match body.action.as_str() {
        "start" => {
            runtime.start_learning(body.min_traces)?;
            None
        }
        "stop" => {
            tokio::task::spawn_blocking(move || runtime.stop_learning())
                .await
                .map_err(internal)?;
            None
        }
        "step" => Some(
            tokio::task::spawn_blocking(move || runtime.learn_step())
                .await
                .map_err(internal)??,
        ),
        "status" => None,
        other => {
            return Err(ApiError::from(BadRequest {
                message: format!("unknown action '{other}' (start, stop, step, status)"),
                param: Some("action".into()),
            }))
        }
    };
    let mut status = json!(state.runtime.learning_status());
    if let Some(step) = step {
        status["step"] = json!(step);
    }
    Ok(Json(status))
}

fn internal(e: tokio::task::JoinError) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("task failed: {e}"),
    )
}

async fn adapters(State(state): State<Shared>) -> Json<Value> {
    Json(json!({
        "default": state.runtime.default_adapter().unwrap_or_else(|| BASE_ADAPTER.into()),
        "adapters": state.runtime.adapters(),
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdapterBody {
    /// load | save | select | remove
    action: String,
    id: String,
    /// Folder to load from, or to save versions under.
    path: Option<PathBuf>,
}

async fn adapter_action(State(state): State<Shared>, body: Bytes) -> ApiResult<Json<Value>> {
    let body: AdapterBody = openai::parse_body(&body)?;
    let runtime = state.runtime.clone();
    let mut out = json!({"ok": true});
    match body.action.as_str() {
        "load" => {
            let path = body.path.ok_or_else(|| {
                ApiError::from(BadRequest {
                    message: "load needs a path".into(),
                    param: Some("path".into()),
                })
            })?;
            let id = body.id.clone();
            tokio::task::spawn_blocking(move || runtime.adapter_load(&id, &path))
                .await
                .map_err(internal)??;
        }
        "save" => {
            let id = body.id.clone();
            let path = body.path;
            let dir =
                tokio::task::spawn_blocking(move || runtime.adapter_save(&id, path.as_deref()))
                    .await
                    .map_err(internal)??;
            out["path"] = json!(dir);
        }
        "select" => runtime.adapter_select(Some(&body.id))?,
        "remove" => runtime.adapter_remove(&body.id)?,
        other => {
            return Err(ApiError::from(BadRequest {
                message: format!("unknown action '{other}' (load, save, select, remove)"),
                param: Some("action".into()),
            }))
        }
    }
    out["adapters"] = json!(state.runtime.adapters());
    out["default"] = json!(state
        .runtime
        .default_adapter()
        .unwrap_or_else(|| BASE_ADAPTER.into()));
    Ok(Json(out))
}

/// Prometheus text exposition.
async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    let s = state.runtime.stats();
    let rate = {
        let mut last = state.last_scrape.lock();
        let dt = last.0.elapsed().as_secs_f64();
        let rate = if dt > 0.0 {
            s.generated_tokens.saturating_sub(last.1) as f64 / dt
        } else {
            0.0
        };
        *last = (Instant::now(), s.generated_tokens);
        rate
    };
    let (p50, p99) = {
        let mut w: Vec<f64> = state.ttft.lock().iter().copied().collect();
        w.sort_by(f64::total_cmp);
        let q = |p: f64| {
            if w.is_empty() {
                0.0
            } else {
                w[((w.len() - 1) as f64 * p).round() as usize]
            }
        };
        (q(0.5), q(0.99))
    };
    let learn = state.runtime.learning_status();
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
        text.push_str(&format!(
            "# HELP verity_{name} {help}\n# TYPE verity_{name} {kind}\nverity_{name} {value}\n"
        ));
    };
    metric(
        "http_requests_total",
        "counter",
        "HTTP requests received.",
        state.http_requests.load(Ordering::Relaxed) as f64,
    );
    metric(
        "http_errors_total",
        "counter",
        "HTTP responses with a 4xx or 5xx status.",
        state.http_errors.load(Ordering::Relaxed) as f64,
    );
    metric(
        "requests_total",
        "counter",
        "Generation requests admitted.",
        s.requests as f64,
    );
    metric(
        "requests_failed_total",
        "counter",
        "Generation requests refused.",
        s.requests_failed as f64,
    );
    metric(
        "generated_tokens_total",
        "counter",
        "Tokens generated.",
        s.generated_tokens as f64,
    );
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens prefilled.",
        s.prompt_tokens_prefilled as f64,
    );
    metric(
        "tokens_per_second",
        "gauge",
        "Generated tokens per second since the previous scrape.",
        rate,
    );
    metric(
        "queue_depth",
        "gauge",
        "Requests waiting for KV memory.",
        s.waiting_requests as f64,
    );
    metric(
        "running_requests",
        "gauge",
        "Requests decoding.",
        s.running_requests as f64,
    );
    metric(
        "in_flight_requests",
        "gauge",
        "Requests admitted and not yet answered.",
        s.in_flight as f64,
    );
    metric(
        "kv_reserved_tokens",
        "gauge",
        "KV positions reserved by running requests.",
        s.kv_reserved as f64,
    );
    metric(
        "kv_budget_tokens",
        "gauge",
        "KV positions available.",
        s.kv_budget_tokens as f64,
    );
    metric(
        "time_to_first_token_p50_seconds",
        "gauge",
        "Median time to first token of recent streamed requests.",
        p50,
    );
    metric(
        "time_to_first_token_p99_seconds",
        "gauge",
        "99th percentile time to first token of recent streamed requests.",
        p99,
    );
    metric(
        "feedback_total",
        "counter",
        "Rewards received.",
        s.feedback_received as f64,
    );
    metric(
        "feedback_pending",
        "gauge",
        "Rewarded traces not yet trained on.",
        s.feedback_pending as f64,
    );
    metric(
        "learn_steps_total",
        "counter",
        "Learning steps run.",
        learn.steps as f64,
    );
    metric(
        "learn_steps_applied_total",
        "counter",
        "Learning steps that changed the adapter.",
        learn.applied as f64,
    );
    metric(
        "learn_reward_mean",
        "gauge",
        "Mean reward of the last learning step.",
        s.last_reward_mean.unwrap_or(0.0),
    );
    metric(
        "adapter_version",
        "gauge",
        "Version of the learning adapter.",
        learn.adapter_version as f64,
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    (headers, text)
}
