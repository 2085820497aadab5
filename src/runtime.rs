//! The runtime: one model, one engine loop, the adapters, the trainer and the feedback it
//! learns from. The C ABI (`ffi`) and the HTTP server (`server`) are thin layers over it.
//!
//! A request becomes N traces; each gets an id under which a host later reports a reward
//! ([`Runtime::feedback`]). Rewarded traces wait in a bounded store until a learning step
//! ([`Runtime::learn_step`], or the background learner) turns them into a GRPO update of
//! the *learning adapter*; the engine decodes with the new values on its next step. The
//! N traces of one request form a group (rewards compared within it); rewarded traces
//! whose request has no other rewarded trace are pooled into one group, so that feedback
//! on single answers still teaches (their baseline is the pool's mean reward).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;
use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::adapter::{load_peft, save_versioned_for_base};
use crate::engine::{
    prompt_tokens, Completion, Engine, EngineConfig, EngineStats, Event, Prompt, Request,
    RequestHandle, Trace,
};
use crate::error::{Error, Result};
use crate::model::{LoadOptions, LoraAdapter, LoraSpec, LoraTarget, Model, WeightFormat};
use crate::score::{TraceScore, TraceView};
use crate::select::{select, Candidate, SelectionRule};
use crate::train::{Rollout, StepReport, TrainConfig, Trainer};
use crate::verify::{ChoiceVerifier, ExactMatch, MathVerifier, Verifier};

/// The adapter id that always means "no adapter".
pub const BASE_ADAPTER: &str = "base";

/// LoRA shape of the learning adapter, in file-friendly form.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSettings {
    pub rank: usize,
    pub alpha: f64,
    /// PEFT module names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub targets: Vec<String>,
    pub rslora: bool,
}

impl Default for LoraSettings {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: LoraTarget::ALL
                .iter()
                .map(|t| t.module_name().to_string())
                .collect(),
            rslora: false,
        }
    }
}

impl LoraSettings {
    pub fn spec(&self) -> Result<LoraSpec> {
        let targets = self
            .targets
            .iter()
            .map(|t| LoraTarget::parse(t))
            .collect::<Result<Vec<_>>>()?;
        let spec = LoraSpec {
            rank: self.rank,
            alpha: self.alpha,
            targets,
            use_rslora: self.rslora,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// Everything a runtime is made from. Loadable from a JSON or TOML file
/// ([`RuntimeConfig::from_file`]); every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// A GGUF file or a Hugging Face model folder.
    pub model: PathBuf,
    /// Dequantize the weights (faster prefill, 4× the memory).
    pub dense: bool,
    /// See [`crate::model::Transformer::set_dense_rows`].
    pub dense_rows: Option<usize>,
    /// KV positions all running sequences may hold together.
    pub kv_budget_tokens: usize,
    pub max_batch: usize,
    pub prefill_chunk: usize,
    /// Requests admitted but not finished before new ones are refused as busy.
    pub max_queued_requests: usize,
    /// Finished traces remembered for feedback (oldest forgotten first).
    pub trace_capacity: usize,
    /// Id of the adapter the trainer updates.
    pub learn_adapter: String,
    /// Decode requests that name no adapter with the learning adapter (else the base).
    pub serve_learn_adapter: bool,
    pub lora: LoraSettings,
    pub train: TrainConfig,
    /// Rewarded traces a background learning step waits for.
    pub learn_min_traces: usize,
    /// Where `adapter_save` writes versioned adapters when no folder is given.
    pub adapter_dir: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let engine = EngineConfig::default();
        Self {
            model: PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            dense: false,
            dense_rows: None,
            kv_budget_tokens: engine.kv_budget_tokens,
            max_batch: engine.max_batch,
            prefill_chunk: engine.prefill_chunk,
            max_queued_requests: 256,
            trace_capacity: 4096,
            learn_adapter: "learned".into(),
            serve_learn_adapter: true,
            lora: LoraSettings::default(),
            train: TrainConfig::default(),
            learn_min_traces: 16,
            adapter_dir: None,
        }
    }
}

impl RuntimeConfig {
    /// Reads a `.json` or `.toml` file (by extension; anything else is tried as JSON).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        let parsed = if is_toml {
            toml::from_str(&text).map_err(|e| e.to_string())
        } else {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        };
        parsed.map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    fn engine(&self) -> EngineConfig {
        EngineConfig {
            kv_budget_tokens: self.kv_budget_tokens,
            max_batch: self.max_batch,
            prefill_chunk: self.prefill_chunk,
            ..EngineConfig::default()
        }
    }
}

/// A generation request as the surfaces pass it: the engine request plus how to pick
/// among its traces and, optionally, how to verify them.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub request: Request,
    /// Applied to the traces; `None` picks nothing.
    pub selection: Option<SelectionRule>,
    /// A registered verifier ("math", "exact", "choice", or one added with
    /// [`Runtime::register_verifier`]) and the reference it checks against. Its reward
    /// is recorded as feedback on each trace.
    pub verify: Option<(String, String)>,
}

impl GenerateRequest {
    pub fn new(request: Request) -> Self {
        Self {
            request,
            selection: None,
            verify: None,
        }
    }
}

/// One trace of a result, with the id feedback refers to.
#[derive(Debug, Clone, Serialize)]
pub struct GeneratedTrace {
    pub id: u64,
    #[serde(flatten)]
    pub trace: Trace,
    /// The extracted final answer, if any.
    pub answer: Option<String>,
    /// Trace scores by name ("self_certainty", "logprob", ...).
    pub scores: BTreeMap<String, f64>,
    /// The verifier's reward, when the request named one.
    pub reward: Option<f64>,
}

/// One row of a selection's vote table.
#[derive(Debug, Clone, Serialize)]
pub struct Vote {
    pub answer: String,
    pub weight: f64,
    pub count: usize,
}

/// What a request produced.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateResult {
    pub request_id: u64,
    pub prompt_tokens: usize,
    /// The adapter the request decoded with (`None`: the base model).
    pub adapter: Option<String>,
    pub traces: Vec<GeneratedTrace>,
    /// The selection rule applied, as text.
    pub selection: Option<String>,
    /// Index into `traces` of the chosen trace.
    pub selected: Option<usize>,
    pub answer: Option<String>,
    pub votes: Vec<Vote>,
}

/// A request in flight: stream its events, then [`Generation::finish`] it.
pub struct Generation {
    handle: RequestHandle,
    prompt: Arc<Vec<u32>>,
    adapter: Option<String>,
    selection: Option<SelectionRule>,
    verify: Option<(Arc<dyn Verifier>, String)>,
    runtime: Arc<Inner>,
    _slot: QueueSlot,
}

impl Generation {
    pub fn request_id(&self) -> u64 {
        self.handle.id
    }
    pub fn adapter(&self) -> Option<&str> {
        self.adapter.as_deref()
    }
    pub fn prompt_tokens(&self) -> usize {
        self.prompt.len()
    }
    /// The next event; token events first, then one `Done` or `Error`.
    pub async fn next(&mut self) -> Option<Event> {
        self.handle.next().await
    }
    /// Blocking variant of [`Self::next`]; do not call from inside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.handle.blocking_next()
    }
    /// Cancels the request; its traces end as aborted.
    pub fn abort(&self) {
        self.handle.abort()
    }
    /// Scores, selects, verifies and records the finished traces for feedback.
    pub fn finish(self, completion: Completion) -> GenerateResult {
        self.runtime.finish(
            self.handle.id,
            &self.prompt,
            self.adapter,
            self.selection,
            self.verify,
            completion,
        )
    }
    /// Waits for the traces (skipping token events) and finishes.
    pub fn blocking_result(mut self) -> Result<GenerateResult> {
        loop {
            match self.handle.blocking_next() {
                Some(Event::Done(c)) => return Ok(self.finish(c)),
                Some(Event::Error(e)) => return Err(Error::InvalidArgument(e)),
                Some(Event::Token { .. }) => {}
                None => return Err(engine_gone()),
            }
        }
    }
    /// Async variant of [`Self::blocking_result`].
    pub async fn result(mut self) -> Result<GenerateResult> {
        loop {
            match self.handle.next().await {
                Some(Event::Done(c)) => return Ok(self.finish(c)),
                Some(Event::Error(e)) => return Err(Error::InvalidArgument(e)),
                Some(Event::Token { .. }) => {}
                None => return Err(engine_gone()),
            }
        }
    }
}

fn engine_gone() -> Error {
    Error::InvalidArgument("the engine stopped before the request finished".into())
}

/// Counts a request against `max_queued_requests` while it lives.
struct QueueSlot(Arc<Inner>);
impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An adapter as listed by [`Runtime::adapters`].
#[derive(Debug, Clone, Serialize)]
pub struct AdapterInfo {
    pub id: String,
    pub version: u64,
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    /// The one the trainer updates.
    pub learning: bool,
    /// Used by requests that name no adapter.
    pub default: bool,
}

/// Counters for monitoring.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeStats {
    pub requests: u64,
    pub requests_failed: u64,
    pub in_flight: usize,
    pub traces_recorded: u64,
    pub feedback_received: u64,
    /// Rewarded traces not yet trained on.
    pub feedback_pending: usize,
    pub learn_steps: u64,
    pub learn_steps_applied: u64,
    pub last_reward_mean: Option<f64>,
    pub learning_running: bool,
    pub kv_budget_tokens: usize,
    pub prompt_tokens_prefilled: u64,
    pub generated_tokens: u64,
    pub kv_reserved: usize,
    pub running_requests: usize,
    pub waiting_requests: usize,
    pub uptime_seconds: f64,
}

/// What the background learner is doing.
#[derive(Debug, Clone, Serialize)]
pub struct LearningStatus {
    pub running: bool,
    pub steps: u64,
    pub applied: u64,
    pub adapter: String,
    pub adapter_version: u64,
    pub pending: usize,
    pub min_traces: usize,
    pub last: Option<StepReport>,
    pub last_error: Option<String>,
}

/// A finished trace kept for feedback.
struct TraceRecord {
    request: u64,
    prompt: Arc<Vec<u32>>,
    completion: Vec<u32>,
    decode_logprobs: Vec<f32>,
    adapter_version: u64,
    reward: Option<f64>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    requests_failed: AtomicU64,
    traces: AtomicU64,
    feedback: AtomicU64,
}

struct LearnState {
    trainer: Trainer,
    steps: u64,
    applied: u64,
    last: Option<StepReport>,
    last_error: Option<String>,
}

struct Background {
    stop: bool,
    min_traces: usize,
    thread: Option<JoinHandle<()>>,
}

struct Inner {
    engine: Engine,
    config: RuntimeConfig,
    default_adapter: RwLock<Option<String>>,
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

/// The shared runtime. Every method takes `&self` and may be called from any thread.
pub struct Runtime {
    inner: Arc<Inner>,
}

impl Runtime {
    /// Loads the model, starts the engine loop and creates the learning adapter.
    pub fn new(config: RuntimeConfig) -> Result<Self> {
        let options = LoadOptions {
            device: Device::Cpu,
            format: if config.dense {
                WeightFormat::Dense
            } else {
                WeightFormat::Quantized
            },
            dense_rows: config.dense_rows,
            ..LoadOptions::default()
        };
        let model = Model::load(&config.model, &options)?;
        Self::with_model(Arc::new(model), config)
    }

    /// A runtime over an already loaded model (`config.model` is then only a label).
    pub fn with_model(model: Arc<Model>, config: RuntimeConfig) -> Result<Self> {
        if config.learn_adapter.is_empty() || config.learn_adapter == BASE_ADAPTER {
            return Err(Error::InvalidArgument(format!(
                "learn_adapter must be a name other than '{BASE_ADAPTER}'"
            )));
        }
        if config.max_queued_requests == 0 || config.trace_capacity == 0 {
            return Err(Error::InvalidArgument(
                "max_queued_requests and trace_capacity must be positive".into(),
            ));
        }
        let spec = config.lora.spec()?;
        let t = &model.transformer;
        let adapter = Arc::new(LoraAdapter::new(t.config(), spec, t.dtype(), t.device())?);
        let engine = Engine::new(model, config.engine())?;
        engine.register_adapter(config.learn_adapter.clone(), adapter.clone());
        let default_adapter = config
            .serve_learn_adapter
            .then(|| config.learn_adapter.clone());
        let mut verifiers: HashMap<String, Arc<dyn Verifier>> = HashMap::new();
        verifiers.insert("math".into(), Arc::new(MathVerifier));
        verifiers.insert("exact".into(), Arc::new(ExactMatch::default()));
        verifiers.insert("choice".into(), Arc::new(ChoiceVerifier));
        let trainer = Trainer::new(adapter, config.train.clone());
        let background = Background {
            stop: true,
            min_traces: config.learn_min_traces.max(1),
            thread: None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                default_adapter: RwLock::new(default_adapter),
                verifiers: RwLock::new(verifiers),
                traces: Mutex::new(BTreeMap::new()),
                feedback_signal: Condvar::new(),
                next_trace: AtomicU64::new(1),
                in_flight: AtomicUsize::new(0),
                learn: Mutex::new(LearnState {
                    trainer,
                    steps: 0,
                    applied: 0,
                    last: None,
                    last_error: None,
                }),
                background: Mutex::new(background),
                counters: Counters::default(),
                started: Instant::now(),
                config,
            }),
        })
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }
    pub fn model(&self) -> &Arc<Model> {
        self.inner.engine.model()
    }
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }
    /// A short name of the model (its file or folder name).
    pub fn model_name(&self) -> String {
        model_name(&self.inner.engine.model().path)
    }

    /// Starts a request; stream it or wait for its result.
    pub fn submit(&self, request: GenerateRequest) -> Result<Generation> {
        let inner = &self.inner;
        let queued = inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let slot = QueueSlot(inner.clone());
        if queued >= inner.config.max_queued_requests {
            inner
                .counters
                .requests_failed
                .fetch_add(1, Ordering::Relaxed);
            return Err(Error::Busy(format!(
                "{queued} requests are in flight (limit {})",
                inner.config.max_queued_requests
            )));
        }
        let prepared = self.prepare(request);
        let (engine_request, prompt, selection, verify) = match prepared {
            Ok(p) => p,
            Err(e) => {
                inner
                    .counters
                    .requests_failed
                    .fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        inner.counters.requests.fetch_add(1, Ordering::Relaxed);
        let adapter = engine_request.adapter.clone();
        Ok(Generation {
            handle: inner.engine.submit(engine_request),
            prompt,
            adapter,
            selection,
            verify,
            runtime: inner.clone(),
            _slot: slot,
        })
    }

    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        request: GenerateRequest,
    ) -> Result<(
        Request,
        Arc<Vec<u32>>,
        Option<SelectionRule>,
        Option<(Arc<dyn Verifier>, String)>,
    )> {
        let GenerateRequest {
            mut request,
            selection,
            verify,
        } = request;
        request.validate()?;
        request.adapter = self.resolve_adapter(request.adapter.as_deref())?;
        let prompt = prompt_tokens(self.model(), &request.prompt)?;
        request.prompt = Prompt::Tokens(prompt.clone());
        let verify = match verify {
            Some((name, reference)) => Some((self.verifier(&name)?, reference)),
            None => None,
        };
        Ok((request, Arc::new(prompt), selection, verify))
    }

    /// Runs a request to the end (blocking; not from inside an async runtime).
    pub fn generate(&self, request: GenerateRequest) -> Result<GenerateResult> {
        self.submit(request)?.blocking_result()
    }

    /// `None` → the default adapter; "base" → none; else a registered id.
    fn resolve_adapter(&self, requested: Option<&str>) -> Result<Option<String>> {
        match requested {
            None => Ok(self.inner.default_adapter.read().clone()),
            Some(BASE_ADAPTER) => Ok(None),
            Some(id) => match self.inner.engine.adapter(id) {
                Some(_) => Ok(Some(id.to_string())),
                None => Err(Error::NotFound(format!("no adapter '{id}' is loaded"))),
            },
        }
    }

    fn verifier(&self, name: &str) -> Result<Arc<dyn Verifier>> {
        self.inner
            .verifiers
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| {
                let mut known: Vec<String> = self.inner.verifiers.read().keys().cloned().collect();
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

    /// Records a reward in [0, 1]-ish (any finite value) for a finished trace.
    pub fn feedback(&self, trace_id: u64, reward: f64) -> Result<()> {
        if !reward.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "reward must be a finite number, got {reward}"
            )));
        }
        let mut traces = self.inner.traces.lock();
        let record = traces.get_mut(&trace_id).ok_or_else(|| {
            Error::NotFound(format!(
                "trace {trace_id} is unknown, already trained on, or was forgotten (the runtime keeps the last {} traces)",
                self.inner.config.trace_capacity
            ))
        })?;
        record.reward = Some(reward);
        drop(traces);
        self.inner.counters.feedback.fetch_add(1, Ordering::Relaxed);
        self.inner.feedback_signal.notify_all();
        Ok(())
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

    /// Starts learning in the background: a step whenever `min_traces` rewarded traces are
    /// pending (the config's `learn_min_traces` when `None`). Idempotent.
    pub fn start_learning(&self, min_traces: Option<usize>) -> Result<()> {
        let mut bg = self.inner.background.lock();
        if let Some(n) = min_traces {
            if n == 0 {
                return Err(Error::InvalidArgument(
                    "min_traces must be at least 1".into(),
                ));
            }
            bg.min_traces = n;
        }
        if bg.thread.is_some() {
            return Ok(());
        }
        bg.stop = false;
        let inner = self.inner.clone();
        let thread = std::thread::Builder::new()
            .name("verity-learn".into())
            .spawn(move || inner.background_loop())
            .map_err(|e| Error::InvalidArgument(format!("cannot start the learner: {e}")))?;
        bg.thread = Some(thread);
        Ok(())
    }

    /// Stops the background learner after its current step.
    pub fn stop_learning(&self) {
        let thread = {
            let mut bg = self.inner.background.lock();
            bg.stop = true;
            bg.thread.take()
        };
        self.inner.feedback_signal.notify_all();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    pub fn learning_status(&self) -> LearningStatus {
        let (running, min_traces) = {
            let bg = self.inner.background.lock();
            (bg.thread.is_some(), bg.min_traces)
        };
        let learn = self.inner.learn.lock();
        LearningStatus {
            running,
            steps: learn.steps,
            applied: learn.applied,
            adapter: self.inner.config.learn_adapter.clone(),
            adapter_version: learn.trainer.adapter.version(),
            pending: self.feedback_pending(),
            min_traces,
            last: learn.last.clone(),
            last_error: learn.last_error.clone(),
        }
    }

    /// Every loaded adapter.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        let default = self.inner.default_adapter.read().clone();
        let mut list: Vec<AdapterInfo> = self
            .inner
            .engine
            .adapter_ids()
            .into_iter()
            .filter_map(|id| {
                let a = self.inner.engine.adapter(&id)?;
                Some(AdapterInfo {
                    learning: id == self.inner.config.learn_adapter,
                    default: default.as_deref() == Some(id.as_str()),
                    version: a.version(),
                    rank: a.spec.rank,
                    alpha: a.spec.alpha,
                    targets: a
                        .spec
                        .targets
                        .iter()
                        .map(|t| t.module_name().to_string())
                        .collect(),
                    id,
                })
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// The version of a loaded adapter.
    pub fn adapter_version(&self, id: &str) -> Result<u64> {
        self.inner
            .engine
            .adapter(id)
            .map(|a| a.version())
            .ok_or_else(|| Error::NotFound(format!("no adapter '{id}' is loaded")))
    }

    /// Loads a PEFT adapter folder under `id` (replacing one of that id). Loading into the
    /// learning adapter's id makes the trainer continue from it with a fresh optimizer.
    pub fn adapter_load(&self, id: &str, dir: &Path) -> Result<()> {
        check_adapter_id(id)?;
        let t = &self.model().transformer;
        let adapter = Arc::new(load_peft(dir, t.config(), t.dtype(), t.device())?);
        if id == self.inner.config.learn_adapter {
            let mut learn = self.inner.learn.lock();
            learn.trainer = Trainer::new(adapter.clone(), self.inner.config.train.clone());
        }
        self.inner.engine.register_adapter(id, adapter);
        Ok(())
    }

    /// Saves adapter `id` as a new version under `root` (or the config's `adapter_dir`):
    /// `root/id/vN` in PEFT format. Returns the folder written.
    pub fn adapter_save(&self, id: &str, root: Option<&Path>) -> Result<PathBuf> {
        let adapter = self
            .inner
            .engine
            .adapter(id)
            .ok_or_else(|| Error::NotFound(format!("no adapter '{id}' is loaded")))?;
        let root = root
            .map(Path::to_path_buf)
            .or_else(|| self.inner.config.adapter_dir.clone())
            .ok_or_else(|| {
                Error::InvalidArgument(
                    "no folder given to save into and no adapter_dir configured".into(),
                )
            })?;
        let _vars_guard = adapter.vars_guard();
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
        let resolved = match id {
            None | Some(BASE_ADAPTER) => None,
            Some(id) => self.resolve_adapter(Some(id))?,
        };
        *self.inner.default_adapter.write() = resolved;
        Ok(())
    }

    /// The adapter of requests that name none (`None`: the base model).
    pub fn default_adapter(&self) -> Option<String> {
        self.inner.default_adapter.read().clone()
    }

    /// Unloads an adapter (not the learning one).
    pub fn adapter_remove(&self, id: &str) -> Result<()> {
        if id == self.inner.config.learn_adapter {
            return Err(Error::InvalidArgument(format!(
                "'{id}' is the learning adapter and cannot be removed"
            )));
        }
        self.inner
            .engine
            .remove_adapter(id)
            .ok_or_else(|| Error::NotFound(format!("no adapter '{id}' is loaded")))?;
        let mut default = self.inner.default_adapter.write();
        if default.as_deref() == Some(id) {
            *default = None;
        }
        Ok(())
    }

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

    /// Stops background learning and the engine loop; requests still running end with an
    /// error. Called by drop as well.
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

fn check_adapter_id(id: &str) -> Result<()> {
    let plain = !id.is_empty()
        && id != BASE_ADAPTER
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && id != "."
        && id != "..";
    if plain {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "adapter id '{id}' must be letters, digits, '-', '_' or '.', and not '{BASE_ADAPTER}'"
        )))
    }
}

fn pending(traces: &BTreeMap<u64, TraceRecord>) -> usize {
    traces.values().filter(|t| t.reward.is_some()).count()
}

/// The scores every result carries, by name.
const RESULT_SCORES: [TraceScore; 4] = [
    TraceScore::MeanSelfCertainty,
    TraceScore::MeanLogprob,
    TraceScore::NegMeanEntropy,
    TraceScore::LowestGroup { window: 16 },
];

impl Inner {
    fn finish(
        &self,
        request_id: u64,
        prompt: &Arc<Vec<u32>>,
        adapter: Option<String>,
        selection: Option<SelectionRule>,
        verify: Option<(Arc<dyn Verifier>, String)>,
        completion: Completion,
    ) -> GenerateResult {
        let mut wanted: Vec<TraceScore> = RESULT_SCORES.to_vec();
        if let Some(rule) = &selection {
            wanted.extend(rule.required_scores());
        }
        wanted.sort();
        wanted.dedup();
        let candidates: Vec<Candidate> = completion
            .traces
            .iter()
            .map(|t| {
                let view = TraceView {
                    text: &t.text,
                    stats: &t.stats,
                    token_end: &t.token_end,
                };
                Candidate::from_trace(&view, &wanted)
            })
            .collect();
        let chosen = selection.as_ref().map(|rule| select(rule, &candidates));
        let first_id = self
            .next_trace
            .fetch_add(completion.traces.len() as u64, Ordering::Relaxed);
        let mut traces = Vec::with_capacity(completion.traces.len());
        let mut records = Vec::with_capacity(completion.traces.len());
        for (i, (trace, candidate)) in completion.traces.into_iter().zip(&candidates).enumerate() {
            let id = first_id + i as u64;
            let reward = verify
                .as_ref()
                .map(|(v, reference)| v.verify(&trace.text, reference).reward);
            if !trace.tokens.is_empty() {
                records.push((
                    id,
                    TraceRecord {
                        request: request_id,
                        prompt: prompt.clone(),
                        completion: trace.tokens.clone(),
                        decode_logprobs: trace.stats.iter().map(|s| s.logprob).collect(),
                        adapter_version: trace.adapter_version,
                        reward: reward.filter(|r| r.is_finite()),
                    },
                ));
            }
            traces.push(GeneratedTrace {
                id,
                answer: candidate.answer.as_ref().map(|a| a.to_string()),
                scores: candidate
                    .scores
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
                reward,
                trace,
            });
        }
        self.remember(records);
        let (selected, answer, votes) = match chosen {
            Some(s) => (
                s.chosen,
                s.answer.map(|a| a.to_string()),
                s.votes
                    .into_iter()
                    .map(|v| Vote {
                        answer: v.answer.to_string(),
                        weight: v.weight,
                        count: v.count,
                    })
                    .collect(),
            ),
            None => (None, None, Vec::new()),
        };
        GenerateResult {
            request_id,
            prompt_tokens: completion.prompt_tokens,
            adapter,
            traces,
            selection: selection.map(|r| r.to_string()),
            selected,
            answer,
            votes,
        }
    }

    fn remember(&self, records: Vec<(u64, TraceRecord)>) {
        let rewarded = records.iter().any(|(_, r)| r.reward.is_some());
        let mut store = self.traces.lock();
        self.counters
            .traces
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        store.extend(records);
        while store.len() > self.config.trace_capacity {
            store.pop_first();
        }
        drop(store);
        if rewarded {
            self.feedback_signal.notify_all();
        }
    }

    fn learn_step(&self) -> Result<StepReport> {
        let mut learn = self.learn.lock();
        // Take the rewarded traces out of the store: each is trained on once.
        let taken: Vec<TraceRecord> = {
            let mut store = self.traces.lock();
            let ids: Vec<u64> = store
                .iter()
                .filter(|(_, t)| t.reward.is_some())
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter().filter_map(|id| store.remove(&id)).collect()
        };
        learn.steps += 1;
        if taken.is_empty() {
            let report = StepReport {
                step: learn.steps,
                version: learn.trainer.adapter.version(),
                skipped: Some("no rewarded traces are pending".into()),
                ..StepReport::default()
            };
            learn.last = Some(report.clone());
            return Ok(report);
        }
        let rollouts = group_rollouts(taken);
        let model = self.engine.model().clone();
        match learn.trainer.step(&model.transformer, &rollouts) {
            Ok(report) => {
                learn.applied += report.applied as u64;
                learn.last = Some(report.clone());
                learn.last_error = None;
                Ok(report)
            }
            Err(e) => {
                learn.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn background_loop(self: Arc<Self>) {
        loop {
            {
                let mut store = self.traces.lock();
                loop {
                    let (stop, min) = {
                        let bg = self.background.lock();
                        (bg.stop, bg.min_traces)
                    };
                    if stop {
                        return;
                    }
                    if pending(&store) >= min {
                        break;
                    }
                    self.feedback_signal
                        .wait_for(&mut store, Duration::from_millis(500));
                }
            }
            // Errors are kept in the learning status; the loop goes on with new feedback.
            let _ = self.learn_step();
        }
    }
}

/// Rollouts grouped by request; rewarded traces alone in their request share one pool.
fn group_rollouts(records: Vec<TraceRecord>) -> Vec<Rollout> {
    let mut per_request: BTreeMap<u64, Vec<TraceRecord>> = BTreeMap::new();
    for r in records {
        per_request.entry(r.request).or_default().push(r);
    }
    let mut rollouts = Vec::new();
    let mut pool = Vec::new();
    let mut group = 0;
    for (_, records) in per_request {
        if records.len() == 1 {
            pool.extend(records);
            continue;
        }
        rollouts.extend(records.into_iter().map(|r| rollout(r, group)));
        group += 1;
    }
    rollouts.extend(pool.into_iter().map(|r| rollout(r, group)));
    rollouts
}

fn rollout(r: TraceRecord, group: usize) -> Rollout {
    Rollout {
        group,
        prompt: r.prompt.as_ref().clone(),
        completion: r.completion,
        decode_logprobs: r.decode_logprobs,
        adapter_version: r.adapter_version,
        reward: r.reward.unwrap_or(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(request: u64, reward: f64) -> TraceRecord {
        TraceRecord {
            request,
            prompt: Arc::new(vec![1, 2]),
            completion: vec![3],
            decode_logprobs: vec![-0.5],
            adapter_version: 0,
            reward: Some(reward),
        }
    }

    #[test]
    fn rollouts_group_by_request_and_pool_singletons() {
        let records = vec![
            record(7, 1.0),
            record(7, 0.0),
            record(9, 1.0),
            record(11, 0.5),
            record(12, 0.0),
            record(12, 1.0),
            record(12, 1.0),
        ];
        let rollouts = group_rollouts(records);
        let groups: Vec<(usize, f64)> = rollouts.iter().map(|r| (r.group, r.reward)).collect();
        assert_eq!(
            groups,
            vec![
                (0, 1.0),
                (0, 0.0),
                (1, 0.0),
                (1, 1.0),
                (1, 1.0),
                (2, 1.0),
                (2, 0.5)
            ]
        );
    }

    #[test]
    fn adapter_ids_are_plain() {
        for ok in ["learned", "a-b_c.1"] {
            assert!(check_adapter_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "base", "..", "a/b", "a b", "ü"] {
            assert!(check_adapter_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_files_parse_and_reject_unknown_fields() {
        let dir = std::env::temp_dir().join(format!("verity-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let toml_path = dir.join("rt.toml");
        std::fs::write(
            &toml_path,
            "model = \"m.gguf\"\nmax_batch = 8\n[lora]\nrank = 4\ntargets = [\"q_proj\"]\n",
        )
        .unwrap();
        let c = RuntimeConfig::from_file(&toml_path).unwrap();
        assert_eq!(c.model, PathBuf::from("m.gguf"));
        assert_eq!(c.max_batch, 8);
        assert_eq!(c.lora.rank, 4);
        assert_eq!(c.lora.spec().unwrap().targets, vec![LoraTarget::Q]);
        assert_eq!(c.trace_capacity, RuntimeConfig::default().trace_capacity);
        let json_path = dir.join("rt.json");
        std::fs::write(&json_path, r#"{"model": "x", "max_bacth": 3}"#).unwrap();
        let err = RuntimeConfig::from_file(&json_path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_bacth"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
