//! The runtime's trainer: learning steps on rewarded traces (on demand or from a background
//! thread that waits for enough feedback), explicit rollouts from a harness, and the status
//! a host polls. The trainer updates the registry's learning adapter; the engine decodes
//! with the new values from its next step on (the snapshot swap in `model::lora`).

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use super::feedback::pending;
use super::Inner;
use crate::error::{Error, Result};
use crate::model::LoraAdapter;
use crate::train::{Rollout, StepReport, Trainer};

/// What the background learner is doing.
#[derive(Debug, Clone, Serialize)]
pub struct LearningStatus {
    /// The background learner is on.
    pub running: bool,
    /// Learning steps taken (applied or skipped).
    pub steps: u64,
    /// Steps that changed the adapter.
    pub applied: u64,
    /// Id of the learning adapter.
    pub adapter: String,
    /// Its version now.
    pub adapter_version: u64,
    /// Rewarded traces waiting.
    pub pending: usize,
    /// Rewarded traces a background step waits for.
    pub min_traces: usize,
    /// The last step's report.
    pub last: Option<StepReport>,
    /// The last step's error, if it failed.
    pub last_error: Option<String>,
}

pub(crate) struct LearnState {
    pub trainer: Trainer,
    pub steps: u64,
    pub applied: u64,
    pub last: Option<StepReport>,
    pub last_error: Option<String>,
}

impl LearnState {
    pub fn new(trainer: Trainer) -> Self {
        Self {
            trainer,
            steps: 0,
            applied: 0,
            last: None,
            last_error: None,
        }
    }
}

pub(crate) struct Background {
    pub stop: bool,
    pub min_traces: usize,
    pub thread: Option<JoinHandle<()>>,
}

impl Inner {
    /// One GRPO step on every rewarded trace not yet trained on.
    pub(crate) fn learn_step(&self) -> Result<StepReport> {
        let mut learn = self.learn.lock();
        let rollouts = self.take_rewarded();
        if rollouts.is_empty() {
            learn.steps += 1;
            let report = StepReport {
                step: learn.steps,
                version: learn.trainer.adapter.version(),
                skipped: Some("no rewarded traces are pending".into()),
                ..StepReport::default()
            };
            learn.last = Some(report.clone());
            return Ok(report);
        }
        self.train_locked(&mut learn, &rollouts)
    }

    /// One GRPO step on rollouts a harness rewarded itself.
    pub(crate) fn train_on(&self, rollouts: &[Rollout]) -> Result<StepReport> {
        let mut learn = self.learn.lock();
        self.train_locked(&mut learn, rollouts)
    }

    fn train_locked(&self, learn: &mut LearnState, rollouts: &[Rollout]) -> Result<StepReport> {
        learn.steps += 1;
        let result = learn
            .trainer
            .step(&self.engine.model().transformer, rollouts);
        // The step's short-lived buffers (about a gigabyte on a small model) are free now:
        // hand them back, or each allocator arena that ever served a step keeps that much
        // resident.
        crate::release_free_memory();
        match result {
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

    /// Makes `adapter` the learning adapter: registered under the learning id, and the
    /// trainer continues from it with a fresh optimizer. One lock order: learn, then registry.
    pub(crate) fn replace_learning(&self, adapter: Arc<LoraAdapter>) {
        let mut learn = self.learn.lock();
        learn.trainer = Trainer::new(adapter.clone(), self.config.train.clone());
        self.adapters.insert(self.adapters.learning_id(), adapter);
    }

    pub(crate) fn start_learning(self: &Arc<Self>, min_traces: Option<usize>) -> Result<()> {
        let mut bg = self.background.lock();
        if let Some(n) = min_traces {
            if n == 0 {
                return Err(Error::InvalidArgument(
                    "min_traces must be at least 1".into(),
                ));
            }
            // The store never holds more: learning would wait forever.
            if n > self.config.trace_capacity {
                return Err(Error::OutOfRange(format!(
                    "min_traces {n} is above trace_capacity {}, the most traces the runtime keeps",
                    self.config.trace_capacity
                )));
            }
            bg.min_traces = n;
        }
        if bg.thread.is_some() {
            return Ok(());
        }
        bg.stop = false;
        let inner = self.clone();
        let thread = std::thread::Builder::new()
            .name("verity-learn".into())
            .spawn(move || inner.background_loop())
            .map_err(|e| Error::Internal(format!("cannot start the learner thread: {e}")))?;
        bg.thread = Some(thread);
        Ok(())
    }

    pub(crate) fn stop_learning(&self) {
        let thread = {
            let mut bg = self.background.lock();
            bg.stop = true;
            bg.thread.take()
        };
        self.feedback_signal.notify_all();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    pub(crate) fn learning_status(&self) -> LearningStatus {
        let (running, min_traces) = {
            let bg = self.background.lock();
            (bg.thread.is_some(), bg.min_traces)
        };
        let learn = self.learn.lock();
        LearningStatus {
            running,
            steps: learn.steps,
            applied: learn.applied,
            adapter: self.adapters.learning_id().to_string(),
            adapter_version: learn.trainer.adapter.version(),
            pending: pending(&self.traces.lock()),
            min_traces,
            last: learn.last.clone(),
            last_error: learn.last_error.clone(),
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
