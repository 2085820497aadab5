//! One request through the runtime: what a caller asks ([`GenerateRequest`]), the stream it
//! reads ([`Generation`], typed [`GenerationEvent`]s), and what it gets at the end
//! ([`GenerateResult`]). "Finishing" a request (trace scores, the selection rule, the
//! verifier's rewards, remembering traces for feedback) happens here and nowhere else.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::Serialize;

use super::feedback::TraceRecord;
use super::Inner;
use crate::engine::{
    engine_gone, Completion, EarlyStop, Event, Request, RequestHandle, Sequential, Trace,
    TraceMonitor,
};
use crate::error::{Error, Result};
use crate::score::{TraceScore, TraceView};
use crate::select::{select, Candidate, SelectionRule, WindowTracker};
use crate::stats::TokenStats;
use crate::verify::Verifier;

/// A generation request as the surfaces pass it: the engine request plus which adapter to
/// decode with, how to pick among its traces and, optionally, how to verify them.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt, n, sampling, stops, penalties.
    pub request: Request,
    /// A loaded adapter's id, "base" for none, or `None` for the runtime's default.
    pub adapter: Option<String>,
    /// Applied to the traces; `None` picks nothing. A sequential rule (`esc`,
    /// `adaptive`) also makes the engine draw the samples a few at a time and stop once
    /// they settle, unless `request.sequential` is already set.
    pub selection: Option<SelectionRule>,
    /// Samples decoding at once under a sequential rule (default: the rule's
    /// [`SelectionRule::default_parallel`]).
    pub parallel: Option<usize>,
    /// A registered verifier ("math", "exact", "choice", or one added with
    /// [`crate::Runtime::register_verifier`]) and the reference it checks against. Its
    /// reward is recorded as feedback on each trace.
    pub verify: Option<(String, String)>,
    /// Trace scores to compute besides the ones every result carries.
    pub scores: Vec<TraceScore>,
    /// Keep the traces for feedback (the default). Harnesses that reward traces themselves
    /// (`eval`, `rl`) turn it off so they do not crowd out feedback on served traffic.
    pub remember: bool,
}

impl GenerateRequest {
    /// A request with the runtime's default adapter, no selection and no verifier.
    pub fn new(request: Request) -> Self {
        Self {
            request,
            adapter: None,
            selection: None,
            parallel: None,
            verify: None,
            scores: Vec::new(),
            remember: true,
        }
    }
}

/// One trace of a result, with the id feedback refers to.
#[derive(Debug, Clone, Serialize)]
pub struct GeneratedTrace {
    /// Feedback refers to the trace by this id ([`crate::Runtime::feedback`]).
    pub id: u64,
    /// Tokens, text, per-token statistics, finish reason.
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
    /// The answer voted for.
    pub answer: String,
    /// Its total vote weight under the rule.
    pub weight: f64,
    /// Traces that gave it.
    pub count: usize,
}

/// What a request produced.
#[derive(Debug, Clone, Serialize)]
pub struct GenerateResult {
    /// The engine's id of the request.
    pub request_id: u64,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// The adapter the request decoded with (`None`: the base model).
    pub adapter: Option<String>,
    /// Every trace, in sample order.
    pub traces: Vec<GeneratedTrace>,
    /// The selection rule applied, as text.
    pub selection: Option<String>,
    /// Index into `traces` of the chosen trace.
    pub selected: Option<usize>,
    /// The selected answer.
    pub answer: Option<String>,
    /// The vote table of the selection (empty for rules that do not vote).
    pub votes: Vec<Vote>,
    /// For a sequential rule that settled early: how many samples, from the first, it
    /// took (the traces after them stopped or never started).
    pub settled_after: Option<usize>,
    /// The traces as selection rules see them (answer + scores), for applying more rules.
    #[serde(skip)]
    candidates: Vec<Candidate>,
    /// The prompt's token ids as the engine decoded them.
    #[serde(skip)]
    prompt: Arc<Vec<u32>>,
}

impl GenerateResult {
    /// Each trace's extracted answer and scores, in trace order: apply any
    /// [`crate::select::select`] rule to them without recomputing anything.
    pub fn candidates(&self) -> &[Candidate] {
        &self.candidates
    }
    /// The prompt's token ids as the engine decoded them (after chat rendering).
    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt
    }
    /// Generated tokens over all traces.
    pub fn generated_tokens(&self) -> usize {
        self.traces.iter().map(|t| t.trace.tokens.len()).sum()
    }
}

/// What a [`Generation`] streams.
#[derive(Debug)]
#[non_exhaustive]
pub enum GenerationEvent {
    /// A token of sample `index` and the text it completed (may be empty while a character
    /// or a possible stop string is incomplete).
    Token {
        /// The sample (0..n).
        index: usize,
        /// The token id.
        token: u32,
        /// Text completed by this token.
        text: String,
        /// Its statistics, from the raw logits of the step that produced it.
        stats: TokenStats,
    },
    /// The finished result; the last event.
    Finished(Box<GenerateResult>),
}

/// A request in flight: read its events ([`Self::next`]) or wait for its result
/// ([`Self::result`]). Dropping it cancels the request.
pub struct Generation {
    handle: RequestHandle,
    pending: Option<Prepared>,
    prompt_tokens: usize,
    runtime: Arc<Inner>,
    _slot: QueueSlot,
}

/// Counts a request against `max_queued_requests` while it lives.
pub(super) struct QueueSlot(pub(super) Arc<Inner>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What finishing a request needs besides its traces (made once, by `Runtime::submit`).
pub(super) struct Prepared {
    pub prompt: Arc<Vec<u32>>,
    pub adapter: Option<String>,
    pub selection: Option<SelectionRule>,
    pub verify: Option<(Arc<dyn Verifier>, String)>,
    pub scores: Vec<TraceScore>,
    pub remember: bool,
}

impl Generation {
    pub(super) fn new(
        handle: RequestHandle,
        prepared: Prepared,
        runtime: Arc<Inner>,
        slot: QueueSlot,
    ) -> Self {
        Self {
            handle,
            prompt_tokens: prepared.prompt.len(),
            pending: Some(prepared),
            runtime,
            _slot: slot,
        }
    }

    /// The engine's id of the request.
    pub fn request_id(&self) -> u64 {
        self.handle.id
    }
    /// Prompt length in tokens.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }
    /// Cancels the request; its traces end as aborted (the result still comes).
    pub fn abort(&self) {
        self.handle.abort()
    }

    /// The next event: tokens, then one `Finished` (or one error); `None` after that.
    pub async fn next(&mut self) -> Option<Result<GenerationEvent>> {
        self.pending.as_ref()?;
        let event = self.handle.next().await;
        Some(self.on_event(event))
    }

    /// Blocking variant of [`Self::next`]; do not call from inside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Result<GenerationEvent>> {
        self.pending.as_ref()?;
        let event = self.handle.blocking_next();
        Some(self.on_event(event))
    }

    /// Waits for the result, skipping token events.
    pub async fn result(mut self) -> Result<GenerateResult> {
        while let Some(event) = self.next().await {
            if let GenerationEvent::Finished(result) = event? {
                return Ok(*result);
            }
        }
        Err(engine_gone())
    }

    /// Blocking variant of [`Self::result`]; do not call from inside an async runtime.
    pub fn blocking_result(mut self) -> Result<GenerateResult> {
        while let Some(event) = self.blocking_next() {
            if let GenerationEvent::Finished(result) = event? {
                return Ok(*result);
            }
        }
        Err(engine_gone())
    }

    fn on_event(&mut self, event: Option<Event>) -> Result<GenerationEvent> {
        match event {
            Some(Event::Token {
                index,
                token,
                text,
                stats,
            }) => Ok(GenerationEvent::Token {
                index,
                token,
                text,
                stats,
            }),
            Some(Event::Done(completion)) => {
                let pending = self.pending.take().ok_or_else(engine_gone)?;
                let result = self.runtime.finish(self.handle.id, pending, completion);
                Ok(GenerationEvent::Finished(Box::new(result)))
            }
            Some(Event::Error(e)) => Err(self.failed(e)),
            None => Err(self.failed(engine_gone())),
        }
    }

    fn failed(&mut self, e: Error) -> Error {
        self.pending = None;
        self.runtime
            .counters
            .requests_failed
            .fetch_add(1, Ordering::Relaxed);
        e
    }
}

/// A finished trace as the selection rules see it: its extracted answer and `scores`. A
/// trace cut short (stopped for low confidence, or because the answer was settled) is a
/// fragment and has no answer, so it never votes.
fn candidate_of(trace: &Trace, scores: &[TraceScore]) -> Candidate {
    let view = TraceView {
        text: &trace.text,
        stats: &trace.stats,
        token_end: &trace.token_end,
    };
    let mut candidate = Candidate::from_trace(&view, scores);
    if trace.finish.is_cut_short() {
        candidate.answer = None;
    }
    candidate
}

/// The engine's sequential drawing for a sequential selection rule: `parallel` samples at
/// a time, settled when the rule would stop drawing on the finished ones out of the
/// request's `budget` of samples. For DeepConf online also the monitors that stop a later
/// sample once its window confidence falls below the threshold the warm-up samples set
/// (the warm-up samples never stop).
pub(super) fn sequential_for(
    rule: SelectionRule,
    parallel: usize,
    budget: usize,
) -> (Sequential, Option<EarlyStop>) {
    let threshold = Arc::new(std::sync::OnceLock::<f64>::new());
    let early_stop: Option<EarlyStop> = match rule {
        SelectionRule::DeepConfOnline { warmup, window, .. } => {
            let threshold = threshold.clone();
            Some(Arc::new(move |sample: usize| {
                Box::new(ThresholdMonitor {
                    tracker: WindowTracker::new(window, None),
                    threshold: (sample >= warmup).then(|| threshold.clone()),
                }) as Box<dyn TraceMonitor>
            }))
        }
        _ => None,
    };
    let scores = rule.required_scores();
    // The engine asks with ever longer runs of the same samples: each is scored once,
    // not once per question.
    let drawn = parking_lot::Mutex::new(Vec::<Candidate>::new());
    let sequential = Sequential {
        parallel,
        settled: Arc::new(move |traces: &[&Trace]| {
            let mut drawn = drawn.lock();
            drawn.truncate(traces.len());
            let known = drawn.len();
            drawn.extend(traces[known..].iter().map(|t| candidate_of(t, &scores)));
            if let Some(t) = rule.online_threshold(&drawn) {
                let _ = threshold.set(t);
            }
            rule.settled(&drawn, budget)
        }),
    };
    (sequential, early_stop)
}

/// Stops a DeepConf-online sample once its window confidence falls below the threshold,
/// from the moment the warm-up has set one.
struct ThresholdMonitor {
    tracker: WindowTracker,
    /// `None` for a warm-up sample.
    threshold: Option<Arc<std::sync::OnceLock<f64>>>,
}

impl TraceMonitor for ThresholdMonitor {
    fn observe(&mut self, stats: &TokenStats) -> bool {
        if let Some(t) = self.threshold.as_ref().and_then(|t| t.get()) {
            self.tracker.set_threshold(*t);
            self.threshold = None;
        }
        self.tracker.push(stats.confidence)
    }
}

impl Inner {
    /// Scores, selects, verifies and (unless told not to) remembers the finished traces.
    fn finish(&self, request_id: u64, pending: Prepared, completion: Completion) -> GenerateResult {
        let Prepared {
            prompt,
            adapter,
            selection,
            verify,
            scores,
            remember,
        } = pending;
        let mut wanted: Vec<TraceScore> = vec![
            TraceScore::MeanSelfCertainty,
            TraceScore::MeanLogprob,
            TraceScore::NegMeanEntropy,
            TraceScore::LowestGroup {
                window: self.config.score_window,
            },
        ];
        wanted.extend(scores);
        if let Some(rule) = &selection {
            wanted.extend(rule.required_scores());
        }
        wanted.sort();
        wanted.dedup();
        let candidates: Vec<Candidate> = completion
            .traces
            .iter()
            .map(|t| candidate_of(t, &wanted))
            .collect();
        let chosen = selection.as_ref().map(|rule| select(rule, &candidates));
        let settled_after = completion.settled_after;
        let first_id = self
            .next_trace
            .fetch_add(completion.traces.len() as u64, Ordering::Relaxed);
        let mut traces = Vec::with_capacity(completion.traces.len());
        let mut records = Vec::with_capacity(completion.traces.len());
        for (i, (trace, candidate)) in completion.traces.into_iter().zip(&candidates).enumerate() {
            let id = first_id + i as u64;
            // A sample cut short is a fragment, not an answer: nothing to verify, nothing
            // to learn from.
            let whole = !trace.finish.is_cut_short();
            let reward = verify
                .as_ref()
                .filter(|_| whole)
                .map(|(v, reference)| v.verify(&trace.text, reference).reward);
            if remember && whole && !trace.tokens.is_empty() {
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
            settled_after,
            candidates,
            prompt,
        }
    }
}
