//! The endpoint handlers: completions and chat completions (streamed through
//! [`crate::stream`]), models, feedback, learning control, adapters and health.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{ApiError, ApiResult};
use crate::openai::{self, BadRequest, ChatBody, CompletionBody, Parsed, ResponseMeta};
use crate::stream::stream;
use crate::{AppState, Shared};
use verity::runtime::{GenerateResult, BASE_ADAPTER};

pub(super) async fn health(State(state): State<Shared>) -> Json<Value> {
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

pub(super) async fn models(State(state): State<Shared>) -> Json<Value> {
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
pub(super) enum Kind {
    Completion,
    Chat,
}

pub(super) async fn completions(State(state): State<Shared>, body: Bytes) -> ApiResult<Response> {
    let body: CompletionBody = openai::parse_body(&body)?;
    let tokenizer = &state.runtime.model().tokenizer;
    let mut parsed = openai::parse_completion(&body, &state.config.limits, tokenizer)?;
    adapter_from_model(&state, body.model.as_deref(), &mut parsed)?;
    generate(state, parsed, Kind::Completion).await
}

pub(super) async fn chat_completions(
    State(state): State<Shared>,
    body: Bytes,
) -> ApiResult<Response> {
    let body: ChatBody = openai::parse_body(&body)?;
    let tokenizer = &state.runtime.model().tokenizer;
    let mut parsed = openai::parse_chat(&body, &state.config.limits, tokenizer)?;
    adapter_from_model(&state, body.model.as_deref(), &mut parsed)?;
    generate(state, parsed, Kind::Chat).await
}

/// A `model` that names a loaded adapter selects it (as vLLM serves LoRA adapters),
/// unless `verity.adapter` says otherwise. A `model` that is neither the served model nor
/// an adapter is a 404 listing what is served: falling back to the default would hide a
/// typo in an adapter's name.
fn adapter_from_model(state: &AppState, model: Option<&str>, parsed: &mut Parsed) -> ApiResult<()> {
    let Some(m) = model else {
        return Ok(());
    };
    if m == state.model {
        return Ok(());
    }
    if state.runtime.adapter_version(m).is_err() {
        let mut served = vec![state.model.clone()];
        served.extend(state.runtime.adapters().into_iter().map(|a| a.id));
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "model '{m}' is not served here; the models are: {}",
                served.join(", ")
            ),
        )
        .with_param("model"));
    }
    if parsed.request.adapter.is_none() {
        parsed.request.adapter = Some(m.to_string());
    }
    Ok(())
}

fn meta_id(state: &AppState, kind: Kind) -> String {
    let n = state.next_id.fetch_add(1, Ordering::Relaxed);
    match kind {
        Kind::Completion => format!("cmpl-{n}"),
        Kind::Chat => format!("chatcmpl-{n}"),
    }
}

async fn generate(state: Shared, parsed: Parsed, kind: Kind) -> ApiResult<Response> {
    // Rendering the chat template and tokenizing a long prompt take milliseconds to
    // seconds: done on the blocking pool, a few at a time, so the async workers stay free
    // to answer everyone else (`/health` included).
    let generation = {
        let _slot = state
            .prepare_slots
            .acquire()
            .await
            .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
        let runtime = state.runtime.clone();
        let request = parsed.request.clone();
        tokio::task::spawn_blocking(move || runtime.submit(request)).await??
    };
    let id = meta_id(&state, kind);
    let created = now();
    if parsed.stream {
        return Ok(stream(state, generation, parsed, kind, id, created));
    }
    let result = generation.result().await?;
    let body = respond(&state, &parsed, kind, &id, created, &result);
    Ok(Json(body).into_response())
}

pub(super) fn adapter_version(state: &AppState, result: &GenerateResult) -> u64 {
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
pub(super) async fn feedback(State(state): State<Shared>, body: Bytes) -> ApiResult<Json<Value>> {
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
            .map_err(|e| ApiError::from(e).prefixed(&format!("feedback[{i}]")))?;
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

pub(super) async fn learn_status(State(state): State<Shared>) -> Json<Value> {
    Json(json!(state.runtime.learning_status()))
}

pub(super) async fn learn(State(state): State<Shared>, body: Bytes) -> ApiResult<Json<Value>> {
    let body: LearnBody = openai::parse_body(&body)?;
    let runtime = state.runtime.clone();
    let step = match body.action.as_str() {
        "start" => {
            runtime.start_learning(body.min_traces)?;
            None
        }
        "stop" => {
            tokio::task::spawn_blocking(move || runtime.stop_learning()).await?;
            None
        }
        "step" => Some(tokio::task::spawn_blocking(move || runtime.learn_step()).await??),
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

pub(super) async fn adapters(State(state): State<Shared>) -> Json<Value> {
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

/// A folder a client names, inside the runtime's `adapter_dir` (clients cannot read or
/// write anywhere else on the server's disk).
fn confined(state: &Shared, path: &Path) -> ApiResult<PathBuf> {
    let bad_path =
        |message: String| ApiError::new(StatusCode::BAD_REQUEST, message).with_param("path");
    let root = state
        .runtime
        .config()
        .adapter_dir
        .as_deref()
        .ok_or_else(|| {
            bad_path(
                "this server has no adapter folder, so it loads and saves no adapter by path \
             (start it with --adapter-dir DIR; paths are then relative to DIR)"
                    .into(),
            )
        })?;
    verity::adapter::confine(root, path).map_err(|e| bad_path(e.to_string()))
}

/// An adapter load or save error on a folder the client named: what the client got wrong
/// (no such folder, a file where a folder should be, files that are not an adapter) is a
/// 4xx naming `path`, with paths shown relative to the adapter folder (the server's own
/// layout is not the client's business); anything else stays a server error.
fn client_path_error(state: &Shared, e: verity::Error, loading: bool) -> ApiError {
    use std::io::ErrorKind;
    let status = match &e {
        verity::Error::Io { source, .. } => match source.kind() {
            ErrorKind::NotFound if loading => StatusCode::NOT_FOUND,
            ErrorKind::NotFound
            | ErrorKind::NotADirectory
            | ErrorKind::IsADirectory
            | ErrorKind::AlreadyExists
            | ErrorKind::InvalidFilename
            | ErrorKind::InvalidData => StatusCode::BAD_REQUEST,
            _ => return e.into(),
        },
        // The files in the folder are the client's: unusable ones are its mistake.
        verity::Error::BadModelFile { .. } | verity::Error::Weight { .. } if loading => {
            StatusCode::BAD_REQUEST
        }
        _ => return e.into(),
    };
    let mut message = e.to_string();
    // Paths in the error are the confined (canonical) ones.
    let root = state.runtime.config().adapter_dir.as_deref();
    if let Some(root) = root.and_then(|r| r.canonicalize().ok()) {
        message = message.replace(&format!("{}/", root.display()), "");
    }
    ApiError::new(status, message).with_param("path")
}

pub(super) async fn adapter_action(
    State(state): State<Shared>,
    body: Bytes,
) -> ApiResult<Json<Value>> {
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
            let path = confined(&state, &path)?;
            let id = body.id.clone();
            tokio::task::spawn_blocking(move || runtime.adapter_load(&id, &path))
                .await?
                .map_err(|e| client_path_error(&state, e, true))?;
        }
        "save" => {
            let id = body.id.clone();
            let path = body.path.map(|p| confined(&state, &p)).transpose()?;
            let dir =
                tokio::task::spawn_blocking(move || runtime.adapter_save(&id, path.as_deref()))
                    .await?
                    .map_err(|e| client_path_error(&state, e, false))?;
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
