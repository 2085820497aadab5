//! The PEFT LoRA format: the names of its two files and of its tensors, the
//! `adapter_config.json` verity writes, and the parsing of what PEFT (or verity) wrote:
//! the config's fields and the tensor keys. No file I/O here: `save.rs` and `load.rs` write
//! and read the files.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::config::Architecture;
use crate::model::lora::{fused_with, FusedModule, LoraSpec, LoraTarget};

/// PEFT's adapter configuration file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// The prefix PEFT puts before the base model's own key names.
const PEFT_PREFIX: &str = "base_model.model.";

/// PEFT's key of one LoRA tensor, e.g.
/// `base_model.model.model.layers.3.mlp.down_proj.lora_B.weight`.
pub fn peft_key(layer: usize, target: LoraTarget, b: bool) -> String {
    module_key(layer, target.module_path(), b)
}

/// PEFT's key of one LoRA tensor of the module at `path` in a layer.
pub(super) fn module_key(layer: usize, path: &str, b: bool) -> String {
    let ab = if b { "lora_B" } else { "lora_A" };
    format!("{PEFT_PREFIX}model.layers.{layer}.{path}.{ab}.weight")
}

/// The module PEFT adapts for `target` in `architecture`: the target itself, or the fused
/// matrix that holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PeftModule {
    One(LoraTarget),
    Fused(&'static FusedModule),
}

impl PeftModule {
    pub fn of(architecture: Architecture, target: LoraTarget) -> Self {
        match fused_with(architecture, target) {
            Some(f) => PeftModule::Fused(f),
            None => PeftModule::One(target),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            PeftModule::One(t) => t.module_name(),
            PeftModule::Fused(f) => f.name,
        }
    }
    pub fn path(self) -> &'static str {
        match self {
            PeftModule::One(t) => t.module_path(),
            PeftModule::Fused(f) => f.path,
        }
    }
    /// verity's targets this module holds.
    pub fn parts(self) -> Vec<LoraTarget> {
        match self {
            PeftModule::One(t) => vec![t],
            PeftModule::Fused(f) => f.parts.to_vec(),
        }
    }
    /// The modules of a layer of `architecture`, in layer order.
    pub fn all(architecture: Architecture) -> Vec<PeftModule> {
        let mut modules: Vec<PeftModule> = Vec::new();
        for t in LoraTarget::ALL {
            let m = PeftModule::of(architecture, t);
            if !modules.contains(&m) {
                modules.push(m);
            }
        }
        modules
    }
}

/// The `adapter_config.json` PEFT would write for `spec` on a model of `architecture`
/// (keys sorted, as PEFT writes them). An empty `base_model_name` is written as `null`.
pub fn peft_config_json(
    spec: &LoraSpec,
    architecture: Architecture,
    base_model_name: &str,
) -> Value {
    let mut targets: Vec<&str> = Vec::new();
    for &t in &spec.targets {
        let name = PeftModule::of(architecture, t).name();
        if !targets.contains(&name) {
            targets.push(name);
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

/// Checks `adapter_config.json` for a model of `architecture`; returns the spec (targets
/// filled in later) and the targets.
pub(super) fn parse_peft_config(
    path: &Path,
    json: &Value,
    architecture: Architecture,
) -> Result<(LoraSpec, Listed)> {
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
                match module_by_name(name, architecture) {
                    Some(m) => {
                        for t in m.parts() {
                            if !targets.contains(&t) {
                                targets.push(t);
                            }
                        }
                    }
                    None => unknown.push(name.to_string()),
                }
            }
            if !unknown.is_empty() {
                return Err(bad(format!(
                    "target_modules names modules verity does not have: {} (known: {})",
                    unknown.join(", "),
                    known_modules(architecture)
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
            let matching: Vec<LoraTarget> = PeftModule::all(architecture)
                .into_iter()
                .filter(|m| re.is_match(&format!("model.layers.0.{}", m.path())))
                .flat_map(PeftModule::parts)
                .collect();
            if matching.is_empty() {
                return Err(bad(format!(
                    "target_modules {pattern:?} matches none of verity's modules ({})",
                    known_modules(architecture)
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
fn module_by_name(name: &str, architecture: Architecture) -> Option<PeftModule> {
    PeftModule::all(architecture).into_iter().find(|m| {
        let path = format!("model.layers.0.{}", m.path());
        name == m.name() || path.ends_with(&format!(".{name}"))
    })
}

/// The modules verity can adapt in a model of `architecture`, for error messages.
pub(super) fn known_modules(architecture: Architecture) -> String {
    PeftModule::all(architecture)
        .iter()
        .map(|m| m.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One tensor key, parsed.
pub(super) struct ParsedKey {
    /// Layer index N of `layers.{N}`.
    pub layer: usize,
    /// Which module of the layer.
    pub module: PeftModule,
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

/// Parses `[base_model.model.]model.layers.{N}.{module_path}.lora_{A,B}[.{adapter}].weight`
/// for a model of `architecture`.
pub(super) fn parse_key(
    key: &str,
    architecture: Architecture,
) -> std::result::Result<ParsedKey, KeyError> {
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
    let Some(module) = PeftModule::all(architecture)
        .into_iter()
        .find(|m| m.path() == path)
    else {
        return Err(unknown());
    };
    Ok(ParsedKey {
        layer,
        module,
        b,
        adapter_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse() {
        let llama = Architecture::Llama;
        let k = parse_key(
            "base_model.model.model.layers.12.mlp.up_proj.lora_B.default.weight",
            llama,
        )
        .ok()
        .expect("parses");
        assert_eq!(
            (k.layer, k.module, k.b, k.adapter_name.as_deref()),
            (12, PeftModule::One(LoraTarget::Up), true, Some("default"))
        );
        let k = parse_key(&peft_key(3, LoraTarget::O, false), llama)
            .ok()
            .expect("parses");
        assert_eq!(
            (k.layer, k.module, k.b),
            (3, PeftModule::One(LoraTarget::O), false)
        );
        // Phi-3's fused modules: their own keys, and no separate q_proj.
        let phi3 = Architecture::Phi3;
        let k = parse_key(
            "base_model.model.model.layers.1.self_attn.qkv_proj.lora_A.weight",
            phi3,
        )
        .ok()
        .expect("parses");
        assert_eq!(
            k.module.parts(),
            [LoraTarget::Q, LoraTarget::K, LoraTarget::V]
        );
        assert!(matches!(
            parse_key(&peft_key(0, LoraTarget::Q, false), phi3),
            Err(KeyError::UnknownModule(m)) if m == "self_attn.q_proj"
        ));
        assert!(matches!(
            parse_key(
                "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight",
                llama
            ),
            Err(KeyError::UnknownModule(_))
        ));
        assert!(matches!(
            parse_key("base_model.model.lm_head.lora_A.weight", llama),
            Err(KeyError::UnknownModule(m)) if m == "lm_head"
        ));
        assert!(matches!(
            parse_key(
                "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight",
                llama
            ),
            Err(KeyError::UnknownModule(m)) if m == "self_attn.rotary"
        ));
        assert!(matches!(
            parse_key(
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                llama
            ),
            Err(KeyError::Unsupported)
        ));
    }

    #[test]
    fn target_names() {
        let llama = Architecture::Llama;
        let one = |t| Some(PeftModule::One(t));
        assert_eq!(module_by_name("q_proj", llama), one(LoraTarget::Q));
        assert_eq!(
            module_by_name("mlp.down_proj", llama),
            one(LoraTarget::Down)
        );
        assert_eq!(module_by_name("proj", llama), None);
        assert_eq!(module_by_name("lm_head", llama), None);
        let gate_up = module_by_name("gate_up_proj", Architecture::Phi3).unwrap();
        assert_eq!(gate_up.parts(), [LoraTarget::Gate, LoraTarget::Up]);
        assert_eq!(module_by_name("gate_proj", Architecture::Phi3), None);
        assert_eq!(
            known_modules(Architecture::Phi3),
            "qkv_proj, o_proj, gate_up_proj, down_proj"
        );
    }
}
