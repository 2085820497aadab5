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
}

pub fn run(args: Args) -> Result<(), String> {
    // Checked before the model loads: a mistake costs nothing.
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
    };
    verity_server::serve_until_signal(runtime, server)
}
