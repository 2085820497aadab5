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

mod request;
mod stop;

pub use request::{
    Completion, EarlyStop, Event, FinishReason, Penalties, Prompt, Request, Trace, TraceMonitor,
};
pub use stop::StopMatcher;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::{Error, Result};
use crate::model::{LoraAdapter, Model, SeqKv, StepInput};
use crate::sampling::{sample, Rng};
use crate::stats::{token_stats, TokenStats, DEFAULT_TOP_K};
use crate::tokenizer::Utf8Buffer;

/// Engine limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// KV positions all running sequences may hold together (shared prefixes once).
    pub kv_budget_tokens: usize,
    /// Most samples decoded in one step.
    pub max_batch: usize,
    /// Most prompt tokens prefilled in one step (longer prompts are chunked).
    pub prefill_chunk: usize,
    /// k of the top-k confidence.
    pub confidence_top_k: usize,
    /// Compute per-token statistics (off only to measure what they cost).
    pub token_stats: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kv_budget_tokens: 64 * 1024,
            max_batch: 64,
            prefill_chunk: 512,
            confidence_top_k: DEFAULT_TOP_K,
            token_stats: true,
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
    /// KV positions reserved by admitted requests now, and the most ever.
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

enum Command {
    Submit(Box<Waiting>),
    Abort(u64),
    Shutdown,
}

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
pub fn prompt_tokens(model: &Model, prompt: &Prompt) -> Result<Vec<u32>> {
    Ok(match prompt {
        Prompt::Text(t) => model.tokenizer.encode(t, true)?,
        Prompt::Tokens(ids) => ids.clone(),
        Prompt::Chat(messages) => {
            let text = model.tokenizer.apply_chat_template(messages, true)?;
            model.tokenizer.encode(&text, true)?
        }
    })
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
    let need = prompt.len() + request.n * max_tokens;
    let budget = shared.config.kv_budget_tokens;
    if need > budget {
        return Err(Error::InvalidArgument(format!(
            "the request needs {need} KV positions ({} prompt + {} samples × {max_tokens}) but the engine's budget is {budget}",
            prompt.len(),
            request.n
        )));
    }
    if request.n > shared.config.max_batch {
        return Err(Error::InvalidArgument(format!(
            "n = {} exceeds the engine's batch limit of {}",
            request.n, shared.config.max_batch
        )));
    }
    Ok((prompt, max_tokens, need))
}

/// One sample of a running request.
struct Sample {
    index: usize,
    kv: SeqKv,
    rng: Rng,
    last_token: u32,
    trace: Trace,
    utf8: Utf8Buffer,
    stop: StopMatcher,
    monitor: Option<Box<dyn TraceMonitor>>,
    counts: HashMap<u32, u32>,
    done: bool,
}

/// An admitted request.
struct Active {
    id: u64,
    request: Box<Request>,
    events: UnboundedSender<Event>,
    prompt: Vec<u32>,
    max_tokens: usize,
    prefilled: usize,
    prompt_kv: Option<SeqKv>,
    adapter: Option<Arc<LoraAdapter>>,
    samples: Vec<Sample>,
    reserved: usize,
    /// The caller is gone or asked to stop.
    cancelled: bool,
}

struct Waiting {
    id: u64,
    request: Box<Request>,
    adapter: Option<Arc<LoraAdapter>>,
    events: UnboundedSender<Event>,
    prompt: Vec<u32>,
    max_tokens: usize,
    need: usize,
}

/// Where a logits row goes.
enum RowOwner {
    Prefill(usize),
    Sample(usize, usize),
}

struct Scheduler {
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    waiting: VecDeque<Waiting>,
    active: Vec<Active>,
    reserved: usize,
}

impl Scheduler {
    fn new(shared: Arc<Shared>, commands: mpsc::Receiver<Command>) -> Self {
        Self {
            shared,
            commands,
            waiting: VecDeque::new(),
            active: Vec::new(),
            reserved: 0,
        }
    }

    fn run(mut self) {
        loop {
            // Block only when there is nothing to do.
            let idle = self.active.is_empty() && self.waiting.is_empty();
            let first = if idle {
                match self.commands.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            } else {
                None
            };
            let pending: Vec<Command> = first.into_iter().chain(self.commands.try_iter()).collect();
            for command in pending {
                match command {
                    Command::Submit(waiting) => self.waiting.push_back(*waiting),
                    Command::Abort(id) => self.abort(id),
                    Command::Shutdown => {
                        for a in self
                            .active
                            .drain(..)
                            .map(|a| a.events)
                            .chain(self.waiting.drain(..).map(|w| w.events))
                        {
                            let _ = a.send(Event::Error(Error::Unavailable(
                                "the engine shut down before the request finished".into(),
                            )));
                        }
                        return;
                    }
                }
            }
            self.admit();
            if !self.active.is_empty() {
                if let Err(e) = self.step() {
                    // A failed step fails the requests in it, never the engine.
                    for a in self.active.drain(..) {
                        let _ = a.events.send(Event::Error(Error::Internal(format!(
                            "decode step failed: {e}"
                        ))));
                    }
                    self.reserved = 0;
                }
            }
            self.publish_stats();
        }
    }

    fn publish_stats(&self) {
        let mut s = self.shared.stats.lock();
        s.kv_reserved = self.reserved;
        s.kv_peak = s.kv_peak.max(self.reserved);
        s.running_requests = self.active.len();
        s.waiting_requests = self.waiting.len();
    }

    /// Admits waiting requests in order while they fit the budget and the batch.
    fn admit(&mut self) {
        let budget = self.shared.config.kv_budget_tokens;
        let max_batch = self.shared.config.max_batch;
        while let Some(front) = self.waiting.front() {
            let running: usize = self.active.iter().map(|a| a.request.n).sum();
            if front.events.is_closed() {
                self.waiting.pop_front();
                continue;
            }
            if self.reserved + front.need > budget || running + front.request.n > max_batch {
                break;
            }
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            let mut prompt_kv = self.shared.model.transformer.new_kv();
            if let Err(e) = prompt_kv.reserve(w.prompt.len()) {
                let _ = w.events.send(Event::Error(e));
                continue;
            }
            self.reserved += w.need;
            self.active.push(Active {
                id: w.id,
                request: w.request,
                events: w.events,
                prompt: w.prompt,
                max_tokens: w.max_tokens,
                prefilled: 0,
                prompt_kv: Some(prompt_kv),
                adapter: w.adapter,
                samples: Vec::new(),
                reserved: w.need,
                cancelled: false,
            });
        }
    }

    fn abort(&mut self, id: u64) {
        if let Some(pos) = self.waiting.iter().position(|w| w.id == id) {
            if let Some(w) = self.waiting.remove(pos) {
                let _ = w.events.send(Event::Done(Completion {
                    prompt_tokens: w.prompt.len(),
                    traces: Vec::new(),
                }));
            }
        }
        if let Some(a) = self.active.iter_mut().find(|a| a.id == id) {
            a.cancelled = true;
        }
        self.retire();
    }

    /// One forward step for every running sample and one prompt chunk budget.
    fn step(&mut self) -> Result<()> {
        #[cfg(feature = "test-hooks")]
        if self
            .shared
            .fail_steps
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(Error::Internal(
                "a decode step failed (forced by a test)".into(),
            ));
        }
        let config = &self.shared.config;
        let mut chunk_left = config.prefill_chunk;
        let mut batch_left = config.max_batch;
        let mut owners = Vec::new();
        let mut inputs: Vec<StepInput<'_>> = Vec::new();
        let mut rows_per_input = Vec::new();
        for (ai, a) in self.active.iter_mut().enumerate() {
            let Active {
                prompt,
                prefilled,
                prompt_kv,
                adapter,
                samples,
                ..
            } = a;
            let adapter = adapter.as_deref();
            if let Some(kv) = prompt_kv.as_mut() {
                if chunk_left == 0 {
                    continue;
                }
                let end = (*prefilled + chunk_left).min(prompt.len());
                chunk_left -= end - *prefilled;
                inputs.push(StepInput {
                    tokens: &prompt[*prefilled..end],
                    kv,
                    adapter,
                    all_logits: false,
                });
                owners.push(RowOwner::Prefill(ai));
                rows_per_input.push(end - *prefilled);
                continue;
            }
            for (si, s) in samples.iter_mut().enumerate() {
                if s.done || batch_left == 0 {
                    continue;
                }
                batch_left -= 1;
                let Sample { last_token, kv, .. } = s;
                inputs.push(StepInput {
                    tokens: std::slice::from_ref(last_token),
                    kv,
                    adapter,
                    all_logits: false,
                });
                owners.push(RowOwner::Sample(ai, si));
                rows_per_input.push(1);
            }
        }
        if inputs.is_empty() {
            return Ok(());
        }
        // Each adapter's weights are read from one snapshot for the whole step, so an update
        // published meanwhile shows from the next step on, never halfway.
        let logits = self.shared.model.transformer.forward_step(&mut inputs)?;
        drop(inputs);
        let (rows, vocab) = logits.dims2()?;
        let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        debug_assert_eq!(rows, owners.len());
        let mut prefilled_tokens = 0u64;
        let mut generated = 0u64;
        for (r, (owner, n)) in owners.iter().zip(&rows_per_input).enumerate() {
            let row = &flat[r * vocab..(r + 1) * vocab];
            match *owner {
                RowOwner::Prefill(ai) => {
                    prefilled_tokens += *n as u64;
                    let a = &mut self.active[ai];
                    a.prefilled += n;
                    if a.prefilled == a.prompt.len() {
                        self.start_samples(ai)?;
                        let a = &mut self.active[ai];
                        for si in 0..a.samples.len() {
                            generated += 1;
                            Self::advance(&self.shared, a, si, row);
                        }
                    }
                }
                RowOwner::Sample(ai, si) => {
                    generated += 1;
                    Self::advance(&self.shared, &mut self.active[ai], si, row);
                }
            }
        }
        {
            let mut s = self.shared.stats.lock();
            s.steps += 1;
            s.prompt_tokens_prefilled += prefilled_tokens;
            s.generated_tokens += generated;
        }
        self.retire();
        Ok(())
    }

    /// The prompt is in the KV: fork it once per sample (shared, not copied).
    fn start_samples(&mut self, ai: usize) -> Result<()> {
        let a = &mut self.active[ai];
        let Some(mut parent) = a.prompt_kv.take() else {
            return Ok(());
        };
        for i in 0..a.request.n {
            let mut kv = parent.fork()?;
            kv.reserve(a.max_tokens)?;
            a.samples.push(Sample {
                index: i,
                kv,
                rng: Rng::new(a.request.sampling.seed.wrapping_add(i as u64)),
                last_token: 0,
                trace: Trace {
                    index: i,
                    tokens: Vec::new(),
                    text: String::new(),
                    stats: Vec::new(),
                    token_end: Vec::new(),
                    top_logprobs: Vec::new(),
                    finish: FinishReason::Length,
                    adapter_version: a.adapter.as_ref().map(|x| x.version()).unwrap_or(0),
                },
                utf8: Utf8Buffer::default(),
                stop: StopMatcher::new(&a.request.stop),
                monitor: a.request.early_stop.as_ref().map(|make| make(i)),
                counts: HashMap::new(),
                done: false,
            });
        }
        Ok(())
    }

    /// Samples the next token of one sample from its logits row and streams it.
    fn advance(shared: &Shared, a: &mut Active, si: usize, row: &[f32]) {
        let request = &a.request;
        let s = &mut a.samples[si];
        let tokenizer = &shared.model.tokenizer;
        let token = if request.penalties.is_noop() {
            sample(row, &request.sampling, &mut s.rng)
        } else {
            let adjusted = apply_penalties(row, &request.penalties, &s.counts);
            sample(&adjusted, &request.sampling, &mut s.rng)
        };
        let stats = if shared.config.token_stats {
            token_stats(row, token, shared.config.confidence_top_k)
        } else {
            TokenStats::default()
        };
        *s.counts.entry(token).or_default() += 1;
        s.trace.tokens.push(token);
        s.trace.stats.push(stats);
        if request.top_logprobs > 0 {
            s.trace
                .top_logprobs
                .push(top_logprobs(row, request.top_logprobs));
        }
        let is_stop_token = (!request.ignore_eos && tokenizer.is_eog(token))
            || request.stop_tokens.contains(&token);
        let (delta, hit_stop) = if is_stop_token {
            (String::new(), false)
        } else if tokenizer.is_control(token) {
            s.stop.push("")
        } else {
            let piece = s.utf8.push(tokenizer.token_bytes(token));
            s.stop.push(&piece)
        };
        s.trace.token_end.push(s.stop.text().len());
        let mut finish = None;
        if is_stop_token || hit_stop {
            finish = Some(FinishReason::Stop);
        } else if s
            .monitor
            .as_mut()
            .map(|m| m.observe(&stats))
            .unwrap_or(false)
        {
            finish = Some(FinishReason::AbortedLowConfidence);
        } else if s.trace.tokens.len() >= a.max_tokens {
            finish = Some(FinishReason::Length);
        }
        let mut text = delta;
        if finish.is_some() && !hit_stop {
            let tail = s.utf8.finish();
            let (more, _) = s.stop.push(&tail);
            text.push_str(&more);
            text.push_str(&s.stop.finish());
        }
        let sent = a.events.send(Event::Token {
            index: s.index,
            token,
            text,
            stats,
        });
        if sent.is_err() {
            a.cancelled = true;
        }
        s.last_token = token;
        if let Some(reason) = finish {
            s.done = true;
            s.trace.finish = reason;
            s.trace.text = s.stop.text().to_string();
            let len = s.trace.text.len();
            s.trace
                .token_end
                .iter_mut()
                .for_each(|e| *e = (*e).min(len));
            // Free this sample's KV now; the shared prompt goes with the last sample.
            s.kv = shared.model.transformer.new_kv();
        }
    }

    /// Removes finished or cancelled requests, sends their traces, frees their budget.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            let a = &self.active[i];
            let finished = a.prompt_kv.is_none() && a.samples.iter().all(|s| s.done);
            if !(finished || a.cancelled) {
                i += 1;
                continue;
            }
            let a = self.active.swap_remove(i);
            self.reserved -= a.reserved;
            // Publish before the caller hears it is done, so what it reads next is current.
            self.shared.stats.lock().requests_finished += 1;
            self.publish_stats();
            let traces = a
                .samples
                .into_iter()
                .map(|mut s| {
                    if !s.done {
                        s.trace.finish = FinishReason::Aborted;
                        s.trace.text = s.stop.text().to_string();
                    }
                    s.trace
                })
                .collect();
            let _ = a.events.send(Event::Done(Completion {
                prompt_tokens: a.prompt.len(),
                traces,
            }));
        }
    }
}

/// The row after repetition/frequency/presence penalties and logit bias.
fn apply_penalties(row: &[f32], p: &Penalties, counts: &HashMap<u32, u32>) -> Vec<f32> {
    let mut out = row.to_vec();
    for (&id, &count) in counts {
        let Some(z) = out.get_mut(id as usize) else {
            continue;
        };
        if p.repetition > 0.0 && p.repetition != 1.0 {
            *z = if *z > 0.0 {
                *z / p.repetition
            } else {
                *z * p.repetition
            };
        }
        *z -= p.frequency * count as f32 + p.presence;
    }
    for (&id, &bias) in &p.logit_bias {
        if let Some(z) = out.get_mut(id as usize) {
            *z += bias;
        }
    }
    out
}

/// The `k` most likely tokens with their log-probs, most likely first.
fn top_logprobs(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64
        + row
            .iter()
            .map(|&z| ((z - max) as f64).exp())
            .sum::<f64>()
            .ln();
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    let k = k.min(row.len());
    idx.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    idx.truncate(k);
    idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    idx.into_iter()
        .map(|i| (i, (row[i as usize] as f64 - lse) as f32))
        .collect()
}
