//! Writing an adapter as a PEFT folder, replaced atomically (see `atomic.rs`).
//!
//! A save reads the adapter's Vars, which the trainer may write at the same moment (a
//! [`LoraAdapter::publish`]); it takes the adapter's Vars read lock itself for as long as it
//! reads them. Callers must not hold that lock around a save: parking_lot read locks are not
//! re-entrant once a writer waits.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::atomic::{self, Contents, FolderWriter, Locked, Step};
use super::peft::{
    module_key, peft_config_json, peft_key, PeftModule, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE,
};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::lora::LoraAdapter;

/// What a PEFT folder holds: a save replaces a folder holding nothing else.
const PEFT_FOLDER: Contents<'static> = Contents {
    what: "a PEFT adapter",
    files: &[ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE],
};

/// Writes `adapter` as a PEFT LoRA folder at `dir` (created, or replaced atomically).
///
/// An existing `dir` is replaced only if it holds nothing but the two adapter files; any
/// other content makes this an error, so that a wrong path cannot delete unrelated data.
/// Tensors are stored as f32. An empty `base_model_name` is written as `null`.
///
/// Takes the adapter's Vars read lock while it reads the weights: the caller must not hold
/// it (`LoraAdapter::vars_guard`), or the save can deadlock against an update.
pub fn save_peft(
    adapter: &LoraAdapter,
    config: &ModelConfig,
    dir: &Path,
    base_model_name: &str,
) -> Result<()> {
    save_peft_with(adapter, config, dir, base_model_name, &mut |_| Ok(()))
}

/// The points of a save at which the test hook of [`save_peft_with`] is called.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum SaveStep<'a> {
    /// `adapter_config.json` written into the temporary folder, not yet synced.
    ConfigWritten(&'a Path),
    /// `adapter_model.safetensors` written into the temporary folder, not yet synced.
    TensorsWritten(&'a Path),
    /// Both files and the temporary folder synced.
    Synced(&'a Path),
    /// The previous destination renamed aside to this path; the new one not yet in place.
    OldMovedAside(&'a Path),
    /// The new version renamed into place (an error from here on is reported, but the new
    /// version stays); the old one not yet removed.
    Committed(&'a Path),
}

/// [`save_peft`] with a hook called at each [`SaveStep`], for tests that make a save fail
/// (the hook returns an error) or crash (the hook aborts the process) part-way. Takes the
/// adapter's Vars read lock itself, as [`save_peft`] does.
#[doc(hidden)]
pub fn save_peft_with(
    adapter: &LoraAdapter,
    config: &ModelConfig,
    dir: &Path,
    base_model_name: &str,
    hook: &mut dyn FnMut(SaveStep<'_>) -> std::io::Result<()>,
) -> Result<()> {
    save_locked(&atomic::lock(), adapter, config, dir, base_model_name, hook)
}

/// [`save_peft_with`] for a caller that holds the replace lock already.
pub(super) fn save_locked(
    lock: &Locked,
    adapter: &LoraAdapter,
    config: &ModelConfig,
    dir: &Path,
    base_model_name: &str,
    hook: &mut dyn FnMut(SaveStep<'_>) -> std::io::Result<()>,
) -> Result<()> {
    check_adapter(adapter, config)?;
    let mut writer = PeftWriter {
        adapter,
        config,
        base_model_name,
        hook,
    };
    atomic::replace_dir(lock, dir, &PEFT_FOLDER, &mut writer)
}

/// An adapter saved for `config` must fit it: PEFT checks the shapes when it loads.
/// (Reads only shapes, which updates never change: no need for the Vars lock.)
fn check_adapter(adapter: &LoraAdapter, config: &ModelConfig) -> Result<()> {
    if adapter.num_layers() != config.num_layers {
        return Err(Error::InvalidArgument(format!(
            "the adapter has {} layers, the model config {}",
            adapter.num_layers(),
            config.num_layers
        )));
    }
    let rank = adapter.spec.rank;
    for (layer, target, pair) in adapter.pairs() {
        let (fan_in, fan_out) = target.dims(config);
        let checks = [
            (false, pair.a.as_tensor(), [rank, fan_in]),
            (true, pair.b.as_tensor(), [fan_out, rank]),
        ];
        for (b, t, want) in checks {
            if t.dims() != want {
                return Err(Error::InvalidArgument(format!(
                    "'{}' has shape {:?}, but the model config needs {want:?}",
                    peft_key(layer, target, b),
                    t.dims()
                )));
            }
        }
    }
    Ok(())
}

/// Writes the two PEFT files into the temporary folder of a replace.
struct PeftWriter<'a, 'h> {
    adapter: &'a LoraAdapter,
    config: &'a ModelConfig,
    base_model_name: &'a str,
    hook: &'h mut dyn FnMut(SaveStep<'_>) -> std::io::Result<()>,
}

impl FolderWriter for PeftWriter<'_, '_> {
    fn write(&mut self, tmp: &Path) -> Result<()> {
        let config_path = tmp.join(ADAPTER_CONFIG_FILE);
        let json = peft_config_json(
            &self.adapter.spec,
            self.config.architecture,
            self.base_model_name,
        );
        let mut text = serde_json::to_string_pretty(&json)
            .map_err(|e| Error::InvalidArgument(format!("cannot serialize adapter config: {e}")))?;
        text.push('\n');
        let mut file = File::create(&config_path).map_err(|e| Error::io(&config_path, e))?;
        file.write_all(text.as_bytes())
            .map_err(|e| Error::io(&config_path, e))?;
        (self.hook)(SaveStep::ConfigWritten(&config_path))
            .map_err(|e| Error::io(&config_path, e))?;
        file.sync_all().map_err(|e| Error::io(&config_path, e))?;
        drop(file);

        let weights_path = tmp.join(ADAPTER_WEIGHTS_FILE);
        {
            // No update may write the Vars until the file is written: an f32 tensor on the
            // CPU is taken as it is, sharing the Var's storage.
            let _vars = self.adapter.vars_guard();
            let mut tensors: HashMap<String, Tensor> = HashMap::new();
            let host = |t: &Tensor| -> Result<Tensor> {
                Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
            };
            for (layer, target, pair) in self.adapter.pairs() {
                match PeftModule::of(self.config.architecture, target) {
                    PeftModule::One(_) => {
                        for (b, var) in [(false, &pair.a), (true, &pair.b)] {
                            tensors.insert(peft_key(layer, target, b), host(var.as_tensor())?);
                        }
                    }
                    // A fused matrix once, at its first part: the shared A and the parts'
                    // B rows stacked in order (`LoraSpec::check_fits` has them all).
                    PeftModule::Fused(f) if f.parts[0] == target => {
                        let mut bs = Vec::with_capacity(f.parts.len());
                        for &part in f.parts {
                            let p = self.adapter.get(layer, part).ok_or_else(|| {
                                Error::InvalidArgument(format!(
                                    "layer {layer}: {} has no LoRA pair for {}",
                                    f.name,
                                    part.module_name()
                                ))
                            })?;
                            bs.push(host(p.b.as_tensor())?);
                        }
                        tensors.insert(module_key(layer, f.path, false), host(pair.a.as_tensor())?);
                        tensors.insert(module_key(layer, f.path, true), Tensor::cat(&bs, 0)?);
                    }
                    PeftModule::Fused(_) => {}
                }
            }
            candle_core::safetensors::save(&tensors, &weights_path).map_err(|e| {
                Error::bad_file(&weights_path, format!("cannot write safetensors: {e}"))
            })?;
        }
        (self.hook)(SaveStep::TensorsWritten(&weights_path))
            .map_err(|e| Error::io(&weights_path, e))?;
        atomic::sync_file(&weights_path)
    }

    fn step(&mut self, step: Step<'_>) -> std::io::Result<()> {
        (self.hook)(match step {
            Step::Synced(p) => SaveStep::Synced(p),
            Step::OldMovedAside(p) => SaveStep::OldMovedAside(p),
            Step::Committed(p) => SaveStep::Committed(p),
        })
    }
}
