//! `/metrics`: Prometheus text exposition (format 0.0.4) of the runtime's counters and
//! the server's own (HTTP requests and errors, time to first token, tokens/s).
//!
//! Hand-written, not `prometheus-client`: every value is read from the runtime at scrape
//! time, so the crate would not shorten the metric list, and its OpenMetrics output
//! (`# EOF`, counter families named without `_total`, `1.0` for floats) would change it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::IntoResponse;
use parking_lot::Mutex;

use crate::Shared;

/// How many recent streamed requests the time-to-first-token quantiles are over.
const TTFT_WINDOW: usize = 1024;

/// What the server counts itself; the rest comes from [`verity::runtime::Runtime::stats`].
pub(super) struct ServerMetrics {
    http_requests: AtomicU64,
    http_errors: AtomicU64,
    /// Time to first token of the last streamed requests, seconds (a bounded window).
    ttft: Mutex<VecDeque<f64>>,
    /// (time, generated tokens) at the last scrape, for tokens/s.
    last_scrape: Mutex<(Instant, u64)>,
}

impl ServerMetrics {
    /// Tokens/s of the first scrape count from now and `generated_tokens`.
    pub(super) fn new(generated_tokens: u64) -> Self {
        Self {
            http_requests: AtomicU64::new(0),
            http_errors: AtomicU64::new(0),
            ttft: Mutex::new(VecDeque::new()),
            last_scrape: Mutex::new((Instant::now(), generated_tokens)),
        }
    }

    pub(super) fn http_request(&self) {
        self.http_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn http_error(&self) {
        self.http_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A streamed request's first token came `seconds` after it started.
    pub(super) fn first_token(&self, seconds: f64) {
        let mut w = self.ttft.lock();
        if w.len() >= TTFT_WINDOW {
            w.pop_front();
        }
        w.push_back(seconds);
    }

    /// Generated tokens per second since the previous call.
    fn token_rate(&self, generated_tokens: u64) -> f64 {
        let mut last = self.last_scrape.lock();
        let dt = last.0.elapsed().as_secs_f64();
        let rate = if dt > 0.0 {
            generated_tokens.saturating_sub(last.1) as f64 / dt
        } else {
            0.0
        };
        *last = (Instant::now(), generated_tokens);
        rate
    }

    /// Median and 99th percentile time to first token over the window (0 when empty).
    fn ttft_p50_p99(&self) -> (f64, f64) {
        let mut w: Vec<f64> = self.ttft.lock().iter().copied().collect();
        w.sort_by(f64::total_cmp);
        let q = |p: f64| {
            if w.is_empty() {
                0.0
            } else {
                w[((w.len() - 1) as f64 * p).round() as usize]
            }
        };
        (q(0.5), q(0.99))
    }
}

/// Prometheus text exposition.
pub(super) async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    let s = state.runtime.stats();
    let m = &state.metrics;
    let rate = m.token_rate(s.generated_tokens);
    let (p50, p99) = m.ttft_p50_p99();
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
        m.http_requests.load(Ordering::Relaxed) as f64,
    );
    metric(
        "http_errors_total",
        "counter",
        "HTTP responses with a 4xx or 5xx status.",
        m.http_errors.load(Ordering::Relaxed) as f64,
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
