//! AdamW over LoRA `Var`s with a warm-up then cosine or constant learning-rate schedule
//! and global-norm gradient clipping. A step's new values are fresh tensors handed to
//! [`LoraAdapter::publish`], which is the whole trainer → decoder hand-off.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::LoraAdapter;

/// The learning-rate curve after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Schedule {
    /// Stay at `lr`.
    #[default]
    Constant,
    /// Half a cosine from `lr` down to `min_lr_ratio · lr` at `total_steps`, then flat.
    Cosine,
}

/// Hyper-parameters of [`AdamW`] and its learning-rate schedule.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// Peak learning rate (1e-5 by default).
    pub lr: f64,
    /// Decay of the first-moment (mean) estimate, β₁.
    pub beta1: f64,
    /// Decay of the second-moment (uncentred variance) estimate, β₂.
    pub beta2: f64,
    /// Added to √v̂ in the denominator of the update.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies the weights by 1 − lr · weight_decay.
    pub weight_decay: f64,
    /// Steps of linear warm-up from lr/warmup_steps to lr (0 = none).
    pub warmup_steps: u64,
    /// Steps of the cosine schedule (the rate reaches `min_lr_ratio · lr` there).
    pub total_steps: u64,
    /// Floor of the cosine schedule as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Shape of the rate after warm-up.
    pub schedule: Schedule,
    /// Global L2 norm the gradient is clipped to (0 = no clipping).
    pub max_grad_norm: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            total_steps: 1000,
            min_lr_ratio: 0.0,
            schedule: Schedule::Constant,
            max_grad_norm: 1.0,
        }
    }
}

impl AdamWConfig {
    /// Errors with [`Error::OutOfRange`] on a setting that would write non-finite or
    /// meaningless weights: lr outside (0, 1], β outside [0, 1), ε not a positive f32,
    /// negative or non-finite weight decay, a floor ratio outside [0, 1], a negative or
    /// non-finite clip norm.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, value: f64, range: &str| {
            Err(Error::OutOfRange(format!(
                "optimizer {what} must be {range}, got {value}"
            )))
        };
        if !(self.lr > 0.0 && self.lr <= 1.0) {
            return bad("learning rate", self.lr, "in (0, 1]");
        }
        for (what, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(what, beta, "in [0, 1)");
            }
        }
        // ε is added in f32 on the device: one that rounds to 0 there divides by zero.
        if !(self.eps.is_finite() && self.eps as f32 >= f32::MIN_POSITIVE) {
            return bad("eps", self.eps, "a positive f32");
        }
        if !(self.weight_decay >= 0.0 && self.lr * self.weight_decay <= 1.0) {
            return bad(
                "weight decay",
                self.weight_decay,
                "non-negative with lr · weight_decay ≤ 1",
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio", self.min_lr_ratio, "in [0, 1]");
        }
        if !(self.max_grad_norm >= 0.0 && self.max_grad_norm.is_finite()) {
            return bad(
                "max_grad_norm",
                self.max_grad_norm,
                "finite and non-negative",
            );
        }
        Ok(())
    }

    /// Learning rate at optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Cosine => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let floor = self.lr * self.min_lr_ratio;
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// The AdamW optimizer over one adapter's Vars, with its moment estimates.
pub struct AdamW {
    /// The hyper-parameters; may be changed between steps (the trainer scales `lr`).
    pub config: AdamWConfig,
    step: u64,
    /// First and second moments, by position in `LoraAdapter::vars()`.
    moments: HashMap<usize, (Tensor, Tensor)>,
}

impl AdamW {
    /// An optimizer with no moments yet (they start at zero on each Var's first gradient).
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// Updates applied so far; the next one uses `config.lr_at(steps_taken())`.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Global L2 norm of `grads`.
    pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
        let mut sum = 0f64;
        for g in grads.iter().flatten() {
            sum += g
                .sqr()?
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(sum.sqrt())
    }

    /// One update of `adapter` with `grads` (in `vars()` order, None = no gradient).
    /// Returns the new adapter version, the learning rate used, and the hand-off time (see
    /// [`LoraAdapter::publish`]); or None, with the weights, the moments and the step count
    /// untouched, when the update would make a weight non-finite (finite gradients can
    /// still overflow a weight in f16 or bf16).
    pub fn step(
        &mut self,
        adapter: &LoraAdapter,
        grads: &[Option<Tensor>],
        grad_norm: f64,
    ) -> Result<Option<(u64, f64, std::time::Duration)>> {
        let c = self.config.clone();
        let lr = c.lr_at(self.step);
        let clip = if c.max_grad_norm > 0.0 && grad_norm > c.max_grad_norm {
            c.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        let t = (self.step + 1) as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        // Every new value is a fresh tensor; publishing swaps them in at once.
        let vars = adapter.vars();
        let mut updates: Vec<Tensor> = Vec::with_capacity(vars.len());
        let mut moments: Vec<(usize, (Tensor, Tensor))> = Vec::with_capacity(vars.len());
        // One sum per updated Var, read back together: finite iff every weight is.
        let mut sums: Vec<Tensor> = Vec::with_capacity(vars.len());
        for (i, (var, grad)) in vars.iter().zip(grads).enumerate() {
            let Some(g) = grad else {
                updates.push(var.as_tensor().copy()?);
                continue;
            };
            let g = (g * clip)?;
            let (m, v) = match self.moments.get(&i) {
                Some((m, v)) => (
                    ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?,
                    ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?,
                ),
                None => ((&g * (1.0 - c.beta1))?, (g.sqr()? * (1.0 - c.beta2))?),
            };
            let m_hat = (&m / bc1)?;
            let v_hat = (&v / bc2)?;
            let theta = var.as_tensor();
            let step = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let decayed = (theta * (1.0 - lr * c.weight_decay))?;
            let updated = (decayed - (step * lr)?)?;
            sums.push(updated.to_dtype(DType::F32)?.sum_all()?);
            updates.push(updated);
            moments.push((i, (m, v)));
        }
        if !sums.is_empty() {
            let sums = Tensor::stack(&sums, 0)?.to_vec1::<f32>()?;
            if sums.iter().any(|s| !s.is_finite()) {
                return Ok(None);
            }
        }
        self.moments.extend(moments);
        let (version, published) = adapter.publish(updates)?;
        self.step += 1;
        Ok(Some((version, lr, published)))
    }
}
