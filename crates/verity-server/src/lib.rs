//! The HTTP API (`verity serve`): OpenAI-compatible completions and chat completions
//! (with SSE streaming), verity's extensions (selection among N samples, per-token
//! scores, adapters), feedback and learning control, health and Prometheus metrics.
//! Everything goes through one shared [`Runtime`].
//!
//! This crate holds the configuration, the shared state, the router with its API-key
//! check, and `serve`; the handlers are in `routes`, SSE streaming in `stream`, `/metrics`
//! in `metrics`, error responses in `error`, and the OpenAI bodies in `openai`.

mod error;
mod metrics;
mod openai;
mod routes;
mod stream;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

pub use error::ApiError;
use metrics::ServerMetrics;
pub use openai::Limits;
use verity::runtime::Runtime;

/// How the server listens and what it accepts.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// Requests must carry `Authorization: Bearer <key>` (all but `/health`).
    pub api_key: Option<String>,
    pub limits: Limits,
    /// Open connections at most; one more gets a 503 and is closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, and how long an idle keep-alive
    /// connection waits for its next request, before it is closed.
    pub header_timeout: Duration,
    /// Time a client has to send a request's body once its headers are in (408 after).
    pub body_timeout: Duration,
    /// Largest request body (413 above).
    pub max_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            limits: Limits::default(),
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_body_bytes: 2 << 20,
        }
    }
}

struct AppState {
    runtime: Arc<Runtime>,
    config: ServerConfig,
    model: String,
    next_id: AtomicU64,
    metrics: ServerMetrics,
    /// Requests being checked and tokenized at once (on the blocking pool).
    prepare_slots: Semaphore,
}

type Shared = Arc<AppState>;

/// The router over `runtime`; [`serve`] binds it.
pub fn router(runtime: Arc<Runtime>, config: ServerConfig) -> Router {
    let model = runtime.model_name();
    let generated = runtime.stats().generated_tokens;
    let state = Arc::new(AppState {
        runtime,
        config,
        model,
        next_id: AtomicU64::new(1),
        metrics: ServerMetrics::new(generated),
        prepare_slots: Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())),
    });
    Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/models", get(routes::models))
        .route("/v1/feedback", post(routes::feedback))
        .route("/v1/learn", get(routes::learn_status).post(routes::learn))
        .route(
            "/v1/adapters",
            get(routes::adapters).post(routes::adapter_action),
        )
        .route("/metrics", get(metrics::metrics))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), read_body))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .route("/health", get(routes::health))
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
///
/// Each connection is HTTP/1.1 with a header read timeout (which also closes idle
/// keep-alive connections), and at most `max_connections` are open at once: the next one is
/// answered 503 and closed, so half-open connections can neither pile up nor starve others.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    runtime: Arc<Runtime>,
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(config.header_timeout);
    let app = router(runtime, config);
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: the listener itself is fine.
                    eprintln!("verity: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection =
            connections.watch(http.serve_connection(hyper_util::rt::TokioIo::new(stream), service));
        tokio::spawn(async move {
            // Errors here are the client's (a timeout, a reset): nothing to answer.
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    connections.shutdown().await;
    Ok(())
}

/// Answers a connection over the limit with a 503 and closes it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    let body = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too many open connections; retry shortly",
    )
    .body()
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Drain what the client sent, briefly, so closing does not reset the connection
    // before it has read the answer.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Reads the whole request body within `body_timeout` and `max_body_bytes` before any
/// handler runs: a client that sends headers and then stalls gets a 408 instead of holding
/// a handler, and an oversized body a 413 as soon as it is known.
async fn read_body(State(state): State<Shared>, request: HttpRequest, next: Next) -> Response {
    let limit = state.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes"),
        )
        .into_response()
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let (parts, body) = request.into_parts();
    let mut chunks = body.into_data_stream();
    let read = async {
        let mut bytes = Vec::with_capacity(declared.unwrap_or(0) as usize);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                )
                .into_response()
            })?;
            if bytes.len() + chunk.len() > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    };
    let bytes = match tokio::time::timeout(state.config.body_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(response)) => return response,
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s",
                    state.config.body_timeout.as_secs_f64()
                ),
            )
            .into_response()
        }
    };
    next.run(HttpRequest::from_parts(parts, Body::from(bytes)))
        .await
}

/// Counts the request, refuses it without the API key (when one is set), and counts an
/// error response.
async fn authorize(State(state): State<Shared>, request: HttpRequest, next: Next) -> Response {
    state.metrics.http_request();
    if let Some(key) = &state.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), key.as_bytes())) {
            state.metrics.http_error();
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (Authorization: Bearer <key>)",
            )
            .into_response();
        }
    }
    let response = next.run(request).await;
    if response.status().is_client_error() || response.status().is_server_error() {
        state.metrics.http_error();
    }
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves until Ctrl-C or SIGTERM on a runtime of its own (blocking), then lets in-flight
/// requests finish and shuts the runtime down. Prints the address it serves on to stderr.
pub fn serve_until_signal(runtime: Arc<Runtime>, config: ServerConfig) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let addr = config.addr;
    let result = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        eprintln!(
            "verity: serving {} on http://{bound} ({}; Ctrl-C to stop)",
            runtime.model_name(),
            runtime.device()
        );
        serve_on(listener, runtime.clone(), config, shutdown_signal())
            .await
            .map_err(|e| format!("server: {e}"))?;
        eprintln!("verity: stopped");
        runtime.shutdown();
        Ok(())
    });
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
