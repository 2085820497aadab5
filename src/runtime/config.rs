//! What a runtime is made from: [`RuntimeConfig`] (every field has a default; loadable
//! from a JSON or TOML file) and the LoRA shape of the learning adapter.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::device::DeviceSpec;
use crate::engine::EngineConfig;
use crate::error::{Error, Result};
use crate::model::{LoadOptions, LoraSpec, LoraTarget, WeightFormat};
use crate::train::TrainConfig;

/// The model every surface uses when none is named (`models/fetch.sh` gets it).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The window (in tokens) of the DeepConf group confidence a result reports
/// (`lowest_group:W`) unless the config sets another.
pub const DEFAULT_SCORE_WINDOW: usize = 64;

/// LoRA shape of the learning adapter, in file-friendly form.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSettings {
    /// Rank r of the A (r × in) and B (out × r) factors.
    pub rank: usize,
    /// Scale numerator: the update is (alpha / r) · B A (alpha / √r with `rslora`).
    pub alpha: f64,
    /// PEFT module names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub targets: Vec<String>,
    /// Rank-stabilized scaling (alpha / √r).
    pub rslora: bool,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: LoraTarget::ALL
                .iter()
                .map(|t| t.module_name().to_string())
                .collect(),
            rslora: false,
        }
    }
}

impl LoraSettings {
    /// The checked adapter shape.
    pub fn spec(&self) -> Result<LoraSpec> {
        let targets = self
            .targets
            .iter()
            .map(|t| LoraTarget::parse(t))
            .collect::<Result<Vec<_>>>()?;
        let spec = LoraSpec {
            rank: self.rank,
            alpha: self.alpha,
            targets,
            use_rslora: self.rslora,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// Everything a runtime is made from. Loadable from a JSON or TOML file
/// ([`RuntimeConfig::from_file`]); every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// A GGUF file or a Hugging Face model folder.
    pub model: PathBuf,
    /// Where the model runs: `auto` (a GPU when this build and the machine have one, else
    /// the CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: DeviceSpec,
    /// Dequantize the weights (faster prefill, 4× the memory).
    pub dense: bool,
    /// See [`crate::model::Transformer::set_dense_rows`].
    pub dense_rows: Option<usize>,
    /// KV positions all running sequences may hold together.
    pub kv_budget_tokens: usize,
    /// Most samples decoded in one step.
    pub max_batch: usize,
    /// Most prompt tokens prefilled in one step.
    pub prefill_chunk: usize,
    /// Compute per-token statistics (off only to measure what they cost).
    pub token_stats: bool,
    /// Window of the group confidence in every result's scores (`lowest_group:W`).
    pub score_window: usize,
    /// Requests admitted but not finished before new ones are refused as busy.
    pub max_queued_requests: usize,
    /// Finished traces remembered for feedback (oldest forgotten first).
    pub trace_capacity: usize,
    /// Id of the adapter the trainer updates.
    pub learn_adapter: String,
    /// Decode requests that name no adapter with the learning adapter (else the base).
    pub serve_learn_adapter: bool,
    /// Shape of the learning adapter.
    pub lora: LoraSettings,
    /// The trainer's settings (loss, optimizer, clipping).
    pub train: TrainConfig,
    /// Rewarded traces a background learning step waits for.
    pub learn_min_traces: usize,
    /// Where `adapter_save` writes versioned adapters when no folder is given.
    pub adapter_dir: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let engine = EngineConfig::default();
        Self {
            model: PathBuf::from(DEFAULT_MODEL),
            device: DeviceSpec::Auto,
            dense: false,
            dense_rows: None,
            kv_budget_tokens: engine.kv_budget_tokens,
            max_batch: engine.max_batch,
            prefill_chunk: engine.prefill_chunk,
            token_stats: engine.token_stats,
            score_window: DEFAULT_SCORE_WINDOW,
            max_queued_requests: 256,
            trace_capacity: 4096,
            learn_adapter: "learned".into(),
            serve_learn_adapter: true,
            lora: LoraSettings::default(),
            train: TrainConfig::default(),
            learn_min_traces: 16,
            adapter_dir: None,
        }
    }
}

impl RuntimeConfig {
    /// Reads a `.json` or `.toml` file (by extension; anything else is tried as JSON).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::files::read_to_string(path, crate::files::MAX_CONFIG_BYTES)?;
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        let parsed = if is_toml {
            toml::from_str(&text).map_err(|e| e.to_string())
        } else {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        };
        parsed.map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Checks the values no type can: ids, positive sizes, the LoRA shape.
    pub fn validate(&self) -> Result<()> {
        if self.learn_adapter.is_empty() || self.learn_adapter == super::BASE_ADAPTER {
            return Err(Error::InvalidArgument(format!(
                "learn_adapter must be a name other than '{}'",
                super::BASE_ADAPTER
            )));
        }
        if self.max_queued_requests == 0 || self.trace_capacity == 0 || self.score_window == 0 {
            return Err(Error::InvalidArgument(
                "max_queued_requests, trace_capacity and score_window must be positive".into(),
            ));
        }
        self.lora.spec()?;
        self.train.validate()?;
        Ok(())
    }

    /// How the model file is loaded (weights on `device`). On a GPU, GGUF weights are
    /// dequantized at load (to bf16): verity's quantized matmul kernels are CPU kernels.
    pub fn load_options(&self) -> Result<LoadOptions> {
        let device = self.device.resolve()?;
        Ok(LoadOptions {
            format: if self.dense || !device.is_cpu() {
                WeightFormat::Dense
            } else {
                WeightFormat::Quantized
            },
            device,
            dense_rows: self.dense_rows,
            ..LoadOptions::default()
        })
    }

    pub(crate) fn engine(&self) -> EngineConfig {
        EngineConfig {
            kv_budget_tokens: self.kv_budget_tokens,
            max_batch: self.max_batch,
            prefill_chunk: self.prefill_chunk,
            token_stats: self.token_stats,
            ..EngineConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_files_parse_and_reject_unknown_fields() {
        let dir = std::env::temp_dir().join(format!("verity-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml_path = dir.join("rt.toml");
        std::fs::write(
            &toml_path,
            "model = \"m.gguf\"\ndevice = \"cpu\"\nmax_batch = 8\n[lora]\nrank = 4\ntargets = [\"q_proj\"]\n",
        )
        .unwrap();
        let c = RuntimeConfig::from_file(&toml_path).unwrap();
        assert_eq!(c.model, PathBuf::from("m.gguf"));
        assert_eq!(c.device, DeviceSpec::Cpu);
        assert_eq!(c.max_batch, 8);
        assert_eq!(c.lora.rank, 4);
        assert_eq!(c.lora.spec().unwrap().targets, vec![LoraTarget::Q]);
        assert_eq!(c.trace_capacity, RuntimeConfig::default().trace_capacity);
        let json_path = dir.join("rt.json");
        std::fs::write(&json_path, r#"{"model": "x", "max_bacth": 3}"#).unwrap();
        let err = RuntimeConfig::from_file(&json_path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_bacth"), "{err}");
        std::fs::write(&json_path, r#"{"device": "tpu:0"}"#).unwrap();
        let err = RuntimeConfig::from_file(&json_path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("device 'tpu:0'"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        let c = RuntimeConfig {
            learn_adapter: "base".into(),
            ..RuntimeConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("learn_adapter"));
        let c = RuntimeConfig {
            score_window: 0,
            ..RuntimeConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("score_window"));
    }
}
