//! LoRA weights as the transformer reads them: per layer and target module a pair
//! (A: r×in, B: out×r) and a scale α/r (or α/√r for rsLoRA).
//!
//! An adapter keeps two views of its weights. The trainer differentiates through `Var`s;
//! decode steps read an immutable [`LoraSnapshot`] behind an `Arc`. An update builds its new
//! tensors off to the side and publishes them by swapping that `Arc` (a pointer store under
//! a lock held for nanoseconds), so the hand-off to the decoder costs the same for any model
//! size, copies nothing on the decoder's side, and never waits for a decode step in flight:
//! a step keeps the snapshot it started with, and the very next step sees the new one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use super::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};

/// The linear layers a LoRA adapter may target, with PEFT's module names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraTarget {
    /// Attention query projection (`q_proj`).
    Q,
    /// Attention key projection (`k_proj`).
    K,
    /// Attention value projection (`v_proj`).
    V,
    /// Attention output projection (`o_proj`).
    O,
    /// MLP gate projection (`gate_proj`), the SiLU-activated half of SwiGLU.
    Gate,
    /// MLP up projection (`up_proj`).
    Up,
    /// MLP down projection (`down_proj`).
    Down,
}

impl LoraTarget {
    /// Every target, in layer order (attention, then MLP); the order of [`LoraAdapter::vars`].
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

    /// Parses a PEFT module name (`"q_proj"`, …) or its first letter (`"q"`, `"g"`, …);
    /// anything else is [`Error::InvalidArgument`].
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

/// A matrix of the original model that stacks several of verity's projections (Phi-3's
/// `qkv_proj` and `gate_up_proj`, split at load). PEFT adapts it as one module: one A
/// (r × in) and one B over all its rows. verity's pairs of its parts share that A (one `Var`,
/// so training updates it once, with the gradient of every part) and split B by rows, which
/// is the same update exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedModule {
    /// PEFT's `target_modules` name.
    pub name: &'static str,
    /// Path of the module inside a layer, as in HF and PEFT key names.
    pub path: &'static str,
    /// The projections it stacks, in row order.
    pub parts: &'static [LoraTarget],
}

const PHI3_FUSED: &[FusedModule] = &[
    FusedModule {
        name: "qkv_proj",
        path: "self_attn.qkv_proj",
        parts: &[LoraTarget::Q, LoraTarget::K, LoraTarget::V],
    },
    FusedModule {
        name: "gate_up_proj",
        path: "mlp.gate_up_proj",
        parts: &[LoraTarget::Gate, LoraTarget::Up],
    },
];

/// The fused modules of an architecture (none for most).
pub fn fused_modules(architecture: Architecture) -> &'static [FusedModule] {
    match architecture {
        Architecture::Phi3 => PHI3_FUSED,
        _ => &[],
    }
}

/// The fused module that holds `target` in `architecture`, if any.
pub fn fused_with(architecture: Architecture, target: LoraTarget) -> Option<&'static FusedModule> {
    fused_modules(architecture)
        .iter()
        .find(|f| f.parts.contains(&target))
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
    /// Rank r of every pair (A: r × in, B: out × r); positive.
    pub rank: usize,
    /// LoRA α: the update is scaled by α/r (or α/√r with `use_rslora`).
    pub alpha: f64,
    /// Which linear layers of every block get a pair; not empty.
    pub targets: Vec<LoraTarget>,
    /// rsLoRA: scale α/√r instead of α/r.
    pub use_rslora: bool,
}

/// The largest rank any adapter may have, whatever the model: above every hidden size in
/// use. [`LoraSpec::check_fits`] bounds it by the model's own layers.
pub const MAX_LORA_RANK: usize = 1 << 16;

impl LoraSpec {
    /// Errors with [`Error::InvalidArgument`] on rank 0 or an empty target list, and with
    /// [`Error::OutOfRange`] on a rank above [`MAX_LORA_RANK`] or an α (or α/r) that is
    /// not finite as the f32 the update is computed in.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::InvalidArgument("LoRA rank must be positive".into()));
        }
        if self.rank > MAX_LORA_RANK {
            return Err(Error::OutOfRange(format!(
                "LoRA rank {} is above the largest supported, {MAX_LORA_RANK}",
                self.rank
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::InvalidArgument(
                "LoRA needs at least one target module".into(),
            ));
        }
        let finite_f32 = |x: f64| x.is_finite() && (x as f32).is_finite();
        if !finite_f32(self.alpha) || !finite_f32(self.scale()) {
            return Err(Error::OutOfRange(format!(
                "LoRA alpha {} is not a finite f32 (nor is its scale α/r = {})",
                self.alpha,
                self.scale()
            )));
        }
        Ok(())
    }

    /// [`Self::validate`], and a rank no larger than the smaller side of every targeted
    /// layer of `config` (a larger one adds nothing a full-rank update lacks, and sizes an
    /// allocation by the caller's number).
    pub fn check_fits(&self, config: &ModelConfig) -> Result<()> {
        self.validate()?;
        for fused in fused_modules(config.architecture) {
            let targeted = fused
                .parts
                .iter()
                .filter(|t| self.targets.contains(t))
                .count();
            if targeted != 0 && targeted != fused.parts.len() {
                let names: Vec<&str> = fused.parts.iter().map(|t| t.module_name()).collect();
                return Err(Error::InvalidArgument(format!(
                    "{} stores {} in one matrix ({}): a LoRA adapter targets all of them or none",
                    config.architecture.name(),
                    names.join(", "),
                    fused.name
                )));
            }
        }
        for &t in &self.targets {
            let (fan_in, fan_out) = t.dims(config);
            let most = fan_in.min(fan_out);
            if self.rank > most {
                return Err(Error::OutOfRange(format!(
                    "LoRA rank {} is above {most}, the smaller side of {} ({fan_in} → {fan_out})",
                    self.rank,
                    t.module_name()
                )));
            }
        }
        Ok(())
    }

    /// The factor on `x Aᵀ Bᵀ`: α/r, or α/√r for rsLoRA.
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
    /// Rank, α and targets the adapter was built with.
    pub spec: LoraSpec,
    scale: f64,
    /// `layers[l][target as usize]`: the trainer's Vars.
    layers: Vec<[Option<LoraPair>; 7]>,
    /// Serializes writes to the Vars with readers of them that are not the trainer (saves).
    vars_lock: parking_lot::RwLock<()>,
    /// What decode steps read; replaced whole by [`Self::publish`].
    published: parking_lot::RwLock<Arc<LoraSnapshot>>,
    /// Incremented by every update (0 = as created or loaded); equals the published
    /// snapshot's version.
    version: AtomicU64,
}

/// The adapter's weights as of one version, immutable: what one decode step reads.
pub struct LoraSnapshot {
    /// The adapter version these weights are (see [`LoraAdapter::version`]).
    pub version: u64,
    scale: f64,
    /// `layers[l][target as usize]` = (A, B)
    layers: Vec<[Option<(Tensor, Tensor)>; 7]>,
}

impl LoraSnapshot {
    /// `scale · x Aᵀ Bᵀ` for x of shape (rows, in), or None where the adapter has no pair.
    pub fn delta(&self, layer: usize, target: LoraTarget, x: &Tensor) -> Result<Option<Tensor>> {
        let Some((a, b)) = self
            .layers
            .get(layer)
            .and_then(|s| s[target.index()].as_ref())
        else {
            return Ok(None);
        };
        // Decode rows: the CPU kernel, whose rows do not depend on the batch.
        if let Some(d) = crate::model::cpu_ops::low_rank_delta_f32_cpu(a, b, self.scale, x)? {
            return Ok(Some(d));
        }
        low_rank_delta(a, b, self.scale, x).map(Some)
    }
}

/// The one LoRA formula, for both views: `scale · x Aᵀ Bᵀ`.
fn low_rank_delta(a: &Tensor, b: &Tensor, scale: f64, x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(a.dtype())?;
    let low = x.matmul(&a.t()?)?;
    Ok((low.matmul(&b.t()?)? * scale)?)
}

impl LoraAdapter {
    /// A fresh adapter: A ~ Kaiming-uniform (as PEFT), B = 0, so it changes nothing yet.
    pub fn new(
        config: &ModelConfig,
        spec: LoraSpec,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        spec.check_fits(config)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for _ in 0..config.num_layers {
            let mut slots: [Option<LoraPair>; 7] = Default::default();
            for &t in &spec.targets {
                let (fan_in, fan_out) = t.dims(config);
                // The parts of a fused matrix share the A of the first (PEFT adapts the
                // matrix as one module).
                let shared = fused_with(config.architecture, t)
                    .and_then(|f| slots[f.parts[0].index()].as_ref())
                    .map(|first: &LoraPair| first.a.clone());
                let a = match shared {
                    Some(a) => a,
                    None => {
                        // PEFT: kaiming_uniform_(a=√5) → U(-1/√in, 1/√in).
                        let bound = 1.0 / (fan_in as f64).sqrt();
                        let a = Tensor::rand(-bound, bound, (spec.rank, fan_in), device)?
                            .to_dtype(dtype)?;
                        Var::from_tensor(&a)?
                    }
                };
                let b = Tensor::zeros((fan_out, spec.rank), dtype, device)?;
                slots[t.index()] = Some(LoraPair {
                    a,
                    b: Var::from_tensor(&b)?,
                });
            }
            layers.push(slots);
        }
        Self::assemble(spec, layers)
    }

    fn assemble(spec: LoraSpec, layers: Vec<[Option<LoraPair>; 7]>) -> Result<Self> {
        let scale = spec.scale();
        // The first snapshot copies the Vars: later in-place writes to them must not show.
        let snapshot = LoraSnapshot {
            version: 0,
            scale,
            layers: layers
                .iter()
                .map(|slots| {
                    let mut out: [Option<(Tensor, Tensor)>; 7] = Default::default();
                    for (o, pair) in out.iter_mut().zip(slots) {
                        if let Some(p) = pair {
                            *o = Some((p.a.as_tensor().copy()?, p.b.as_tensor().copy()?));
                        }
                    }
                    Ok(out)
                })
                .collect::<Result<_>>()?,
        };
        Ok(Self {
            scale,
            spec,
            layers,
            vars_lock: parking_lot::RwLock::new(()),
            published: parking_lot::RwLock::new(Arc::new(snapshot)),
            version: AtomicU64::new(0),
        })
    }

    /// The factor on `x Aᵀ Bᵀ` ([`LoraSpec::scale`] of `spec`).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Keeps the Vars from changing while held. Only `adapter`'s saves take it, themselves,
    /// while they read the Vars; nothing may hold it around a call into a save, since
    /// parking_lot read locks are not re-entrant once a writer ([`Self::publish`]) waits.
    pub(crate) fn vars_guard(&self) -> parking_lot::RwLockReadGuard<'_, ()> {
        self.vars_lock.read()
    }

    /// The weights decode steps should use now. A step takes one snapshot and keeps it,
    /// so it never sees half an update.
    pub fn snapshot(&self) -> Arc<LoraSnapshot> {
        self.published.read().clone()
    }

    /// Makes `values` (one tensor per Var, in [`Self::vars`] order, shapes as theirs) the
    /// adapter's weights and returns the new version and the hand-off time: from the call
    /// until decode steps see the new values. The tensors are moved into the new snapshot
    /// as they are (no copy), so they must not share storage with anything written later,
    /// such as a Var; the Vars get copies afterwards, on the caller's thread, off the
    /// decoder's path.
    pub fn publish(&self, values: Vec<Tensor>) -> Result<(u64, std::time::Duration)> {
        let start = std::time::Instant::now();
        let vars = self.vars();
        if values.len() != vars.len() {
            return Err(Error::InvalidArgument(format!(
                "{} tensors for an adapter of {} (a checkpoint of another adapter?)",
                values.len(),
                vars.len()
            )));
        }
        for (v, var) in values.iter().zip(&vars) {
            if v.dims() != var.dims() {
                return Err(Error::InvalidArgument(format!(
                    "adapter tensor of shape {:?} where {:?} is expected",
                    v.dims(),
                    var.dims()
                )));
            }
        }
        let mut layers: Vec<[Option<(Tensor, Tensor)>; 7]> = Vec::with_capacity(self.layers.len());
        // In `vars` order: a shared A comes once, with the first pair that has it.
        let mut next = values.iter();
        for slots in &self.layers {
            let mut out: [Option<(Tensor, Tensor)>; 7] = Default::default();
            let mut seen: Vec<(candle_core::TensorId, Tensor)> = Vec::new();
            for (o, pair) in out.iter_mut().zip(slots) {
                let Some(pair) = pair else { continue };
                let id = pair.a.as_tensor().id();
                let a = match seen.iter().find(|(s, _)| *s == id) {
                    Some((_, a)) => Some(a.clone()),
                    None => next.next().cloned().inspect(|a| seen.push((id, a.clone()))),
                };
                if let (Some(a), Some(b)) = (a, next.next()) {
                    *o = Some((a, b.clone()));
                }
            }
            layers.push(out);
        }
        let mut snapshot = LoraSnapshot {
            version: 0,
            scale: self.scale,
            layers,
        };
        let (version, previous) = {
            let mut published = self.published.write();
            let version = self.version.load(Ordering::Acquire) + 1;
            snapshot.version = version;
            let previous = std::mem::replace(&mut *published, Arc::new(snapshot));
            self.version.store(version, Ordering::Release);
            (version, previous)
        };
        let handoff = start.elapsed();
        // Freeing the old weights (when no step holds them) is not part of the hand-off.
        drop(previous);
        let _vars = self.vars_lock.write();
        for (var, value) in vars.iter().zip(&values) {
            var.set(value)?;
        }
        Ok((version, handoff))
    }

    /// Number of updates published so far (0 = as created or loaded).
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
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
        spec.check_fits(config)?;
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
        for (layer, slots) in layers.iter().enumerate() {
            for fused in fused_modules(config.architecture) {
                let ids: Vec<_> = fused
                    .parts
                    .iter()
                    .filter_map(|t| slots[t.index()].as_ref())
                    .map(|p| p.a.as_tensor().id())
                    .collect();
                if ids.windows(2).any(|w| w[0] != w[1]) {
                    return Err(Error::InvalidArgument(format!(
                        "layer {layer}: the LoRA pairs of {}'s parts must share one A",
                        fused.name
                    )));
                }
            }
        }
        Self::assemble(spec, layers)
    }

    /// Every pair the adapter has, in (layer, target) order.
    pub fn pairs(&self) -> impl Iterator<Item = (usize, LoraTarget, &LoraPair)> + '_ {
        self.layers.iter().enumerate().flat_map(|(l, slots)| {
            LoraTarget::ALL
                .into_iter()
                .filter_map(move |t| slots[t.index()].as_ref().map(|p| (l, t, p)))
        })
    }

    /// Layers the adapter covers (the model's layer count).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The pair of (layer, target), or None if the adapter does not touch that module.
    pub fn get(&self, layer: usize, target: LoraTarget) -> Option<&LoraPair> {
        self.layers.get(layer)?[target.index()].as_ref()
    }

    /// Every trainable Var, in a fixed order (layer, target, A then B), each once: a pair
    /// whose A it shares with an earlier pair of its layer (the parts of a fused matrix)
    /// adds only its B.
    pub fn vars(&self) -> Vec<Var> {
        let mut vars = Vec::new();
        for slots in &self.layers {
            let mut seen = Vec::new();
            for pair in slots.iter().flatten() {
                let id = pair.a.as_tensor().id();
                if !seen.contains(&id) {
                    seen.push(id);
                    vars.push(pair.a.clone());
                }
                vars.push(pair.b.clone());
            }
        }
        vars
    }

    /// `scale · x Aᵀ Bᵀ` for x of shape (rows, in), through the Vars (the training view,
    /// differentiable); decode steps use [`Self::snapshot`].
    pub fn delta(&self, layer: usize, target: LoraTarget, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(pair) = self.get(layer, target) else {
            return Ok(None);
        };
        low_rank_delta(pair.a.as_tensor(), pair.b.as_tensor(), self.scale, x).map(Some)
    }
}
