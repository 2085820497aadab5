//! The PEFT LoRA format: the names of its two files and of its tensors, the
//! `adapter_config.json` verity writes, and the parsing of what PEFT (or verity) wrote:
//! the config's fields and the tensor keys. No file I/O here: `save.rs` and `load.rs` write
//! and read the files.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::lora::{LoraSpec, LoraTarget};

/// PEFT's adapter configuration file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The prefix PEFT puts before the base model's own key names.
const PEFT_PREFIX: &str = "base_model.model.";

/// PEFT's key of one LoRA tensor, e.g.
/// `base_model.model.model.layers.3.mlp.down_proj.lora_B.weight`.
pub fn peft_key(layer: usize, target: LoraTarget, b: bool) -> String {
    let ab = if b { "lora_B" } else { "lora_A" };
    format!(
        "{PEFT_PREFIX}model.layers.{layer}.{}.{ab}.weight",
        target.module_path()
    )
}

/// The `adapter_config.json` PEFT would write for `spec` (keys sorted, as PEFT writes them).
/// An empty `base_model_name` is written as `null`.
pub fn peft_config_json(spec: &LoraSpec, base_model_name: &str) -> Value {
    let mut targets: Vec<&str> = Vec::new();
    for t in &spec.targets {
        if !targets.contains(&t.module_name()) {
            targets.push(t.module_name());
        }
    }
    // PEFT's `lora_alpha` is an int; write integral values as integers.
    let alpha: Value = if spec.alpha.fract() == 0.0 && spec.alpha.abs() < 9.0e15 {
        Value::from(spec.alpha as i64)
    } else {
        Value::from(spec.alpha)
    };
    let base = if base_model_name.is_empty() {
        Value::Null
    } else {
        Value::from(base_model_name)
    };
    serde_json::json!({
        "alpha_pattern": {},
        "base_model_name_or_path": base,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": spec.use_rslora,
    })
}

/// The target modules `adapter_config.json` names.
pub(super) enum Listed {
    /// An explicit list: the file must have weights for exactly these.
    Names(Vec<LoraTarget>),
    /// A pattern (`"all-linear"`, a regular expression): weights must be among these.
    Matching(Vec<LoraTarget>),
}

/// Checks `adapter_config.json`; returns the spec (targets filled in later) and the targets.
pub(super) fn parse_peft_config(path: &Path, json: &Value) -> Result<(LoraSpec, Listed)> {
    let bad = |reason: String| Error::bad_file(path, reason);
    if !json.is_object() {
        return Err(bad("expected a JSON object".into()));
    }
    match json.get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => {
            return Err(bad(format!(
                "peft_type is \"{other}\"; verity reads only LoRA adapters (\"LORA\")"
            )))
        }
        None => return Err(bad("missing peft_type (expected \"LORA\")".into())),
    }
    // Fields PEFT may leave out take PEFT's defaults.
    let rank = match json.get("r") {
        None => 8,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| bad(format!("r must be a positive integer, found {v}")))?,
    };
    if rank == 0 {
        return Err(bad("r must be a positive integer, found 0".into()));
    }
    let rank = usize::try_from(rank).map_err(|_| bad(format!("r = {rank} is too large")))?;
    let alpha = match json.get("lora_alpha") {
        None => 8.0,
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite())
            .ok_or_else(|| bad(format!("lora_alpha must be a number, found {v}")))?,
    };
    let flag = |key: &str| -> Result<bool> {
        match json.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(bad(format!("{key} must be true or false, found {v}"))),
        }
    };
    let use_rslora = flag("use_rslora")?;
    if flag("use_dora")? {
        return Err(bad("DoRA adapters (use_dora) are not supported".into()));
    }
    if flag("fan_in_fan_out")? {
        return Err(bad(
            "fan_in_fan_out adapters (transposed weights) are not supported".into(),
        ));
    }
    match json.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "none" => {}
        Some(v) => {
            return Err(bad(format!(
                "bias = {v}: LoRA biases are not supported (only \"none\")"
            )))
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        match json.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) if m.is_empty() => {}
            Some(v) => {
                return Err(bad(format!(
                    "{key} = {v}: per-module ranks and alphas are not supported"
                )))
            }
        }
    }
    match json.get("modules_to_save") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(v) => {
            return Err(bad(format!(
                "modules_to_save = {v}: fully trained modules are not supported"
            )))
        }
    }

    let listed = match json.get("target_modules") {
        Some(Value::Array(items)) => {
            let mut targets = Vec::new();
            let mut unknown = Vec::new();
            for item in items {
                let Some(name) = item.as_str() else {
                    return Err(bad(format!(
                        "target_modules must hold strings, found {item}"
                    )));
                };
                match target_by_name(name) {
                    Some(t) if !targets.contains(&t) => targets.push(t),
                    Some(_) => {}
                    None => unknown.push(name.to_string()),
                }
            }
            if !unknown.is_empty() {
                return Err(bad(format!(
                    "target_modules names modules verity does not have: {} (known: {})",
                    unknown.join(", "),
                    known_modules()
                )));
            }
            if targets.is_empty() {
                return Err(bad("target_modules is empty".into()));
            }
            Listed::Names(targets)
        }
        Some(Value::String(s)) if s == "all-linear" => Listed::Matching(LoraTarget::ALL.to_vec()),
        Some(Value::String(pattern)) => {
            // PEFT full-matches a string against each module's name.
            let re = regex::Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
                bad(format!(
                    "target_modules {pattern:?} is not a regular expression: {e}"
                ))
            })?;
            let matching: Vec<LoraTarget> = LoraTarget::ALL
                .into_iter()
                .filter(|t| re.is_match(&format!("model.layers.0.{}", t.module_path())))
                .collect();
            if matching.is_empty() {
                return Err(bad(format!(
                    "target_modules {pattern:?} matches none of verity's modules ({})",
                    known_modules()
                )));
            }
            Listed::Matching(matching)
        }
        None | Some(Value::Null) => {
            return Err(bad("missing target_modules".into()));
        }
        Some(v) => {
            return Err(bad(format!(
                "target_modules must be a list of names or a pattern, found {v}"
            )))
        }
    };
    let spec = LoraSpec {
        rank,
        alpha,
        targets: Vec::new(),
        use_rslora,
    };
    Ok((spec, listed))
}

/// A `target_modules` entry: the module name or a dotted suffix of its path.
fn target_by_name(name: &str) -> Option<LoraTarget> {
    LoraTarget::ALL.into_iter().find(|t| {
        let path = format!("model.layers.0.{}", t.module_path());
        name == t.module_name() || path.ends_with(&format!(".{name}"))
    })
}

/// The modules verity can adapt, for error messages.
pub(super) fn known_modules() -> String {
    LoraTarget::ALL
        .iter()
        .map(|t| t.module_name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One tensor key, parsed.
pub(super) struct ParsedKey {
    /// Layer index N of `layers.{N}`.
    pub layer: usize,
    /// Which module of the layer.
    pub target: LoraTarget,
    /// `lora_B` (else `lora_A`).
    pub b: bool,
    /// The adapter name PEFT may insert (`lora_A.default.weight`).
    pub adapter_name: Option<String>,
}

/// Why a tensor key is not one verity can load.
pub(super) enum KeyError {
    /// A LoRA weight of a module verity does not have (named as in the key).
    UnknownModule(String),
    /// Not a LoRA A/B weight at all (DoRA magnitudes, biases, embeddings, …).
    Unsupported,
}

/// Parses `[base_model.model.]model.layers.{N}.{module_path}.lora_{A,B}[.{adapter}].weight`.
pub(super) fn parse_key(key: &str) -> std::result::Result<ParsedKey, KeyError> {
    let body = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    // Split "<module>.lora_X[.<adapter>].weight".
    let (module, b, tail) = match (body.rfind(".lora_A."), body.rfind(".lora_B.")) {
        (Some(i), None) => (&body[..i], false, &body[i + ".lora_A.".len()..]),
        (None, Some(i)) => (&body[..i], true, &body[i + ".lora_B.".len()..]),
        _ => return Err(KeyError::Unsupported),
    };
    let adapter_name = match tail {
        "weight" => None,
        t => match t.strip_suffix(".weight") {
            Some(name) if !name.is_empty() && !name.contains('.') => Some(name.to_string()),
            _ => return Err(KeyError::Unsupported),
        },
    };
    let unknown = || {
        // Name the module without the layer prefix: "self_attn.rotary", "lm_head".
        let short = module
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .map(|(_, m)| m)
            .unwrap_or(module);
        KeyError::UnknownModule(short.to_string())
    };
    let Some(rest) = module.strip_prefix("model.layers.") else {
        return Err(unknown());
    };
    let Some((layer, path)) = rest.split_once('.') else {
        return Err(unknown());
    };
    let Ok(layer) = layer.parse::<usize>() else {
        return Err(unknown());
    };
    let Some(target) = LoraTarget::ALL
        .into_iter()
        .find(|t| t.module_path() == path)
    else {
        return Err(unknown());
    };
    Ok(ParsedKey {
        layer,
        target,
        b,
        adapter_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse() {
        let k = parse_key("base_model.model.model.layers.12.mlp.up_proj.lora_B.default.weight")
            .ok()
            .expect("parses");
        assert_eq!(
            (k.layer, k.target, k.b, k.adapter_name.as_deref()),
            (12, LoraTarget::Up, true, Some("default"))
        );
        let k = parse_key(&peft_key(3, LoraTarget::O, false))
            .ok()
            .expect("parses");
        assert_eq!((k.layer, k.target, k.b), (3, LoraTarget::O, false));
        assert!(matches!(
            parse_key("base_model.model.lm_head.lora_A.weight"),
            Err(KeyError::UnknownModule(m)) if m == "lm_head"
        ));
        assert!(matches!(
            parse_key("base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"),
            Err(KeyError::UnknownModule(m)) if m == "self_attn.rotary"
        ));
        assert!(matches!(
            parse_key("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"),
            Err(KeyError::Unsupported)
        ));
    }

    #[test]
    fn target_names() {
        assert_eq!(target_by_name("q_proj"), Some(LoraTarget::Q));
        assert_eq!(target_by_name("mlp.down_proj"), Some(LoraTarget::Down));
        assert_eq!(target_by_name("proj"), None);
        assert_eq!(target_by_name("lm_head"), None);
    }
}
