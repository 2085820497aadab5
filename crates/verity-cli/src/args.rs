//! The options every model-running subcommand shares, and the one place the CLI builds a
//! runtime from them.

use std::ffi::OsString;
use std::path::PathBuf;

use verity::runtime::{RuntimeConfig, DEFAULT_MODEL};
use verity::{DeviceSpec, Runtime};

/// Which model, where, in which weight format.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face model folder [default: the SmolLM2 GGUF that
    /// `models/fetch.sh` gets, unless --config names one].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where to run: auto (a GPU when this build and the machine have one), cpu, cuda,
    /// cuda:N [default: auto, unless --config names one].
    #[arg(long, value_parser = parse_device)]
    pub device: Option<DeviceSpec>,
    /// Dequantize weights to dense tensors instead of running on quantized blocks.
    #[arg(long)]
    pub dense: bool,
    /// Run steps of at least this many tokens (batches, prompt chunks) on dense copies of
    /// quantized weights: faster batches and prefill, more memory, and batch-dependent
    /// numerics (see `Transformer::set_dense_rows`).
    #[arg(long)]
    pub dense_rows: Option<usize>,
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse().map_err(|e: verity::Error| e.to_string())
}

impl ModelArgs {
    /// Lays these flags over `config` (a flag given wins; a flag not given keeps the
    /// config's value).
    pub fn apply(&self, config: &mut RuntimeConfig) {
        if let Some(m) = &self.model {
            config.model = m.clone();
        }
        if let Some(d) = self.device {
            config.device = d;
        }
        config.dense |= self.dense;
        if self.dense_rows.is_some() {
            config.dense_rows = self.dense_rows;
        }
    }

    /// The config of a one-off run (no server): no learning adapter on the decode path.
    pub fn config(&self) -> RuntimeConfig {
        let mut config = RuntimeConfig {
            serve_learn_adapter: false,
            ..RuntimeConfig::default()
        };
        self.apply(&mut config);
        config
    }

    /// Builds the runtime for `config`, with a hint when the default model is missing.
    pub fn build(config: RuntimeConfig) -> Result<Runtime, String> {
        Self::builder(config)?.build().map_err(|e| e.to_string())
    }

    /// A builder for `config`, checked for the missing-default-model case first.
    pub fn builder(config: RuntimeConfig) -> Result<verity::RuntimeBuilder, String> {
        if !config.model.exists() && config.model.as_os_str() == DEFAULT_MODEL {
            return Err(format!(
                "{DEFAULT_MODEL} is missing: run `models/fetch.sh` first to get the default model"
            ));
        }
        // A device that cannot be had is the flag's fault: say so before loading anything.
        if config.device != DeviceSpec::Auto {
            config
                .device
                .resolve()
                .map_err(|e| format!("--device (or the config file's `device`): {e}"))?;
        }
        Ok(Runtime::builder(config))
    }
}

/// A `--prompt` argument as UTF-8, or an error naming the flag.
/// A conversation as a prompt, with `--chat-template-kwargs` (a JSON object of extra
/// template variables, e.g. `{"enable_thinking": false}`) when given.
pub fn chat_prompt(
    messages: Vec<verity::ChatMessage>,
    kwargs: Option<&str>,
) -> Result<verity::engine::Prompt, String> {
    use verity::engine::Prompt;
    let Some(text) = kwargs else {
        return Ok(Prompt::Chat(messages));
    };
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(map)) => Ok(Prompt::ChatWith(messages, map)),
        Ok(_) => Err(
            "--chat-template-kwargs must be a JSON object, like '{\"enable_thinking\": false}'"
                .into(),
        ),
        Err(e) => Err(format!("--chat-template-kwargs is not JSON: {e}")),
    }
}

pub fn utf8_prompt(prompt: OsString) -> Result<String, String> {
    prompt
        .into_string()
        .map_err(|p| format!("--prompt is not valid UTF-8: {}", p.to_string_lossy()))
}

/// A comma-separated list of selection rules.
pub fn parse_rules(list: &str) -> Result<Vec<verity::select::SelectionRule>, String> {
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().map_err(|e| format!("--select: {e}")))
        .collect()
}
