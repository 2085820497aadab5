//! The batched engine: continuous batching over a fixed KV budget, the prompt of an
//! n-sample request prefilled once and its KV shared by the samples, seeded sampling,
//! and per-token statistics from the logits of the step that produced each token.
//!
//! The engine runs its loop on its own thread. Each step it admits waiting requests that
//! fit the budget, gives every running sample one token and at most `prefill_chunk` prompt
//! tokens to prefilling requests, runs one `forward_step` for all of them, samples, and
//! streams events. Finished samples free their KV at once.
//!
//! Budget accounting reserves, at admission, `prompt + n · max_tokens` positions per
//! request (shared prefix counted once), so the budget can never be exceeded mid-decode and
//! nothing needs pre-empting; a request that could never fit is refused at once.
//!
//! This module holds the handles callers use ([`Engine`], [`RequestHandle`]), the limits
//! and counters, and the checks a request passes on the caller's thread; the loop on the
//! engine thread is in `scheduler`, the helpers over a logits row in `logits`, the request
//! and event types in `request`, stop-sequence matching in `stop`.

mod logits;
mod prefill;
mod reduce;
mod request;
mod scheduler;
mod stop;

pub use reduce::greedy_stats_on_device;
pub use request::{
    ChatKwargs, Completion, EarlyStop, Event, FinishReason, Penalties, Prompt, Request, Sequential,
    Settled, Trace, TraceMonitor,
};
pub use stop::StopMatcher;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use self::scheduler::{Scheduler, Waiting};
use crate::error::{Error, Result};
use crate::model::{LoraAdapter, Model};
use crate::stats::DEFAULT_TOP_K;

/// Engine limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// KV positions all running sequences may hold together (shared prefixes once).
    pub kv_budget_tokens: usize,
    /// Most samples decoded in one step.
    pub max_batch: usize,
    /// Most prompt tokens prefilled in one step (longer prompts are chunked): a step with a
    /// full chunk is the longest a running sample waits for its next token (256 tokens of
    /// a 135M model take about a second on 2 CPU cores).
    pub prefill_chunk: usize,
    /// k of the top-k confidence.
    pub confidence_top_k: usize,
    /// Compute per-token statistics (off only to measure what they cost).
    pub token_stats: bool,
    /// Where each step's logits are reduced to tokens and statistics. None: on the model's
    /// device when it is a GPU (only a few numbers per row reach the host), on the host
    /// otherwise. `Some(true)` takes the device path on the CPU too, the code path a GPU
    /// takes, so tests on any machine exercise it.
    pub device_reduce: Option<bool>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kv_budget_tokens: 64 * 1024,
            max_batch: 64,
            prefill_chunk: 256,
            confidence_top_k: DEFAULT_TOP_K,
            token_stats: true,
            device_reduce: None,
        }
    }
}

/// Counters, readable while the engine runs.
#[derive(Debug, Clone, Default)]
pub struct EngineStats {
    /// Prompt tokens run through the model (a prompt shared by n samples counts once).
    pub prompt_tokens_prefilled: u64,
    /// Tokens sampled.
    pub generated_tokens: u64,
    /// Forward steps run.
    pub steps: u64,
    /// KV positions reserved by admitted requests now.
    pub kv_reserved: usize,
    /// The most KV positions ever reserved at once.
    pub kv_peak: usize,
    /// Requests admitted and decoding.
    pub running_requests: usize,
    /// Requests queued for KV or batch room.
    pub waiting_requests: usize,
    /// Requests whose traces were sent.
    pub requests_finished: u64,
}

/// What a handle sends the engine thread.
enum Command {
    Submit(Box<Waiting>),
    Abort(u64),
    Shutdown,
    /// Stop (true) or resume (false) admitting and stepping; commands still queue.
    #[cfg(feature = "test-hooks")]
    Hold(bool),
}

/// What the handles and the engine thread share.
struct Shared {
    model: Arc<Model>,
    config: EngineConfig,
    stats: Mutex<EngineStats>,
    /// Decode steps still to fail on purpose (tests of the error paths).
    #[cfg(feature = "test-hooks")]
    fail_steps: std::sync::atomic::AtomicUsize,
}

/// A running engine. Cheap to share behind an `Arc`; every method takes `&self`.
///
/// This is the low-level decoder: it knows prompts, samples and adapters handed to it, not
/// adapter ids, scores or feedback. Applications use [`crate::Runtime`], which owns one.
pub struct Engine {
    shared: Arc<Shared>,
    commands: Mutex<mpsc::Sender<Command>>,
    next_id: AtomicU64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The stream of one request. Dropping it cancels the request and frees its KV.
pub struct RequestHandle {
    /// The engine's id of the request.
    pub id: u64,
    events: UnboundedReceiver<Event>,
    commands: mpsc::Sender<Command>,
}

impl RequestHandle {
    /// The next event; token events first, then one `Done` or `Error`.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
    /// Blocking variant of [`Self::next`]; do not call from inside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.events.blocking_recv()
    }
    /// Cancels the request; its traces end with [`FinishReason::Aborted`].
    pub fn abort(&self) {
        let _ = self.commands.send(Command::Abort(self.id));
    }
    /// Waits for the final traces, skipping token events.
    pub async fn completion(mut self) -> Result<Completion> {
        while let Some(event) = self.next().await {
            if let Some(done) = final_result(event) {
                return done;
            }
        }
        Err(engine_gone())
    }
    /// Blocking variant of [`Self::completion`]; do not call from inside an async runtime.
    pub fn blocking_completion(mut self) -> Result<Completion> {
        while let Some(event) = self.blocking_next() {
            if let Some(done) = final_result(event) {
                return done;
            }
        }
        Err(engine_gone())
    }
}

/// The token ids the engine decodes from for `prompt`: text is encoded with special-token
/// parsing, a conversation is rendered with the model's chat template first.
/// Text that cannot fit the context however it tokenizes is refused before tokenizing.
pub fn prompt_tokens(model: &Model, prompt: &Prompt) -> Result<Vec<u32>> {
    let encode = |text: &str| {
        let context = model.config().max_position_embeddings;
        let at_least = model.tokenizer.tokens_at_least(text);
        if at_least >= context {
            return Err(Error::PromptTooLarge {
                bytes: text.len(),
                at_least,
                context,
            });
        }
        model.tokenizer.encode(text, true)
    };
    // A template that writes the BOS itself (Gemma's, Llama 3's) for a tokenizer that adds
    // one: a single BOS, as transformers gives (it tokenizes renders without adding one) and
    // llama.cpp (it strips the template's).
    let encode_render = |text: &str| -> Result<Vec<u32>> {
        let mut ids = encode(text)?;
        let special = model.tokenizer.special();
        if let (true, Some(bos)) = (special.add_bos, special.bos) {
            if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                ids.remove(0);
            }
        }
        Ok(ids)
    };
    match prompt {
        Prompt::Text(t) => encode(t),
        Prompt::Tokens(ids) => Ok(ids.clone()),
        Prompt::Chat(messages) => {
            encode_render(&model.tokenizer.apply_chat_template(messages, true)?)
        }
        Prompt::ChatWith(messages, kwargs) => encode_render(
            &model
                .tokenizer
                .apply_chat_template_with(messages, true, kwargs)?,
        ),
    }
}

/// The outcome a request's last event carries; None for token events.
fn final_result(event: Event) -> Option<Result<Completion>> {
    match event {
        Event::Done(c) => Some(Ok(c)),
        Event::Error(e) => Some(Err(e)),
        Event::Token { .. } => None,
    }
}

pub(crate) fn engine_gone() -> Error {
    Error::Unavailable("the engine stopped before the request finished".into())
}

impl Engine {
    /// Starts the engine loop on its own thread.
    pub fn new(model: Arc<Model>, config: EngineConfig) -> Result<Self> {
        if config.kv_budget_tokens == 0 || config.max_batch == 0 || config.prefill_chunk == 0 {
            return Err(Error::InvalidArgument(
                "kv_budget_tokens, max_batch and prefill_chunk must be positive".into(),
            ));
        }
        let shared = Arc::new(Shared {
            model,
            config,
            stats: Mutex::new(EngineStats::default()),
            #[cfg(feature = "test-hooks")]
            fail_steps: std::sync::atomic::AtomicUsize::new(0),
        });
        let (tx, rx) = mpsc::channel();
        let loop_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("verity-engine".into())
            .spawn(move || Scheduler::new(loop_shared, rx).run())
            .map_err(|e| Error::Internal(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            shared,
            commands: Mutex::new(tx),
            next_id: AtomicU64::new(1),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The model every request decodes with.
    pub fn model(&self) -> &Arc<Model> {
        &self.shared.model
    }

    /// The limits the engine was started with.
    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Checks and tokenizes a request on the caller's thread (the engine thread only
    /// decodes), then queues it; events arrive on the returned handle. `adapter` is decoded
    /// with at every step (its latest published snapshot). A request that could never run
    /// (bad parameters, too long, over the budget) is refused here.
    pub fn submit(
        &self,
        request: Request,
        adapter: Option<Arc<LoraAdapter>>,
    ) -> Result<RequestHandle> {
        let (prompt, max_tokens, need) = prepare(&self.shared, &request)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = unbounded_channel();
        let commands = self.commands.lock().clone();
        let waiting = Waiting {
            id,
            request: Box::new(request),
            adapter,
            events,
            prompt,
            max_tokens,
            need,
        };
        commands
            .send(Command::Submit(Box::new(waiting)))
            .map_err(|_| Error::Unavailable("the engine has shut down".into()))?;
        Ok(RequestHandle {
            id,
            events: rx,
            commands,
        })
    }

    /// Submits and waits (blocking); do not call from inside an async runtime.
    pub fn generate(
        &self,
        request: Request,
        adapter: Option<Arc<LoraAdapter>>,
    ) -> Result<Completion> {
        self.submit(request, adapter)?.blocking_completion()
    }

    /// Makes the next `steps` decode steps fail, as a broken device would (tests of the
    /// error paths only).
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn fail_next_steps(&self, steps: usize) {
        self.shared.fail_steps.store(steps, Ordering::SeqCst);
    }

    /// Stops admitting and stepping until [`Engine::resume`]; requests submitted meanwhile
    /// wait, so a test can make several arrive at once (tests of the scheduling only).
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn hold(&self) {
        let _ = self.commands.lock().send(Command::Hold(true));
    }

    /// Undoes [`Engine::hold`].
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn resume(&self) {
        let _ = self.commands.lock().send(Command::Hold(false));
    }

    /// Counters since the engine started.
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.lock().clone()
    }

    /// Stops the loop; requests still running end with an error event.
    pub fn shutdown(&self) {
        let _ = self.commands.lock().send(Command::Shutdown);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Checks a request against the model and the limits and tokenizes it: (prompt, max_tokens
/// after the context cap, KV positions it reserves).
fn prepare(shared: &Shared, request: &Request) -> Result<(Vec<u32>, usize, usize)> {
    request.validate()?;
    let model = &shared.model;
    let prompt = prompt_tokens(model, &request.prompt)?;
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt has no tokens".into()));
    }
    let vocab = model.config().vocab_size;
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::InvalidArgument(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let context = model.config().max_position_embeddings;
    if prompt.len() >= context {
        return Err(Error::PromptTooLong {
            tokens: prompt.len(),
            context,
        });
    }
    let max_tokens = request.max_tokens.min(context - prompt.len());
    // Finished samples free their KV, so a sequential request never holds more than
    // its parallel samples' worth.
    let live = request.parallel_samples();
    let need = prompt.len() + live * max_tokens;
    let budget = shared.config.kv_budget_tokens;
    if need > budget {
        return Err(Error::InvalidArgument(format!(
            "the request needs {need} KV positions ({} prompt + {live} samples × {max_tokens}) but the engine's budget is {budget}",
            prompt.len(),
        )));
    }
    if live > shared.config.max_batch {
        return Err(Error::InvalidArgument(format!(
            "{live} samples at once exceed the engine's batch limit of {}",
            shared.config.max_batch
        )));
    }
    Ok((prompt, max_tokens, need))
}
