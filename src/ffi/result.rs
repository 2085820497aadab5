//! The result object: the N traces of one generate call, their per-token statistics,
//! scores and rewards, and the selection, laid out once as C arrays and strings so that
//! the getters hand out pointers into it (valid until `verity_result_free`).

use std::ffi::c_char;

use super::handles::{free_handle, result_of, verity_result, Object};
use super::verity_status::{self, *};
use super::{arg_str, ffi_call, index_in, out, scratch, Fail, Outcome};
use crate::engine::FinishReason;
use crate::runtime::{GenerateResult, GeneratedTrace};

/// Why a trace ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum verity_finish_reason {
    /// End-of-generation token, stop token or stop string.
    VERITY_FINISH_STOP = 0,
    /// max_tokens (or the context) reached.
    VERITY_FINISH_LENGTH = 1,
    /// Cancelled by the caller.
    VERITY_FINISH_ABORTED = 2,
    /// Stopped early for low confidence; keeps what it generated.
    VERITY_FINISH_ABORTED_LOW_CONFIDENCE = 3,
    /// Stopped because earlier samples settled the request (a sequential selection rule
    /// such as "esc" or "adaptive"); keeps what it generated.
    VERITY_FINISH_UNNEEDED = 4,
}

/// Text with a trailing NUL, for handing out as a C string with its length.
struct CText(Vec<u8>);

impl CText {
    fn new(s: &str) -> Self {
        let mut bytes = Vec::with_capacity(s.len() + 1);
        bytes.extend_from_slice(s.as_bytes());
        bytes.push(0);
        CText(bytes)
    }
    fn ptr(&self) -> *const c_char {
        self.0.as_ptr().cast()
    }
    fn len(&self) -> usize {
        self.0.len() - 1
    }
}

struct TraceData {
    text: CText,
    answer: Option<CText>,
    tokens: Vec<i32>,
    logprob: Vec<f32>,
    entropy: Vec<f32>,
    self_certainty: Vec<f32>,
    confidence: Vec<f32>,
    /// Per token: offsets into `top_ids`/`top_logprobs`.
    top_start: Vec<usize>,
    top_ids: Vec<i32>,
    top_logprobs: Vec<f32>,
    /// `GeneratedTrace::scores` in its (alphabetical) order, names as C strings.
    scores: Vec<(CText, f64)>,
}

/// A result with everything C callers read laid out as C arrays and strings.
pub(super) struct ResultData {
    result: GenerateResult,
    traces: Vec<TraceData>,
    answer: Option<CText>,
    adapter: Option<CText>,
    selection: Option<CText>,
    votes: Vec<CText>,
}

impl ResultData {
    pub(super) fn new(result: GenerateResult) -> Self {
        let traces = result
            .traces
            .iter()
            .map(|t| {
                let stats = &t.trace.stats;
                let mut top_start = Vec::with_capacity(t.trace.top_logprobs.len() + 1);
                let mut top_ids = Vec::new();
                let mut top_logprobs = Vec::new();
                for alternatives in &t.trace.top_logprobs {
                    top_start.push(top_ids.len());
                    for &(id, lp) in alternatives {
                        top_ids.push(id as i32);
                        top_logprobs.push(lp);
                    }
                }
                top_start.push(top_ids.len());
                TraceData {
                    text: CText::new(&t.trace.text),
                    answer: t.answer.as_deref().map(CText::new),
                    tokens: t.trace.tokens.iter().map(|&id| id as i32).collect(),
                    logprob: stats.iter().map(|s| s.logprob).collect(),
                    entropy: stats.iter().map(|s| s.entropy).collect(),
                    self_certainty: stats.iter().map(|s| s.self_certainty).collect(),
                    confidence: stats.iter().map(|s| s.confidence).collect(),
                    top_start,
                    top_ids,
                    top_logprobs,
                    scores: t.scores.iter().map(|(k, v)| (CText::new(k), *v)).collect(),
                }
            })
            .collect();
        ResultData {
            traces,
            answer: result.answer.as_deref().map(CText::new),
            adapter: result.adapter.as_deref().map(CText::new),
            selection: result.selection.as_deref().map(CText::new),
            votes: result.votes.iter().map(|v| CText::new(&v.answer)).collect(),
            result,
        }
    }

    fn trace(&self, i: usize) -> std::result::Result<(&GeneratedTrace, &TraceData), Fail> {
        index_in(i, self.traces.len(), "trace index")?;
        Ok((&self.result.traces[i], &self.traces[i]))
    }
}

fn opt_ptr(t: &Option<CText>) -> *const c_char {
    t.as_ref().map_or(std::ptr::null(), CText::ptr)
}

// ---------------------------------------------------------------------------------------
// The getters' shape
// ---------------------------------------------------------------------------------------

/// The body of a getter that has no required output: checks the handle, then runs `read`.
fn with_result(
    res: *const verity_result,
    read: impl FnOnce(&ResultData) -> Outcome,
) -> verity_status {
    ffi_call(|| {
        let r = result_of(res)?;
        read(&r)
    })
}

/// The body of a getter: checks the handle, then the output pointer `dst` (`what` names
/// it in the NULL-pointer message), then stores what `read` returns. `read` makes the
/// remaining checks (indices, further output pointers) before it writes anything; when it
/// fails, `*dst` is left alone.
unsafe fn get<T>(
    res: *const verity_result,
    dst: *mut T,
    what: &str,
    read: impl FnOnce(&ResultData) -> std::result::Result<T, Fail>,
) -> verity_status {
    with_result(res, |r| {
        let dst = out(dst, what)?;
        *dst = read(r)?;
        Ok(())
    })
}

/// [`get`] for trace `i`: its index is checked after the output pointer, and `read` gets
/// the trace and its C layout.
unsafe fn get_trace<T>(
    res: *const verity_result,
    i: usize,
    dst: *mut T,
    what: &str,
    read: impl FnOnce(&GeneratedTrace, &TraceData) -> std::result::Result<T, Fail>,
) -> verity_status {
    get(res, dst, what, |r| {
        let (g, t) = r.trace(i)?;
        read(g, t)
    })
}

// ---------------------------------------------------------------------------------------
// The C calls
// ---------------------------------------------------------------------------------------

/// Frees a result. NULL is accepted and does nothing. Pointers obtained from it become
/// invalid.
///
/// Thread safety: any thread, once no other thread reads the result.
#[no_mangle]
pub extern "C" fn verity_result_free(res: *mut verity_result) -> verity_status {
    ffi_call(|| {
        if res.is_null() {
            return Ok(());
        }
        free_handle(res as usize, "result", |o| matches!(o, Object::Result(_)))
    })
}

/// The number of traces (the request's n).
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_n_traces(
    res: *const verity_result,
    n: *mut usize,
) -> verity_status {
    get(res, n, "n", |r| Ok(r.traces.len()))
}

/// Request-level facts: the request id, the prompt's length in tokens, the adapter it
/// decoded with (NULL: the base model) and the selection rule as text (NULL: none). Any
/// output pointer may be NULL to skip it.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_info(
    res: *const verity_result,
    request_id: *mut u64,
    prompt_tokens: *mut usize,
    adapter: *mut *const c_char,
    selection: *mut *const c_char,
) -> verity_status {
    with_result(res, |r| {
        if let Some(v) = request_id.as_mut() {
            *v = r.result.request_id;
        }
        if let Some(v) = prompt_tokens.as_mut() {
            *v = r.result.prompt_tokens;
        }
        if let Some(v) = adapter.as_mut() {
            *v = opt_ptr(&r.adapter);
        }
        if let Some(v) = selection.as_mut() {
            *v = opt_ptr(&r.selection);
        }
        Ok(())
    })
}

/// Trace `i`'s text (`*len` bytes, NUL-terminated; `len` may be NULL).
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_text(
    res: *const verity_result,
    i: usize,
    text: *mut *const c_char,
    len: *mut usize,
) -> verity_status {
    get_trace(res, i, text, "text", |_, t| {
        if let Some(len) = len.as_mut() {
            *len = t.text.len();
        }
        Ok(t.text.ptr())
    })
}

/// Trace `i`'s generated token ids (an end-of-generation token that ended it included).
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_tokens(
    res: *const verity_result,
    i: usize,
    tokens: *mut *const i32,
    n: *mut usize,
) -> verity_status {
    get(res, tokens, "tokens", |r| {
        let n = out(n, "n")?;
        let (_, t) = r.trace(i)?;
        *n = t.tokens.len();
        Ok(t.tokens.as_ptr())
    })
}

/// Per-token statistics of a trace: four arrays of `n` floats (one per generated token).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct verity_trace_stats {
    /// Tokens in the trace (the length of each array).
    pub n: usize,
    /// Per token: log-probability of the chosen token.
    pub logprob: *const f32,
    /// Per token: entropy of the distribution.
    pub entropy: *const f32,
    /// Per token: self-certainty.
    pub self_certainty: *const f32,
    /// Per token: DeepConf top-k confidence.
    pub confidence: *const f32,
}

/// Trace `i`'s per-token statistics.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_stats(
    res: *const verity_result,
    i: usize,
    stats: *mut verity_trace_stats,
) -> verity_status {
    get_trace(res, i, stats, "stats", |_, t| {
        Ok(verity_trace_stats {
            n: t.logprob.len(),
            logprob: t.logprob.as_ptr(),
            entropy: t.entropy.as_ptr(),
            self_certainty: t.self_certainty.as_ptr(),
            confidence: t.confidence.as_ptr(),
        })
    })
}

/// The top alternatives recorded for token `pos` of trace `i` (when the request asked
/// for `top_logprobs`): `*n` token ids and their log-probs, most likely first.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_top_logprobs(
    res: *const verity_result,
    i: usize,
    pos: usize,
    ids: *mut *const i32,
    logprobs: *mut *const f32,
    n: *mut usize,
) -> verity_status {
    get(res, ids, "ids", |r| {
        let logprobs = out(logprobs, "logprobs")?;
        let n = out(n, "n")?;
        let (_, t) = r.trace(i)?;
        let recorded = t.top_start.len() - 1;
        if recorded == 0 {
            return Err(Fail::new(
                VERITY_ERR_NOT_FOUND,
                "no top log-probs were recorded (set params.top_logprobs)",
            ));
        }
        index_in(pos, recorded, "token position")?;
        let (start, end) = (t.top_start[pos], t.top_start[pos + 1]);
        *logprobs = t.top_logprobs[start..].as_ptr();
        *n = end - start;
        Ok(t.top_ids[start..].as_ptr())
    })
}

/// Why trace `i` ended.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_finish_reason(
    res: *const verity_result,
    i: usize,
    reason: *mut verity_finish_reason,
) -> verity_status {
    get_trace(res, i, reason, "reason", |g, _| {
        Ok(match g.trace.finish {
            FinishReason::Stop => verity_finish_reason::VERITY_FINISH_STOP,
            FinishReason::Length => verity_finish_reason::VERITY_FINISH_LENGTH,
            FinishReason::Aborted => verity_finish_reason::VERITY_FINISH_ABORTED,
            FinishReason::AbortedLowConfidence => {
                verity_finish_reason::VERITY_FINISH_ABORTED_LOW_CONFIDENCE
            }
            FinishReason::Unneeded => verity_finish_reason::VERITY_FINISH_UNNEEDED,
        })
    })
}

/// Trace `i`'s id, under which `verity_feedback` reports a reward for it.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_id(
    res: *const verity_result,
    i: usize,
    id: *mut u64,
) -> verity_status {
    get_trace(res, i, id, "id", |g, _| Ok(g.id))
}

/// Trace `i`'s extracted final answer (`\boxed{}`, "The answer is", the last number, ...);
/// `*answer` is NULL when it has none.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_answer(
    res: *const verity_result,
    i: usize,
    answer: *mut *const c_char,
) -> verity_status {
    get_trace(res, i, answer, "answer", |_, t| Ok(opt_ptr(&t.answer)))
}

/// The number of scores trace `i` has (see `verity_result_trace_score_at`).
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_n_scores(
    res: *const verity_result,
    i: usize,
    n: *mut usize,
) -> verity_status {
    get_trace(res, i, n, "n", |_, t| Ok(t.scores.len()))
}

/// Score `k` of trace `i` (by name, in alphabetical order): its name and value.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_score_at(
    res: *const verity_result,
    i: usize,
    k: usize,
    name: *mut *const c_char,
    value: *mut f64,
) -> verity_status {
    get(res, name, "name", |r| {
        let value = out(value, "value")?;
        let (_, t) = r.trace(i)?;
        index_in(k, t.scores.len(), "score index")?;
        *value = t.scores[k].1;
        Ok(t.scores[k].0.ptr())
    })
}

/// Trace `i`'s score `name` ("self_certainty", "logprob", "entropy",
/// "lowest_group:16", and whatever the selection rule used). `VERITY_ERR_NOT_FOUND` when
/// the trace has no such score (not computed, or undefined for it, e.g. an empty trace).
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_score(
    res: *const verity_result,
    i: usize,
    name: *const c_char,
    value: *mut f64,
) -> verity_status {
    // The name is checked before the output pointer, so this one is not a `get`.
    with_result(res, |r| {
        let name = arg_str(name, "name")?;
        let value = out(value, "value")?;
        let (g, _) = r.trace(i)?;
        *value = *g.scores.get(name).ok_or_else(|| {
            let known: Vec<&str> = g.scores.keys().map(String::as_str).collect();
            Fail::new(
                VERITY_ERR_NOT_FOUND,
                format!(
                    "trace {i} has no score '{name}' (it has: {})",
                    known.join(", ")
                ),
            )
        })?;
        Ok(())
    })
}

/// The verifier's reward for trace `i`; NaN when the request named no verifier.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_trace_reward(
    res: *const verity_result,
    i: usize,
    reward: *mut f64,
) -> verity_status {
    get_trace(res, i, reward, "reward", |g, _| {
        Ok(g.reward.unwrap_or(f64::NAN))
    })
}

/// The index of the trace the selection rule chose. `VERITY_ERR_NOT_FOUND` when the
/// request had no selection rule or no trace had an answer to vote with.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_selected(
    res: *const verity_result,
    index: *mut usize,
) -> verity_status {
    get(res, index, "index", |r| {
        r.result.selected.ok_or_else(|| {
            Fail::new(
                VERITY_ERR_NOT_FOUND,
                if r.result.selection.is_none() {
                    "the request had no selection rule"
                } else {
                    "no trace was selected (none had an answer)"
                },
            )
        })
    })
}

/// The selected answer; `*answer` is NULL when nothing was selected.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_answer(
    res: *const verity_result,
    answer: *mut *const c_char,
) -> verity_status {
    get(res, answer, "answer", |r| Ok(opt_ptr(&r.answer)))
}

/// The number of rows in the selection's vote table (0 for rules that do not vote).
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_n_votes(
    res: *const verity_result,
    n: *mut usize,
) -> verity_status {
    get(res, n, "n", |r| Ok(r.votes.len()))
}

/// Row `i` of the vote table (by weight, descending): the answer, its pooled weight and
/// how many traces voted for it. `weight` and `count` may be NULL.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_vote(
    res: *const verity_result,
    i: usize,
    answer: *mut *const c_char,
    weight: *mut f64,
    count: *mut usize,
) -> verity_status {
    get(res, answer, "answer", |r| {
        index_in(i, r.votes.len(), "vote index")?;
        if let Some(w) = weight.as_mut() {
            *w = r.result.votes[i].weight;
        }
        if let Some(c) = count.as_mut() {
            *c = r.result.votes[i].count;
        }
        Ok(r.votes[i].ptr())
    })
}

/// The whole result as JSON (`*json` in thread-local storage): the same fields the HTTP
/// server returns, with every trace's tokens, statistics and scores.
///
/// Thread safety: any thread (results are immutable).
#[no_mangle]
pub unsafe extern "C" fn verity_result_json(
    res: *const verity_result,
    json: *mut *const c_char,
) -> verity_status {
    get(res, json, "json", |r| {
        let text = serde_json::to_string(&r.result)
            .map_err(|e| Fail::new(VERITY_ERR_INTERNAL, e.to_string()))?;
        Ok(scratch(text))
    })
}
