//! Hugging Face model folders: `config.json`, `model.safetensors` or sharded
//! `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`, and the
//! tokenizer files beside them. Also writes such a folder (for tests).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::config::{Architecture, ModelConfig};
use super::weights::{Weight, WeightMap};
use crate::error::{Error, Result};

/// Reads and parses a JSON file; errors name the path.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = crate::files::read_to_string(path, crate::files::MAX_CONFIG_BYTES)?;
    serde_json::from_str(&text).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))
}

/// The safetensors files of a folder, in load order.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::bad_file(&index, "no 'weight_map' object"))?;
        let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.is_file() {
                return Err(Error::bad_file(
                    &index,
                    format!("shard {} is missing", f.display()),
                ));
            }
        }
        return Ok(files);
    }
    Err(Error::bad_file(
        dir,
        "no model.safetensors nor model.safetensors.index.json in the folder",
    ))
}

/// Reads the config and every weight of a HF folder.
pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<(ModelConfig, WeightMap)> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::bad_file(dir, "no config.json in the model folder"));
    }
    let config = ModelConfig::from_hf_json(&read_json(&config_path)?)
        .map_err(|e| Error::bad_file(&config_path, e.to_string()))?;
    let mut weights = HashMap::new();
    for file in safetensors_files(dir)? {
        crate::files::check_regular(&file, u64::MAX)?;
        let tensors = candle_core::safetensors::load(&file, device)
            .map_err(|e| Error::bad_file(&file, format!("cannot read safetensors: {e}")))?;
        for (name, t) in tensors {
            // Gemma's RMSNorm scales by (1 + w): stored here as the factor itself, the
            // way llama.cpp's converter stores it in GGUF files (added in f32, as
            // transformers computes it).
            let t = if config.architecture == Architecture::Gemma3 && name.ends_with("norm.weight")
            {
                (t.to_dtype(DType::F32)? + 1.0)?
            } else {
                t
            };
            let t = if t.dtype() == dtype {
                t
            } else {
                t.to_dtype(dtype)?
            };
            weights.insert(name, Weight::Dense(t));
        }
    }
    Ok((config, WeightMap::new(dir.to_path_buf(), weights)))
}

/// Writes a HF folder: `config.json` and `model.safetensors` (f32) from HF-named tensors.
/// Only tests write model folders, so it exists only for them.
#[cfg(any(test, feature = "test-hooks"))]
pub fn save(
    dir: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config.to_hf_json())
        .map_err(|e| Error::Config(e.to_string()))?;
    std::fs::write(&config_path, text).map_err(|e| Error::io(&config_path, e))?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(tensors, &path)
        .map_err(|e| Error::bad_file(&path, format!("cannot write safetensors: {e}")))?;
    Ok(())
}
