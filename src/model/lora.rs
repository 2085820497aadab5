//! LoRA weights as the transformer reads them: per layer and target module a pair
//! (A: r×in, B: out×r) of `Var`s and a scale α/r (or α/√r for rsLoRA). The forward passes
//! read the Vars' storage at every call, so an optimizer step that writes them in place is
//! seen by the very next decode step, with no copy and no rebuild of the model.

use candle_core::{DType, Device, Tensor, Var};

use super::config::ModelConfig;
use crate::error::{Error, Result};

/// The linear layers a LoRA adapter may target, with PEFT's module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// PEFT's `target_modules` name.
    pub fn module_name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// Path of the module inside a layer, as in HF and PEFT key names.
    pub fn module_path(self) -> &'static str {
        match self {
            LoraTarget::Q => "self_attn.q_proj",
            LoraTarget::K => "self_attn.k_proj",
            LoraTarget::V => "self_attn.v_proj",
            LoraTarget::O => "self_attn.o_proj",
            LoraTarget::Gate => "mlp.gate_proj",
            LoraTarget::Up => "mlp.up_proj",
            LoraTarget::Down => "mlp.down_proj",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.module_name() == name || name == &t.module_name()[..1])
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown LoRA target '{name}' (known: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj)"
                ))
            })
    }

    /// (in, out) features of this module in a model.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let q = c.num_heads * c.head_dim;
        let kv = c.num_kv_heads * c.head_dim;
        match self {
            LoraTarget::Q => (c.hidden_size, q),
            LoraTarget::K | LoraTarget::V => (c.hidden_size, kv),
            LoraTarget::O => (q, c.hidden_size),
            LoraTarget::Gate | LoraTarget::Up => (c.hidden_size, c.intermediate_size),
            LoraTarget::Down => (c.intermediate_size, c.hidden_size),
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One low-rank update `Δy = scale · x Aᵀ Bᵀ`.
#[derive(Clone)]
pub struct LoraPair {
    /// r × in
    pub a: Var,
    /// out × r
    pub b: Var,
}

/// Shape and scaling of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<LoraTarget>,
    /// rsLoRA: scale α/√r instead of α/r.
    pub use_rslora: bool,
}

impl LoraSpec {
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::InvalidArgument("LoRA rank must be positive".into()));
        }
        if self.targets.is_empty() {
            return Err(Error::InvalidArgument(
                "LoRA needs at least one target module".into(),
            ));
        }
        Ok(())
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// A LoRA adapter for every layer of one model.
pub struct LoraAdapter {
    pub spec: LoraSpec,
    scale: f64,
    /// `layers[l][target as usize]`
    layers: Vec<[Option<LoraPair>; 7]>,
    /// Held for reading by a decode step and for writing by an optimizer update, so a step
    /// never sees half an update.
    update_lock: parking_lot::RwLock<()>,
    /// Incremented by every update (0 = as created or loaded).
    version: std::sync::atomic::AtomicU64,
}

impl LoraAdapter {
    /// A fresh adapter: A ~ Kaiming-uniform (as PEFT), B = 0, so it changes nothing yet.
    pub fn new(
        config: &ModelConfig,
        spec: LoraSpec,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        spec.validate()?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for &t in &spec.targets {
                let (fan_in, fan_out) = t.dims(config);
                // PEFT: kaiming_uniform_(a=√5) → U(-1/√in, 1/√in).
                let bound = 1.0 / (fan_in as f64).sqrt();
                let a =
                    Tensor::rand(-bound, bound, (spec.rank, fan_in), device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((fan_out, spec.rank), dtype, device)?;
                slots[t.index()] = Some(LoraPair {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                });
            }
            layers.push(slots);
        }
        Ok(Self::assemble(spec, layers))
    }

    fn assemble(spec: LoraSpec, layers: Vec<[Option<LoraPair>; 7]>) -> Self {
        Self {
            scale: spec.scale(),
            spec,
            layers,
            update_lock: parking_lot::RwLock::new(()),
            version: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Blocks updates while held (a decode step holds it across its forward pass).
    pub fn read_guard(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.update_lock.read()
    }

    /// Writes new values into the adapter's tensors in place, as one update that no decode
    /// step sees half of, and bumps the version. `update` gets every Var in [`Self::vars`]
    /// order. Returns the new version.
    pub fn update(&self, update: impl FnOnce(&[Var]) -> Result<()>) -> Result<u64> {
        let _guard = self.update_lock.write();
        update(&self.vars())?;
        Ok(self
            .version
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
            + 1)
    }

    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    /// An adapter from existing weights (loaded from a file, say): `pairs` gives, for each
    /// (layer, target) that has one, its A (r × in) and B (out × r). Layers or targets left
    /// out have no update. Shapes, layer indices and targets are checked against `config` and
    /// `spec`; A and B of a pair must share dtype and device.
    pub fn from_pairs(
        config: &ModelConfig,
        spec: LoraSpec,
        pairs: impl IntoIterator<Item = (usize, LoraTarget, LoraPair)>,
    ) -> Result<Self> {
        spec.validate()?;
        let mut layers: Vec<[Option<LoraPair>; 7]> = vec![Default::default(); config.num_layers];
        for (layer, target, pair) in pairs {
            let name = target.module_name();
            if layer >= config.num_layers {
                return Err(Error::InvalidArgument(format!(
                    "LoRA pair for layer {layer} {name}, but the model has {} layers",
                    config.num_layers
                )));
            }
            if !spec.targets.contains(&target) {
                return Err(Error::InvalidArgument(format!(
                    "LoRA pair for {name}, which is not among the adapter's targets"
                )));
            }
            let (fan_in, fan_out) = target.dims(config);
            let checks = [
                ("A", pair.a.as_tensor(), [spec.rank, fan_in]),
                ("B", pair.b.as_tensor(), [fan_out, spec.rank]),
            ];
            for (which, t, want) in checks {
                if t.dims() != want {
                    return Err(Error::InvalidArgument(format!(
                        "LoRA {which} of layer {layer} {name} has shape {:?}, expected {want:?}",
                        t.dims()
                    )));
                }
            }
            let (a, b) = (pair.a.as_tensor(), pair.b.as_tensor());
            if a.dtype() != b.dtype() || !a.device().same_device(b.device()) {
                return Err(Error::InvalidArgument(format!(
                    "LoRA A and B of layer {layer} {name} differ in dtype or device"
                )));
            }
            let slot = &mut layers[layer][target.index()];
            if slot.is_some() {
                return Err(Error::InvalidArgument(format!(
                    "two LoRA pairs for layer {layer} {name}"
                )));
            }
            *slot = Some(pair);
        }
        Ok(Self::assemble(spec, layers))
    }

    /// Every pair the adapter has, in (layer, target) order.
    pub fn pairs(&self) -> impl Iterator<Item = (usize, LoraTarget, &LoraPair)> + '_ {
        self.layers.iter().enumerate().flat_map(|(l, slots)| {
            LoraTarget::ALL
                .into_iter()
                .filter_map(move |t| slots[t.index()].as_ref().map(|p| (l, t, p)))
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn get(&self, layer: usize, target: LoraTarget) -> Option<&LoraPair> {
        self.layers.get(layer)?[target.index()].as_ref()
    }

    /// Every trainable Var, in a fixed order (layer, target, A then B).
    pub fn vars(&self) -> Vec<Var> {
        let mut vars = Vec::new();
        for slots in &self.layers {
            for pair in slots.iter().flatten() {
                vars.push(pair.a.clone());
                vars.push(pair.b.clone());
            }
        }
        vars
    }

    /// `scale · x Aᵀ Bᵀ` for x of shape (rows, in).
    pub fn delta(&self, layer: usize, target: LoraTarget, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(pair) = self.get(layer, target) else {
            return Ok(None);
        };
        let a = pair.a.as_tensor();
        let b = pair.b.as_tensor();
        let x = x.to_dtype(a.dtype())?;
        let low = x.matmul(&a.t()?)?;
        Ok(Some((low.matmul(&b.t()?)? * self.scale)?))
    }
}
