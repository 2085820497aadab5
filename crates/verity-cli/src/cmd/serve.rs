//! `verity serve`: the HTTP API over one runtime, until Ctrl-C or SIGTERM. Settings come
//! from `--config FILE` (JSON or TOML, the fields of `RuntimeConfig`); a flag given on the
//! command line wins over the file, a flag not given leaves the file's value.

use std::path::PathBuf;
use std::sync::Arc;

use verity::RuntimeConfig;
use verity_server::{Limits, ServerConfig};

use crate::args::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Runtime settings (JSON or TOML; see `RuntimeConfig`); flags given override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` (or set VERITY_API_KEY).
    #[arg(long, env = "VERITY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Serve on a non-loopback --host without an API key: anyone who reaches the port can
    /// generate, train the adapter and save it.
    #[arg(long)]
    insecure_no_api_key: bool,
    /// Largest n a request may ask for.
    #[arg(long, default_value_t = 64)]
    max_n: usize,
    /// Largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    max_tokens: usize,
    /// Requests in flight before new ones get 429.
    #[arg(long)]
    max_queued: Option<usize>,
    /// Where adapters are saved.
    #[arg(long)]
    adapter_dir: Option<PathBuf>,
    /// Start background learning from feedback at once.
    #[arg(long)]
    learn: bool,
    /// Open connections at most; the next is answered 503 and closed.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Seconds a client has to send a request's headers (and an idle keep-alive connection
    /// waits for its next request) before the connection is closed.
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds a client has to send a request's body (408 after).
    #[arg(long, default_value_t = 30.0)]
    body_timeout: f64,
}

/// A timeout flag as a duration: positive and finite.
fn seconds(flag: &str, s: f64) -> Result<std::time::Duration, String> {
    std::time::Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--{flag} must be a positive number of seconds, not {s}"))
}

pub fn run(args: Args) -> Result<(), String> {
    // Checked before the model loads: a mistake costs nothing.
    let header_timeout = seconds("header-timeout", args.header_timeout)?;
    let body_timeout = seconds("body-timeout", args.body_timeout)?;
    if args.max_connections == 0 {
        return Err("--max-connections must be at least 1".into());
    }
    if !args.host.is_loopback() && args.api_key.is_none() && !args.insecure_no_api_key {
        return Err(format!(
            "--host {} is reachable from other machines, and without --api-key (or \
             VERITY_API_KEY) anyone there could generate, train the adapter and save it; \
             give a key, or --insecure-no-api-key if that is what you mean",
            args.host
        ));
    }
    let mut config = match &args.config {
        Some(path) => RuntimeConfig::from_file(path).map_err(|e| format!("--config: {e}"))?,
        None => RuntimeConfig::default(),
    };
    args.model.apply(&mut config);
    if let Some(q) = args.max_queued {
        config.max_queued_requests = q;
    }
    if args.adapter_dir.is_some() {
        config.adapter_dir = args.adapter_dir;
    }
    let runtime = Arc::new(ModelArgs::build(config)?);
    if args.learn {
        runtime.start_learning(None).map_err(|e| e.to_string())?;
    }
    let server = ServerConfig {
        addr: std::net::SocketAddr::new(args.host, args.port),
        api_key: args.api_key,
        limits: Limits {
            max_n: args.max_n,
            max_tokens: args.max_tokens,
            ..Limits::default()
        },
        max_connections: args.max_connections,
        header_timeout,
        body_timeout,
        ..ServerConfig::default()
    };
    verity_server::serve_until_signal(runtime, server)
}
