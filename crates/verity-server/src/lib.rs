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

use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

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
    metrics: ServerMetrics,
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
