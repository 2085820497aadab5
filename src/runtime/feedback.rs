//! The traces a runtime remembers for feedback: a bounded store of finished traces by id,
//! the rewards hosts report for them, and how rewarded traces become GRPO groups (the N
//! traces of one request form a group; rewarded traces alone in their request are pooled
//! into one group, whose baseline is the pool's mean reward).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Inner;
use crate::error::{Error, Result};
use crate::train::Rollout;

/// A finished trace kept for feedback.
pub(crate) struct TraceRecord {
    pub request: u64,
    pub prompt: Arc<Vec<u32>>,
    pub completion: Vec<u32>,
    pub decode_logprobs: Vec<f32>,
    pub adapter_version: u64,
    pub reward: Option<f64>,
}

impl Inner {
    /// Keeps finished traces, forgetting the oldest beyond `trace_capacity`.
    pub(crate) fn remember(&self, records: Vec<(u64, TraceRecord)>) {
        if records.is_empty() {
            return;
        }
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

    /// Records a reward (any finite value) for a remembered trace.
    pub(crate) fn feedback(&self, trace_id: u64, reward: f64) -> Result<()> {
        crate::train::check_reward(reward)?;
        let mut traces = self.traces.lock();
        let record = traces.get_mut(&trace_id).ok_or_else(|| {
            Error::NotFound(format!(
                "trace {trace_id} is unknown, already trained on, or was forgotten (the runtime keeps the last {} traces)",
                self.config.trace_capacity
            ))
        })?;
        record.reward = Some(reward);
        drop(traces);
        self.counters.feedback.fetch_add(1, Ordering::Relaxed);
        self.feedback_signal.notify_all();
        Ok(())
    }

    /// Takes every rewarded trace out of the store (each is trained on once), grouped.
    pub(crate) fn take_rewarded(&self) -> Vec<Rollout> {
        let taken: Vec<TraceRecord> = {
            let mut store = self.traces.lock();
            let ids: Vec<u64> = store
                .iter()
                .filter(|(_, t)| t.reward.is_some())
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter().filter_map(|id| store.remove(&id)).collect()
        };
        group_rollouts(taken)
    }
}

/// Rewarded traces waiting for a learning step.
pub(crate) fn pending(traces: &BTreeMap<u64, TraceRecord>) -> usize {
    traces.values().filter(|t| t.reward.is_some()).count()
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
}
