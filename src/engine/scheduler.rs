//! The engine thread's loop: it takes commands from the handles, admits waiting requests
//! while they fit the KV budget and the batch, runs one `forward_step` per step for every
//! running sample and one prompt chunk, samples and streams each token, and retires finished
//! or cancelled requests, freeing their KV and budget.

mod choose;
use super::prefill::prefill_grants;
use choose::Choice;
use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::mpsc::UnboundedSender;

use super::{
    Command, Completion, Event, FinishReason, Request, Shared, StopMatcher, Trace, TraceMonitor,
};
use crate::error::{Error, Result};
use crate::model::{LoraAdapter, SeqKv, StepInput};
use crate::sampling::Rng;
use crate::tokenizer::Utf8Buffer;
use candle_core::Tensor;

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
    /// Started after its request's prompt step: its first token comes from the prompt's
    /// saved logits row, not from a forward step of its own.
    fresh: bool,
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
    /// The prompt's KV, kept while samples of a sequential request are still to start.
    parent_kv: Option<SeqKv>,
    /// The prompt's last logits row, for samples that start after the prompt's step.
    first_logits: Option<Tensor>,
    /// The adapter version of the prompt's step: a sample that starts later still takes
    /// its prompt KV and first token from it.
    prompt_adapter_version: u64,
    /// Finished samples from sample 0 already offered to the request's `settled`.
    checked: usize,
    /// How many samples settled a sequential request, once they have.
    settled_after: Option<usize>,
}

impl Active {
    /// Every sample that will run has started.
    fn all_started(&self) -> bool {
        self.settled_after.is_some() || self.samples.len() >= self.request.n
    }
}

/// A checked, tokenized request queued for KV or batch room.
pub(super) struct Waiting {
    pub(super) id: u64,
    pub(super) request: Box<Request>,
    pub(super) adapter: Option<Arc<LoraAdapter>>,
    pub(super) events: UnboundedSender<Event>,
    pub(super) prompt: Vec<u32>,
    /// After the context cap.
    pub(super) max_tokens: usize,
    /// KV positions it reserves when admitted.
    pub(super) need: usize,
}

/// Where a logits row goes.
enum RowOwner {
    Prefill(usize),
    Sample(usize, usize),
}

/// The state of the engine thread: the queue, the admitted requests, the KV reserved.
pub(super) struct Scheduler {
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    waiting: VecDeque<Waiting>,
    active: Vec<Active>,
    reserved: usize,
    /// Set by a test's `Engine::hold`: commands queue, nothing is admitted or stepped.
    held: bool,
}

impl Scheduler {
    pub(super) fn new(shared: Arc<Shared>, commands: mpsc::Receiver<Command>) -> Self {
        Self {
            shared,
            commands,
            waiting: VecDeque::new(),
            active: Vec::new(),
            reserved: 0,
            held: false,
        }
    }

    /// The loop: runs until shutdown or until every handle and the engine are gone.
    pub(super) fn run(mut self) {
        loop {
            // Block only when there is nothing to do.
            let idle = (self.active.is_empty() && self.waiting.is_empty()) || self.held;
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
                    #[cfg(feature = "test-hooks")]
                    Command::Hold(held) => self.held = held,
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
            if self.held {
                continue;
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
            let running: usize = self
                .active
                .iter()
                .map(|a| a.request.parallel_samples())
                .sum();
            if front.events.is_closed() {
                self.waiting.pop_front();
                continue;
            }
            let slots = front.request.parallel_samples();
            if self.reserved + front.need > budget || running + slots > max_batch {
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
                parent_kv: None,
                first_logits: None,
                prompt_adapter_version: 0,
                checked: 0,
                settled_after: None,
            });
        }
    }

    fn abort(&mut self, id: u64) {
        if let Some(pos) = self.waiting.iter().position(|w| w.id == id) {
            if let Some(w) = self.waiting.remove(pos) {
                let _ = w.events.send(Event::Done(Completion {
                    prompt_tokens: w.prompt.len(),
                    traces: Vec::new(),
                    settled_after: None,
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
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok()
        {
            return Err(Error::Internal(
                "a decode step failed (forced by a test)".into(),
            ));
        }
        let config = &self.shared.config;
        let remaining: Vec<Option<usize>> = self
            .active
            .iter()
            .map(|a| a.prompt_kv.as_ref().map(|_| a.prompt.len() - a.prefilled))
            .collect();
        let grants = prefill_grants(&remaining, config.prefill_chunk);
        let mut batch_left = config.max_batch;
        let mut owners = Vec::new();
        let mut inputs: Vec<StepInput<'_>> = Vec::new();
        let mut rows_per_input = Vec::new();
        // Samples started since the last step choose their first token from the prompt's
        // saved row, appended below this step's rows.
        let mut fresh: Vec<(usize, usize, Tensor)> = Vec::new();
        for (ai, a) in self.active.iter().enumerate() {
            for (si, s) in a.samples.iter().enumerate() {
                if let (true, false, Some(row)) = (s.fresh, s.done, &a.first_logits) {
                    fresh.push((ai, si, row.clone()));
                }
            }
        }
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
                if grants[ai] == 0 {
                    continue;
                }
                let end = *prefilled + grants[ai];
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
                if s.done || s.fresh || batch_left == 0 {
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
        if inputs.is_empty() && fresh.is_empty() {
            return Ok(());
        }
        // Each adapter's weights are read from one snapshot for the whole step, so an update
        // published meanwhile shows from the next step on, never halfway.
        let mut rows = Vec::with_capacity(1 + fresh.len());
        if !inputs.is_empty() {
            let forward = self.shared.model.transformer.forward_step(&mut inputs)?;
            debug_assert_eq!(forward.dim(0)?, owners.len());
            rows.push(forward);
        }
        drop(inputs);
        rows.extend(fresh.iter().map(|(_, _, row)| row.clone()));
        let logits = match rows.len() {
            1 => rows.remove(0),
            _ => Tensor::cat(&rows, 0)?,
        };
        // Which (row, sample) pairs choose a token this step: a finished prompt's row once
        // per sample (they share it), a decoding sample's own row.
        let mut picks: Vec<(usize, usize, usize)> = Vec::new();
        let mut prefilled_tokens = 0u64;
        for (r, (owner, n)) in owners.iter().zip(&rows_per_input).enumerate() {
            match *owner {
                RowOwner::Prefill(ai) => {
                    prefilled_tokens += *n as u64;
                    let a = &mut self.active[ai];
                    a.prefilled += n;
                    if a.prefilled == a.prompt.len() {
                        self.start_samples(ai)?;
                        let a = &mut self.active[ai];
                        if !a.all_started() {
                            a.first_logits = Some(logits.narrow(0, r, 1)?.copy()?);
                        }
                        picks.extend((0..a.samples.len()).map(|si| (r, ai, si)));
                    }
                }
                RowOwner::Sample(ai, si) => picks.push((r, ai, si)),
            }
        }
        let forward_rows = owners.len();
        picks.extend(
            fresh
                .iter()
                .enumerate()
                .map(|(j, &(ai, si, _))| (forward_rows + j, ai, si)),
        );
        // A step of prompt chunks alone chooses nothing (and launches nothing on a device).
        let choices = if picks.is_empty() {
            Vec::new()
        } else if self.reduce_on_device() {
            self.choose_on_device(&logits, &picks)?
        } else {
            self.choose_all_on_host(&logits, &picks)?
        };
        let generated = picks.len() as u64;
        for (&(_, ai, si), choice) in picks.iter().zip(choices) {
            Self::advance(&self.shared, &mut self.active[ai], si, choice);
        }
        {
            let mut s = self.shared.stats.lock();
            s.steps += 1;
            s.prompt_tokens_prefilled += prefilled_tokens;
            s.generated_tokens += generated;
        }
        self.settle();
        self.refill()?;
        self.retire();
        Ok(())
    }

    /// The prompt is in the KV: fork it once per sample that starts now (shared, not
    /// copied); a sequential request keeps the prompt to fork its later samples.
    fn start_samples(&mut self, ai: usize) -> Result<()> {
        let a = &mut self.active[ai];
        let Some(mut parent) = a.prompt_kv.take() else {
            return Ok(());
        };
        a.prompt_adapter_version = a.adapter.as_ref().map(|x| x.version()).unwrap_or(0);
        for _ in 0..a.request.parallel_samples() {
            let sample = Self::new_sample(a, &mut parent)?;
            a.samples.push(sample);
        }
        if !a.all_started() {
            a.parent_kv = Some(parent);
        }
        Ok(())
    }

    /// The request's next sample, on a fork of `parent`.
    fn new_sample(a: &Active, parent: &mut SeqKv) -> Result<Sample> {
        let i = a.samples.len();
        let mut kv = parent.fork()?;
        kv.reserve(a.max_tokens)?;
        Ok(Sample {
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
                adapter_version: a.prompt_adapter_version,
            },
            utf8: Utf8Buffer::default(),
            stop: StopMatcher::new(&a.request.stop),
            monitor: a.request.early_stop.as_ref().map(|make| make(i)),
            counts: HashMap::new(),
            done: false,
            fresh: false,
        })
    }

    /// Offers each sequential request its grown run of finished samples, one length at a
    /// time; once settled, its running samples stop and no more start.
    fn settle(&mut self) {
        for a in &mut self.active {
            let Some(sequential) = a.request.sequential.clone() else {
                continue;
            };
            if a.settled_after.is_some() {
                continue;
            }
            let finished = a.samples.iter().take_while(|s| s.done).count();
            while a.checked < finished {
                a.checked += 1;
                let traces: Vec<&Trace> = a.samples[..a.checked].iter().map(|s| &s.trace).collect();
                if (sequential.settled)(&traces) {
                    a.settled_after = Some(a.checked);
                    break;
                }
            }
            if a.settled_after.is_none() {
                continue;
            }
            a.parent_kv = None;
            a.first_logits = None;
            for s in a.samples.iter_mut().filter(|s| !s.done) {
                s.done = true;
                s.trace.finish = FinishReason::Unneeded;
                s.trace.text = s.stop.text().to_string();
                s.kv = self.shared.model.transformer.new_kv();
            }
        }
    }

    /// Starts the next samples of sequential requests in the slots finished ones freed.
    fn refill(&mut self) -> Result<()> {
        for a in &mut self.active {
            if a.all_started() && !a.samples.iter().any(|s| s.fresh && !s.done) {
                a.first_logits = None;
            }
            if a.cancelled || a.all_started() {
                continue;
            }
            let Some(mut parent) = a.parent_kv.take() else {
                continue;
            };
            let running = a.samples.iter().filter(|s| !s.done).count();
            for _ in running..a.request.parallel_samples() {
                if a.all_started() {
                    break;
                }
                let mut sample = Self::new_sample(a, &mut parent)?;
                sample.fresh = true;
                a.samples.push(sample);
            }
            if !a.all_started() {
                a.parent_kv = Some(parent);
            }
        }
        Ok(())
    }

    /// Records one sample's chosen token and streams it; finishes the sample on a stop.
    fn advance(shared: &Shared, a: &mut Active, si: usize, choice: Choice) {
        let request = &a.request;
        let s = &mut a.samples[si];
        let tokenizer = &shared.model.tokenizer;
        let Choice {
            token,
            stats,
            top_logprobs,
        } = choice;
        s.fresh = false;
        *s.counts.entry(token).or_default() += 1;
        s.trace.tokens.push(token);
        s.trace.stats.push(stats);
        if let Some(top) = top_logprobs {
            s.trace.top_logprobs.push(top);
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
            let finished =
                a.prompt_kv.is_none() && a.all_started() && a.samples.iter().all(|s| s.done);
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
                settled_after: a.settled_after,
            }));
        }
    }
}
