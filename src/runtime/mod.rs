//! The runtime: the one composition root every surface builds on (the CLI, the HTTP
//! server, the C ABI, the eval and rl harnesses, the benches). It owns one model on one
//! device, one engine loop, the adapter registry, the trainer and the feedback it learns
//! from; [`RuntimeBuilder`] puts them together.
//!
//! A request is prepared once, on the caller's thread (chat rendering, tokenizing,
//! validation, the adapter resolved to an `Arc`), decoded by the engine, and finished once,
//! here (scores, selection, verifier, trace store): callers get a typed result or a typed
//! event stream. Each trace gets an id under which a host later reports a reward
//! ([`Runtime::feedback`]). Rewarded traces wait in a bounded store until a learning step
//! ([`Runtime::learn_step`], or the background learner) turns them into a GRPO update of
//! the *learning adapter*; the engine decodes with the new values on its next step.
//!
//! Layout: `config` (what a runtime is made from), `generation` (a request's life),
//! `adapters` (the registry), `feedback` (the trace store), `learner` (the trainer).

mod adapters;
mod config;
mod feedback;
mod generation;
mod learner;

pub use adapters::{AdapterInfo, BASE_ADAPTER};
pub use config::{LoraSettings, RuntimeConfig, DEFAULT_MODEL, DEFAULT_SCORE_WINDOW};
pub use generation::{
    GenerateRequest, GenerateResult, GeneratedTrace, Generation, GenerationEvent, Vote,
};
pub use learner::LearningStatus;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;
use parking_lot::{Condvar, Mutex, RwLock};
use serde::Serialize;

use crate::adapter::{load_peft, save_versioned_for_base};
use crate::engine::{prompt_tokens, Engine, EngineStats, Prompt};
use crate::error::{Error, Result};
use crate::model::{LoraAdapter, Model};
use crate::train::{Rollout, StepReport, Trainer};
use crate::verify::{ChoiceVerifier, ExactMatch, MathVerifier, Verifier};

use adapters::{check_adapter_id, AdapterRegistry};
use feedback::{pending, TraceRecord};
use generation::{sequential_for, Prepared, QueueSlot};
use learner::{Background, LearnState};

/// Counters for monitoring.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeStats {
    /// Requests accepted.
    pub requests: u64,
    /// Requests refused or failed.
    pub requests_failed: u64,
    /// Requests accepted and not finished.
    pub in_flight: usize,
    /// Traces remembered for feedback since the start.
    pub traces_recorded: u64,
    /// Rewards reported.
    pub feedback_received: u64,
    /// Rewarded traces not yet trained on.
    pub feedback_pending: usize,
    /// Learning steps taken.
    pub learn_steps: u64,
    /// Learning steps that changed the adapter.
    pub learn_steps_applied: u64,
    /// Mean reward of the last learning step.
    pub last_reward_mean: Option<f64>,
    /// The background learner is on.
    pub learning_running: bool,
    /// KV positions all running sequences may hold.
    pub kv_budget_tokens: usize,
    /// Prompt tokens run through the model.
    pub prompt_tokens_prefilled: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// KV positions reserved now.
    pub kv_reserved: usize,
    /// Requests decoding now.
    pub running_requests: usize,
    /// Requests waiting for KV or batch room.
    pub waiting_requests: usize,
    /// Seconds since the runtime started.
    pub uptime_seconds: f64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    requests_failed: AtomicU64,
    traces: AtomicU64,
    feedback: AtomicU64,
}

struct Inner {
    engine: Engine,
    config: RuntimeConfig,
    adapters: AdapterRegistry,
    verifiers: RwLock<HashMap<String, Arc<dyn Verifier>>>,
    traces: Mutex<BTreeMap<u64, TraceRecord>>,
    /// Signalled when feedback arrives or the background learner must stop.
    feedback_signal: Condvar,
    next_trace: AtomicU64,
    in_flight: AtomicUsize,
    learn: Mutex<LearnState>,
    background: Mutex<Background>,
    counters: Counters,
    started: Instant,
}

/// Puts a runtime together: the model (loaded from `config.model` on `config.device`, or
/// given), the engine, the adapter registry with the learning adapter and any adapters to
/// preload, the trainer and the verifiers.
///
/// ```no_run
/// use verity::{GenerateRequest, Runtime, RuntimeConfig};
/// use verity::engine::Request;
///
/// let runtime = Runtime::builder(RuntimeConfig::default())
///     .adapter("math", "adapters/math/v3")
///     .build()?;
/// let result = runtime.generate(GenerateRequest::new(Request::text("2 + 2 =")))?;
/// println!("{}", result.traces[0].trace.text);
/// # Ok::<(), verity::Error>(())
/// ```
pub struct RuntimeBuilder {
    config: RuntimeConfig,
    model: Option<Arc<Model>>,
    adapters: Vec<(String, PathBuf)>,
    verifiers: Vec<(String, Arc<dyn Verifier>)>,
}

impl RuntimeBuilder {
    /// A builder that loads `config.model`.
    pub fn new(config: RuntimeConfig) -> Self {
        Self {
            config,
            model: None,
            adapters: Vec::new(),
            verifiers: Vec::new(),
        }
    }

    /// Uses an already loaded model (`config.model` and `config.device` are then only
    /// labels; the model's own device is used).
    pub fn model(mut self, model: Arc<Model>) -> Self {
        self.model = Some(model);
        self
    }

    /// Loads a PEFT adapter folder under `id` when the runtime is built. Loading into the
    /// learning adapter's id makes the trainer start from it.
    pub fn adapter(mut self, id: impl Into<String>, dir: impl Into<PathBuf>) -> Self {
        self.adapters.push((id.into(), dir.into()));
        self
    }

    /// Registers a verifier requests can name (besides "math", "exact" and "choice").
    pub fn verifier(mut self, name: impl Into<String>, verifier: Arc<dyn Verifier>) -> Self {
        self.verifiers.push((name.into(), verifier));
        self
    }

    /// Loads what is missing, starts the engine loop and creates the learning adapter.
    pub fn build(self) -> Result<Runtime> {
        let config = self.config;
        config.validate()?;
        let model = match self.model {
            Some(m) => m,
            None => Arc::new(Model::load(&config.model, &config.load_options()?)?),
        };
        let spec = config.lora.spec()?;
        let t = &model.transformer;
        let learning = Arc::new(LoraAdapter::new(t.config(), spec, t.dtype(), t.device())?);
        let engine = Engine::new(model, config.engine())?;
        let mut verifiers: HashMap<String, Arc<dyn Verifier>> = HashMap::new();
        verifiers.insert("math".into(), Arc::new(MathVerifier));
        verifiers.insert("exact".into(), Arc::new(ExactMatch::default()));
        verifiers.insert("choice".into(), Arc::new(ChoiceVerifier));
        let trainer = Trainer::new(learning.clone(), config.train.clone());
        let runtime = Runtime {
            inner: Arc::new(Inner {
                engine,
                adapters: AdapterRegistry::new(
                    config.learn_adapter.clone(),
                    learning,
                    config.serve_learn_adapter,
                ),
                verifiers: RwLock::new(verifiers),
                traces: Mutex::new(BTreeMap::new()),
                feedback_signal: Condvar::new(),
                next_trace: AtomicU64::new(1),
                in_flight: AtomicUsize::new(0),
                learn: Mutex::new(LearnState::new(trainer)),
                background: Mutex::new(Background {
                    stop: true,
                    min_traces: config.learn_min_traces.max(1),
                    thread: None,
                }),
                counters: Counters::default(),
                started: Instant::now(),
                config,
            }),
        };
        for (name, verifier) in self.verifiers {
            runtime.register_verifier(&name, verifier)?;
        }
        for (id, dir) in &self.adapters {
            runtime.adapter_load(id, dir)?;
        }
        Ok(runtime)
    }
}

/// The shared runtime. Every method takes `&self` and may be called from any thread.
pub struct Runtime {
    inner: Arc<Inner>,
}

impl Runtime {
    /// A builder over `config`.
    pub fn builder(config: RuntimeConfig) -> RuntimeBuilder {
        RuntimeBuilder::new(config)
    }

    /// Loads the model, starts the engine loop and creates the learning adapter
    /// (`Runtime::builder(config).build()`).
    pub fn new(config: RuntimeConfig) -> Result<Self> {
        RuntimeBuilder::new(config).build()
    }

    /// The settings the runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }
    /// The model.
    pub fn model(&self) -> &Arc<Model> {
        self.inner.engine.model()
    }
    /// A short name of the model (its file or folder name).
    pub fn model_name(&self) -> String {
        model_name(&self.inner.engine.model().path)
    }
    /// The device the model runs on, as the device option writes it (`cpu`, `cuda:0`).
    pub fn device(&self) -> String {
        crate::device::describe(self.model().transformer.device())
    }

    /// Prepares a request on this thread (render, tokenize, validate, resolve the adapter)
    /// and starts it; stream it or wait for its result.
    pub fn submit(&self, request: GenerateRequest) -> Result<Generation> {
        let inner = &self.inner;
        let queued = inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let slot = QueueSlot(inner.clone());
        let started = if queued >= inner.config.max_queued_requests {
            Err(Error::Busy(format!(
                "{queued} requests are in flight (limit {})",
                inner.config.max_queued_requests
            )))
        } else {
            self.start(request)
        };
        match started {
            Ok((handle, prepared)) => {
                inner.counters.requests.fetch_add(1, Ordering::Relaxed);
                Ok(Generation::new(handle, prepared, inner.clone(), slot))
            }
            Err(e) => {
                inner
                    .counters
                    .requests_failed
                    .fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    fn start(&self, request: GenerateRequest) -> Result<(crate::engine::RequestHandle, Prepared)> {
        let GenerateRequest {
            mut request,
            adapter,
            selection,
            parallel,
            verify,
            scores,
            remember,
        } = request;
        let default_parallel = selection.and_then(|rule| rule.default_parallel());
        match (parallel, default_parallel) {
            (Some(0), _) => {
                return Err(Error::InvalidArgument("parallel must be at least 1".into()))
            }
            (Some(_), None) => return Err(Error::InvalidArgument(
                "parallel applies to a sequential selection rule (esc, adaptive, deepconf-online)"
                    .into(),
            )),
            _ => {}
        }
        if let (Some(rule), Some(default), None) =
            (selection, default_parallel, &request.sequential)
        {
            // A default wider than a batch (esc:100) runs a batch at a time; a `parallel`
            // asked for explicitly is checked by the engine like any other size.
            let parallel = parallel.unwrap_or(default.min(self.inner.config.max_batch));
            let (sequential, early_stop) = sequential_for(rule, parallel, request.n);
            request.sequential = Some(sequential);
            if request.early_stop.is_none() {
                request.early_stop = early_stop;
            }
        }
        let resolved = self.inner.adapters.resolve(adapter.as_deref())?;
        let verify = match verify {
            Some((name, reference)) => Some((self.verifier(&name)?, reference)),
            None => None,
        };
        // The engine validates the rest (sampling values, context, KV budget) in `submit`.
        let prompt = prompt_tokens(self.model(), &request.prompt)?;
        request.prompt = Prompt::Tokens(prompt.clone());
        let (adapter_id, adapter) = resolved.unzip();
        let handle = self.inner.engine.submit(request, adapter)?;
        Ok((
            handle,
            Prepared {
                prompt: Arc::new(prompt),
                adapter: adapter_id,
                selection,
                verify,
                scores,
                remember,
            },
        ))
    }

    /// Runs a request to the end (blocking; not from inside an async runtime).
    pub fn generate(&self, request: GenerateRequest) -> Result<GenerateResult> {
        self.submit(request)?.blocking_result()
    }

    fn verifier(&self, name: &str) -> Result<Arc<dyn Verifier>> {
        let verifiers = self.inner.verifiers.read();
        verifiers.get(name).cloned().ok_or_else(|| {
            let mut known: Vec<&str> = verifiers.keys().map(String::as_str).collect();
            known.sort();
            Error::NotFound(format!(
                "no verifier '{name}' (registered: {})",
                known.join(", ")
            ))
        })
    }

    /// Adds (or replaces) a verifier that requests can name.
    pub fn register_verifier(&self, name: &str, verifier: Arc<dyn Verifier>) -> Result<()> {
        if name.trim().is_empty() {
            return Err(Error::InvalidArgument("a verifier needs a name".into()));
        }
        self.inner
            .verifiers
            .write()
            .insert(name.to_string(), verifier);
        Ok(())
    }

    /// Records a reward (any finite value; 0..1 by convention) for a finished trace.
    pub fn feedback(&self, trace_id: u64, reward: f64) -> Result<()> {
        self.inner.feedback(trace_id, reward)
    }

    /// Rewarded traces waiting for a learning step.
    pub fn feedback_pending(&self) -> usize {
        pending(&self.inner.traces.lock())
    }

    /// One GRPO step of the learning adapter on every rewarded trace not yet trained on.
    /// With none pending the report says so and nothing changes.
    pub fn learn_step(&self) -> Result<StepReport> {
        self.inner.learn_step()
    }

    /// One GRPO step of the learning adapter on rollouts the caller rewarded itself (the
    /// `rl` harness); decoded with the learning adapter, their `adapter_version` says how
    /// stale they are.
    pub fn train_on(&self, rollouts: &[Rollout]) -> Result<StepReport> {
        self.inner.train_on(rollouts)
    }

    /// Multiplies the learning rate of the trainer (a collapse guard halves it).
    pub fn scale_learning_rate(&self, factor: f64) {
        self.inner.learn.lock().trainer.scale_lr(factor);
    }

    /// The adapter the trainer updates (to save or inspect; decode steps read its
    /// published snapshot).
    pub fn learning_adapter(&self) -> Arc<LoraAdapter> {
        self.inner.adapters.learning()
    }

    /// Id of the learning adapter.
    pub fn learning_adapter_id(&self) -> &str {
        self.inner.adapters.learning_id()
    }

    /// Makes the learning adapter's values those of a saved PEFT folder (a rollback), as
    /// one published update; the optimizer state is kept.
    pub fn restore_learning_adapter(&self, dir: &Path) -> Result<()> {
        let t = &self.model().transformer;
        let saved = load_peft(dir, t.config(), DType::F32, t.device())?;
        let values: Vec<_> = saved
            .vars()
            .iter()
            .map(|v| v.as_tensor().to_dtype(t.dtype()))
            .collect::<candle_core::Result<_>>()?;
        self.inner.adapters.learning().publish(values)?;
        Ok(())
    }

    /// Starts learning in the background: a step whenever `min_traces` rewarded traces are
    /// pending (the config's `learn_min_traces` when `None`). Idempotent.
    pub fn start_learning(&self, min_traces: Option<usize>) -> Result<()> {
        self.inner.start_learning(min_traces)
    }

    /// Stops the background learner after its current step.
    pub fn stop_learning(&self) {
        self.inner.stop_learning()
    }

    /// What the learner is doing.
    pub fn learning_status(&self) -> LearningStatus {
        self.inner.learning_status()
    }

    /// Every loaded adapter, by id.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.inner.adapters.list()
    }

    /// The version of a loaded adapter.
    pub fn adapter_version(&self, id: &str) -> Result<u64> {
        self.inner
            .adapters
            .get(id)
            .map(|a| a.version())
            .ok_or_else(|| Error::NotFound(format!("no adapter '{id}' is loaded")))
    }

    /// Loads a PEFT adapter folder under `id` (replacing one of that id). Loading into the
    /// learning adapter's id makes the trainer continue from it with a fresh optimizer.
    pub fn adapter_load(&self, id: &str, dir: &Path) -> Result<()> {
        check_adapter_id(id)?;
        let t = &self.model().transformer;
        let adapter = Arc::new(load_peft(dir, t.config(), t.dtype(), t.device())?);
        if id == self.inner.adapters.learning_id() {
            self.inner.replace_learning(adapter);
        } else {
            self.inner.adapters.insert(id, adapter);
        }
        Ok(())
    }

    /// Saves adapter `id` as a new version under `root` (or the config's `adapter_dir`):
    /// `root/id/vN` in PEFT format. Returns the folder written.
    pub fn adapter_save(&self, id: &str, root: Option<&Path>) -> Result<PathBuf> {
        let adapter = self
            .inner
            .adapters
            .get(id)
            .ok_or_else(|| Error::NotFound(format!("no adapter '{id}' is loaded")))?;
        let root = root
            .map(Path::to_path_buf)
            .or_else(|| self.inner.config.adapter_dir.clone())
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "no folder given to save into and no adapter_dir configured".into(),
                )
            })?;
        save_versioned_for_base(
            &adapter,
            self.model().transformer.config(),
            &root,
            id,
            &self.model_name(),
        )
    }

    /// Makes `id` the adapter of requests that name none; "base" or `None` selects the
    /// base model.
    pub fn adapter_select(&self, id: Option<&str>) -> Result<()> {
        self.inner.adapters.select(id)
    }

    /// The adapter of requests that name none (`None`: the base model).
    pub fn default_adapter(&self) -> Option<String> {
        self.inner.adapters.default_id()
    }

    /// Unloads an adapter (not the learning one).
    pub fn adapter_remove(&self, id: &str) -> Result<()> {
        self.inner.adapters.remove(id)
    }

    /// Counters for monitoring.
    pub fn stats(&self) -> RuntimeStats {
        let e: EngineStats = self.inner.engine.stats();
        let c = &self.inner.counters;
        let learn = self.inner.learn.lock();
        RuntimeStats {
            requests: c.requests.load(Ordering::Relaxed),
            requests_failed: c.requests_failed.load(Ordering::Relaxed),
            in_flight: self.inner.in_flight.load(Ordering::Relaxed),
            traces_recorded: c.traces.load(Ordering::Relaxed),
            feedback_received: c.feedback.load(Ordering::Relaxed),
            feedback_pending: self.feedback_pending(),
            learn_steps: learn.steps,
            learn_steps_applied: learn.applied,
            last_reward_mean: learn.last.as_ref().map(|r| r.reward_mean),
            learning_running: self.inner.background.lock().thread.is_some(),
            kv_budget_tokens: self.inner.config.kv_budget_tokens,
            prompt_tokens_prefilled: e.prompt_tokens_prefilled,
            generated_tokens: e.generated_tokens,
            kv_reserved: e.kv_reserved,
            running_requests: e.running_requests,
            waiting_requests: e.waiting_requests,
            uptime_seconds: self.inner.started.elapsed().as_secs_f64(),
        }
    }

    /// The engine's own counters (steps, KV peak).
    pub fn engine_stats(&self) -> EngineStats {
        self.inner.engine.stats()
    }

    /// Makes the next `steps` decode steps fail (tests of the error paths only).
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn fail_next_decode_steps(&self, steps: usize) {
        self.inner.engine.fail_next_steps(steps)
    }

    /// Stops background learning and the engine loop; requests still running end with an
    /// [`Error::Unavailable`]. Called by drop as well.
    pub fn shutdown(&self) {
        self.stop_learning();
        self.inner.engine.shutdown();
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn model_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}
