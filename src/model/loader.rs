//! Opening a model from a path: a GGUF file or a Hugging Face folder, with its tokenizer.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::config::ModelConfig;
use super::llama::{Transformer, WeightFormat};
use super::{gguf, hf};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where the weights and activations live (CPU by default).
    pub device: Device,
    /// Keep GGUF blocks quantized or dequantize them (quantized by default).
    pub format: WeightFormat,
    /// Activation/dense dtype; default f32 on CPU, bf16 on GPU.
    pub dtype: Option<DType>,
    /// See [`Transformer::set_dense_rows`].
    pub dense_rows: Option<usize>,
    /// KV cache dtype; default f16 where quantized weights run on the CPU (as llama.cpp
    /// does: half the memory and half the bytes attention reads per step), else the
    /// activation dtype.
    pub kv_dtype: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            format: WeightFormat::Quantized,
            dtype: None,
            dense_rows: None,
            kv_dtype: None,
        }
    }
}

impl LoadOptions {
    fn dtype(&self) -> DType {
        self.dtype.unwrap_or(if self.device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        })
    }

    fn kv_dtype(&self) -> DType {
        self.kv_dtype.unwrap_or(
            if self.device.is_cpu() && self.format == WeightFormat::Quantized {
                DType::F16
            } else {
                self.dtype()
            },
        )
    }
}

/// Which kind of file a model came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ModelFormat {
    /// A single `.gguf` file (weights, hyper-parameters and tokenizer).
    Gguf,
    /// A Hugging Face folder: `config.json`, `*.safetensors`, `tokenizer.json`.
    HuggingFace,
}

/// A loaded model: the transformer, its tokenizer, and where it came from.
pub struct Model {
    /// The network: weights, forward passes, KV cache factory.
    pub transformer: Transformer,
    /// The tokenizer shipped with the weights (GGUF metadata or `tokenizer.json`).
    pub tokenizer: Tokenizer,
    /// The file or folder the model was loaded from.
    pub path: PathBuf,
    /// Whether `path` is a GGUF file or a Hugging Face folder.
    pub format: ModelFormat,
    /// Weight names in the file that the transformer did not use.
    pub unused_weights: Vec<String>,
}

impl Model {
    /// Loads a model from a `.gguf` file or a Hugging Face folder (told apart by whether
    /// `path` is a directory), with its tokenizer. Errors on I/O failures, unsupported
    /// architectures or tensor types, shapes that disagree with the config, and a tokenizer
    /// with more tokens than the embedding has rows.
    pub fn load(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        let dtype = options.dtype();
        if meta.is_dir() {
            let (config, mut weights) = hf::load(path, dtype, &options.device)?;
            let tokenizer = Tokenizer::from_hf_dir(path)?;
            Self::check_vocab(path, &config, &tokenizer)?;
            let mut transformer =
                Transformer::new(config, &mut weights, options.format, dtype, &options.device)?;
            transformer.set_dense_rows(options.dense_rows)?;
            transformer.set_kv_dtype(options.kv_dtype())?;
            Ok(Self {
                transformer,
                tokenizer,
                path: path.to_path_buf(),
                format: ModelFormat::HuggingFace,
                unused_weights: weights.remaining(),
            })
        } else {
            let (header, mut reader) = gguf::read_header(path)?;
            let mut config = gguf::config_from_header(path, &header)?;
            let mut weights =
                gguf::read_weights(path, &header, &mut reader, &mut config, &options.device)?;
            let tokenizer = Tokenizer::from_gguf(&header)?;
            Self::check_vocab(path, &config, &tokenizer)?;
            let mut transformer =
                Transformer::new(config, &mut weights, options.format, dtype, &options.device)?;
            transformer.set_dense_rows(options.dense_rows)?;
            transformer.set_kv_dtype(options.kv_dtype())?;
            Ok(Self {
                transformer,
                tokenizer,
                path: path.to_path_buf(),
                format: ModelFormat::Gguf,
                unused_weights: weights.remaining(),
            })
        }
    }

    /// The model's hyper-parameters (as read from the file, checked).
    pub fn config(&self) -> &ModelConfig {
        self.transformer.config()
    }

    /// The tokenizer may know fewer ids than the logits row has (padding rows), never more.
    fn check_vocab(path: &Path, config: &ModelConfig, tokenizer: &Tokenizer) -> Result<()> {
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(Error::bad_file(
                path,
                format!(
                    "the tokenizer has {} tokens but the embedding only {} rows",
                    tokenizer.vocab_size(),
                    config.vocab_size
                ),
            ));
        }
        Ok(())
    }
}
