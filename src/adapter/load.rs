//! Reading a PEFT LoRA folder (written by verity or by PEFT itself) into a [`LoraAdapter`],
//! checking it against the model: every mismatch is an error that names what is wrong.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;

use super::atomic;
use super::peft::{
    known_modules, parse_key, parse_peft_config, KeyError, Listed, PeftModule, ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
};
use crate::error::{Error, Result};
use crate::files;
use crate::model::config::ModelConfig;
use crate::model::lora::{LoraAdapter, LoraPair, LoraSpec, LoraTarget};

/// Reads a PEFT LoRA folder written by [`save_peft`](super::save_peft) or by PEFT itself, checking it against
/// `config`, into an adapter whose tensors have `dtype` and live on `device`.
///
/// Accepted: `peft_type` `"LORA"`, `r > 0`, `use_rslora`, `target_modules` as a list of
/// module names (`"q_proj"`, or a path suffix such as `"self_attn.q_proj"`), `"all-linear"` or
/// a regular expression, `layers_to_transform` (missing layers get no update), and key names
/// with the adapter name inserted (`lora_A.default.weight`). A fused module (Phi-3's
/// `qkv_proj`, `gate_up_proj`) gives each of its parts that A and its rows of B. Rejected with an error naming
/// what is wrong: other PEFT types, DoRA, per-module rank or alpha patterns, LoRA biases,
/// `modules_to_save`, modules verity does not have, A without B or B without A, layer indices
/// beyond the model, and tensors whose shape does not fit the model.
///
/// If `dir` is missing because a save was interrupted between its two renames, the complete
/// old version set aside beside it is read.
pub fn load_peft(
    dir: &Path,
    config: &ModelConfig,
    dtype: DType,
    device: &Device,
) -> Result<LoraAdapter> {
    // A save may replace the folder while it is read: read both files from one version.
    // A rank is at most min(in, out), so A and B hold at most 2·in·out numbers per
    // layer: twice the base weights, 4 bytes each in f32, plus the header.
    let max_weight_bytes = (config.num_parameters() as u64)
        .saturating_mul(8)
        .saturating_add(16 << 20);
    let (folder, (text, bytes)) = atomic::read_consistent(dir, |folder| {
        let text =
            files::read_to_string(&folder.join(ADAPTER_CONFIG_FILE), files::MAX_CONFIG_BYTES)?;
        let bytes = files::read(&folder.join(ADAPTER_WEIGHTS_FILE), max_weight_bytes)?;
        Ok((text, bytes))
    })?;
    let config_path = folder.join(ADAPTER_CONFIG_FILE);
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&config_path, format!("not valid JSON: {e}")))?;
    let arch = config.architecture;
    let (spec_base, listed) = parse_peft_config(&config_path, &json, arch)?;

    let weights_path = folder.join(ADAPTER_WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::bad_file(&weights_path, format!("cannot read safetensors: {e}")))?;
    drop(bytes);
    if tensors.is_empty() {
        return Err(Error::bad_file(&weights_path, "holds no LoRA tensors"));
    }

    // Sort keys so that errors are reproducible.
    let tensors: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    let mut unknown_modules = BTreeSet::new();
    let mut adapter_names = BTreeSet::new();
    // (layer, module by its first part) → (A, B) with their keys.
    type Slot = (Option<(String, Tensor)>, Option<(String, Tensor)>);
    let mut slots: BTreeMap<(usize, LoraTarget), Slot> = BTreeMap::new();
    for (key, tensor) in tensors {
        let parsed = match parse_key(&key, arch) {
            Ok(parsed) => parsed,
            Err(KeyError::UnknownModule(module)) => {
                unknown_modules.insert(module);
                continue;
            }
            Err(KeyError::Unsupported) => {
                return Err(Error::bad_file(
                    &weights_path,
                    format!("tensor '{key}' is not a LoRA A or B weight verity can use"),
                ))
            }
        };
        // Finite as the dtype the adapter is used in: one NaN (or an f32 beyond f16's range
        // loaded as f16) turns every output of the model into noise.
        let used = tensor.to_dtype(dtype)?.to_dtype(DType::F32)?;
        if let Some(bad) = used
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .find(|x| !x.is_finite())
        {
            return Err(Error::bad_file(
                &weights_path,
                format!("tensor '{key}' holds a non-finite value ({bad}) as {dtype:?}"),
            ));
        }
        adapter_names.insert(parsed.adapter_name.unwrap_or_default());
        let slot = slots
            .entry((parsed.layer, parsed.module.parts()[0]))
            .or_default();
        let place = if parsed.b { &mut slot.1 } else { &mut slot.0 };
        if let Some((other, _)) = place {
            return Err(Error::bad_file(
                &weights_path,
                format!("tensors '{other}' and '{key}' are the same LoRA weight"),
            ));
        }
        *place = Some((key, tensor));
    }
    if !unknown_modules.is_empty() {
        let list: Vec<String> = unknown_modules.into_iter().collect();
        return Err(Error::bad_file(
            &weights_path,
            format!(
                "LoRA weights for modules verity does not have: {} (known: {})",
                list.join(", "),
                known_modules(arch)
            ),
        ));
    }
    if adapter_names.len() > 1 {
        let list: Vec<String> = adapter_names
            .into_iter()
            .map(|n| if n.is_empty() { "(none)".into() } else { n })
            .collect();
        return Err(Error::bad_file(
            &weights_path,
            format!(
                "tensors of several adapters in one file: {}",
                list.join(", ")
            ),
        ));
    }

    // Which targets the config names, and which the tensors have.
    let present: BTreeSet<LoraTarget> = slots
        .keys()
        .flat_map(|&(_, t)| PeftModule::of(arch, t).parts())
        .collect();
    let name_of = |t: &LoraTarget| PeftModule::of(arch, *t).name();
    let targets: Vec<LoraTarget> = match listed {
        Listed::Names(names) => {
            for t in &present {
                if !names.contains(t) {
                    return Err(Error::bad_file(
                        &weights_path,
                        format!(
                            "has LoRA weights for {}, which target_modules in {ADAPTER_CONFIG_FILE} does not list",
                            name_of(t)
                        ),
                    ));
                }
            }
            for t in &names {
                if !present.contains(t) {
                    return Err(Error::bad_file(
                        &weights_path,
                        format!(
                            "has no LoRA weights for {}, which target_modules in {ADAPTER_CONFIG_FILE} lists",
                            name_of(t)
                        ),
                    ));
                }
            }
            names
        }
        Listed::Matching(matching) => {
            for t in &present {
                if !matching.contains(t) {
                    return Err(Error::bad_file(
                        &weights_path,
                        format!(
                            "has LoRA weights for {}, which target_modules in {ADAPTER_CONFIG_FILE} does not match",
                            name_of(t)
                        ),
                    ));
                }
            }
            present.iter().copied().collect()
        }
    };
    let spec = LoraSpec {
        targets,
        ..spec_base
    };

    let mut pairs = Vec::with_capacity(slots.len());
    for ((layer, first), (a, b)) in slots {
        let module = PeftModule::of(arch, first);
        let name = module.name();
        if layer >= config.num_layers {
            let key = a.as_ref().or(b.as_ref()).map(|(k, _)| k.as_str());
            return Err(Error::bad_file(
                &weights_path,
                format!(
                    "tensor '{}' is for layer {layer}, but the model has {} layers",
                    key.unwrap_or_default(),
                    config.num_layers
                ),
            ));
        }
        let ((a_key, a), (b_key, b)) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (a, b) => {
                let (have, missing) = match (a, b) {
                    (Some((k, _)), _) => (k, "lora_B"),
                    (_, Some((k, _))) => (k, "lora_A"),
                    _ => (String::new(), "lora_A and lora_B"),
                };
                return Err(Error::bad_file(
                    &weights_path,
                    format!("layer {layer} {name} has '{have}' but no {missing} weight"),
                ));
            }
        };
        let parts = module.parts();
        let fan_in = first.dims(config).0;
        let fan_out: usize = parts.iter().map(|t| t.dims(config).1).sum();
        let expect = [
            (&a_key, &a, [spec.rank, fan_in], "rank × in_features"),
            (&b_key, &b, [fan_out, spec.rank], "out_features × rank"),
        ];
        for (key, t, want, what) in expect {
            if t.dims() != want {
                return Err(Error::bad_file(
                    &weights_path,
                    format!(
                        "tensor '{key}' has shape {:?}, but r = {} and the model config need {want:?} ({what} of {name})",
                        t.dims(),
                        spec.rank
                    ),
                ));
            }
        }
        // One A for every part; each part its rows of B.
        let a = Var::from_tensor(&a.to_dtype(dtype)?.to_device(device)?)?;
        let b = b.to_dtype(dtype)?.to_device(device)?;
        let mut row = 0;
        for target in parts {
            let rows = target.dims(config).1;
            let b = Var::from_tensor(&b.narrow(0, row, rows)?.contiguous()?)?;
            row += rows;
            pairs.push((layer, target, LoraPair { a: a.clone(), b }));
        }
    }
    LoraAdapter::from_pairs(config, spec, pairs)
}
