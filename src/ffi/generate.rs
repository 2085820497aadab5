//! Generation: the request parameters (`verity_generate_params`), their checks, and the
//! blocking and streaming generate calls, which hand back a result object.

use std::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

use super::handles::{new_handle, runtime_of, verity_result, verity_runtime, Object};
use super::result::ResultData;
use super::verity_status::{self, *};
use super::{arg_str, ffi_call, opt_str, out, Fail, Outcome};
use crate::chat::ChatMessage;
use crate::engine::{Prompt, Request};
use crate::error::Error;
use crate::runtime::{GenerateRequest, GenerationEvent};

/// The most samples one request may ask for through the C ABI.
pub const VERITY_MAX_SAMPLES: usize = 4096;
/// The most stop strings one request may carry.
pub const VERITY_MAX_STOP_STRINGS: usize = 64;
/// The most alternatives per token `top_logprobs` may ask for.
pub const VERITY_MAX_TOP_LOGPROBS: usize = 256;

/// One generation request. Get one from `verity_generate_default_params()`. The strings
/// are borrowed for the duration of the call only.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct verity_generate_params {
    /// The prompt (required).
    pub prompt: *const c_char,
    /// Render the prompt with the model's chat template as one user message (else it is
    /// used as raw text, special-token text parsed as special tokens).
    pub chat: bool,
    /// Samples; the prompt is prefilled once and shared by all (1..=VERITY_MAX_SAMPLES).
    pub n: usize,
    /// Tokens per sample at most (clamped to the model's context).
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 0 means no min-p cut.
    pub min_p: f32,
    /// Sample i draws from a generator seeded with seed + i.
    pub seed: u64,
    /// `n_stop` strings that end a trace (not part of its text); may be NULL when
    /// `n_stop` is 0.
    pub stop: *const *const c_char,
    /// Number of strings in `stop`.
    pub n_stop: usize,
    /// Keep generating past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Adapter id; NULL: the runtime's default adapter; "base": no adapter.
    pub adapter: *const c_char,
    /// Selection rule among the traces: "greedy", "majority", "borda:0.5",
    /// "max:self_certainty", "weighted:logprob", "deepconf:bottom10:2048:10"; NULL: none.
    pub selection: *const c_char,
    /// A verifier ("math", "exact", "choice" or one registered with
    /// `verity_register_verifier`) and the reference it checks against; NULL: none. Its
    /// reward is recorded as feedback on each trace.
    pub verifier: *const c_char,
    /// What `verifier` checks the traces against (with `verifier`); NULL: none.
    pub reference: *const c_char,
    /// Record this many top alternatives per token (0..=VERITY_MAX_TOP_LOGPROBS).
    pub top_logprobs: usize,
}

/// The defaults: n = 1, 256 tokens, greedy, no stop strings, the default adapter, no
/// selection, no verifier. `prompt` is NULL and must be set.
///
/// Thread safety: any thread.
#[no_mangle]
pub extern "C" fn verity_generate_default_params() -> verity_generate_params {
    let r = Request::text("");
    verity_generate_params {
        prompt: std::ptr::null(),
        chat: false,
        n: r.n,
        max_tokens: r.max_tokens,
        temperature: r.sampling.temperature,
        top_p: r.sampling.top_p,
        top_k: r.sampling.top_k,
        min_p: r.sampling.min_p,
        seed: r.sampling.seed,
        stop: std::ptr::null(),
        n_stop: 0,
        ignore_eos: r.ignore_eos,
        adapter: std::ptr::null(),
        selection: std::ptr::null(),
        verifier: std::ptr::null(),
        reference: std::ptr::null(),
        top_logprobs: r.top_logprobs,
    }
}

unsafe fn generate_request(
    params: *const verity_generate_params,
) -> std::result::Result<GenerateRequest, Fail> {
    let p = params
        .as_ref()
        .ok_or_else(|| Fail::new(VERITY_ERR_NULL_POINTER, "params is NULL"))?;
    let text = arg_str(p.prompt, "params.prompt")?.to_string();
    let range = |v: usize, lo: usize, hi: usize, what: &str| -> Outcome {
        if (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err(Fail::new(
                VERITY_ERR_OUT_OF_RANGE,
                format!("{what} is {v}; it must be in {lo}..={hi}"),
            ))
        }
    };
    range(p.n, 1, VERITY_MAX_SAMPLES, "params.n")?;
    range(p.max_tokens, 1, 1 << 24, "params.max_tokens")?;
    range(p.n_stop, 0, VERITY_MAX_STOP_STRINGS, "params.n_stop")?;
    range(
        p.top_logprobs,
        0,
        VERITY_MAX_TOP_LOGPROBS,
        "params.top_logprobs",
    )?;
    let mut stop = Vec::with_capacity(p.n_stop);
    if p.n_stop > 0 {
        if p.stop.is_null() {
            return Err(Fail::new(
                VERITY_ERR_NULL_POINTER,
                "params.stop is NULL but params.n_stop > 0",
            ));
        }
        for i in 0..p.n_stop {
            stop.push(arg_str(*p.stop.add(i), &format!("params.stop[{i}]"))?.to_string());
        }
    }
    let prompt = if p.chat {
        Prompt::Chat(vec![ChatMessage::new("user", text)])
    } else {
        Prompt::Text(text)
    };
    let mut request = Request::new(prompt);
    request.n = p.n;
    request.max_tokens = p.max_tokens;
    request.sampling.temperature = p.temperature;
    request.sampling.top_p = p.top_p;
    request.sampling.top_k = p.top_k;
    request.sampling.min_p = p.min_p;
    request.sampling.seed = p.seed;
    request.stop = stop;
    request.ignore_eos = p.ignore_eos;
    request.top_logprobs = p.top_logprobs;
    let adapter = opt_str(p.adapter, "params.adapter")?.map(str::to_string);
    let selection = match opt_str(p.selection, "params.selection")? {
        Some(rule) => Some(rule.parse().map_err(|e: crate::select::ParseRuleError| {
            Fail::new(VERITY_ERR_INVALID_ARGUMENT, e.to_string())
        })?),
        None => None,
    };
    let verifier = opt_str(p.verifier, "params.verifier")?;
    let reference = opt_str(p.reference, "params.reference")?;
    let verify = match (verifier, reference) {
        (Some(v), Some(r)) => Some((v.to_string(), r.to_string())),
        (None, None) => None,
        _ => {
            return Err(Fail::new(
                VERITY_ERR_INVALID_ARGUMENT,
                "params.verifier and params.reference go together: set both or neither",
            ))
        }
    };
    // Checked here so that a bad request fails before any work.
    request.validate()?;
    Ok(GenerateRequest {
        adapter,
        selection,
        verify,
        ..GenerateRequest::new(request)
    })
}

/// Statistics of one generated token, from the logits of the step that produced it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct verity_token_stats {
    /// Natural-log probability of the chosen token.
    pub logprob: f32,
    /// Entropy of the next-token distribution (nats).
    pub entropy: f32,
    /// KL(uniform || p) = logsumexp(z) - mean(z) - log V.
    pub self_certainty: f32,
    /// DeepConf token confidence.
    pub confidence: f32,
}

/// Called for every generated token of a streaming request, on the thread that called
/// `verity_generate_stream`: the sample's index, the token id, the text it completed (may
/// be empty while a character or a possible stop string is incomplete; `text_len` bytes,
/// NUL-terminated), its statistics, and the caller's `user_data`. Return 0 to go on,
/// anything else to cancel the request. Pointers are valid during the call only. It must
/// not unwind (no C++ exceptions, no longjmp).
pub type verity_token_callback = Option<
    unsafe extern "C" fn(
        trace: usize,
        token: i32,
        text: *const c_char,
        text_len: usize,
        stats: *const verity_token_stats,
        user_data: *mut c_void,
    ) -> c_int,
>;

/// Generates `params->n` traces of a prompt, scores them, applies the selection rule and
/// the verifier, and records the traces for feedback. Blocks until done. On success
/// `*out` is a new result; free it with `verity_result_free`.
///
/// Thread safety: any thread; concurrent calls on one runtime are batched together.
#[no_mangle]
pub unsafe extern "C" fn verity_generate(
    rt: *const verity_runtime,
    params: *const verity_generate_params,
    out: *mut *mut verity_result,
) -> verity_status {
    verity_generate_stream(rt, params, None, std::ptr::null_mut(), out)
}

/// `verity_generate` calling `callback` (may be NULL) for every token as it is generated.
/// When the callback returns nonzero the request is cancelled: the call returns
/// `VERITY_ERR_CANCELLED` *and* sets `*out` to the result so far (traces ended as
/// `VERITY_FINISH_ABORTED` where they were cut), which must be freed like any other.
///
/// Thread safety: any thread; the callback runs on the calling thread.
#[no_mangle]
pub unsafe extern "C" fn verity_generate_stream(
    rt: *const verity_runtime,
    params: *const verity_generate_params,
    callback: verity_token_callback,
    user_data: *mut c_void,
    out: *mut *mut verity_result,
) -> verity_status {
    ffi_call(|| {
        let rt = runtime_of(rt)?;
        let out = self::out(out, "out")?;
        let request = generate_request(params)?;
        let mut generation = rt.submit(request)?;
        let mut cancelled = false;
        let result = loop {
            match generation.blocking_next() {
                Some(Ok(GenerationEvent::Token {
                    index,
                    token,
                    text,
                    stats,
                })) => {
                    let Some(callback) = callback else { continue };
                    if cancelled {
                        continue;
                    }
                    let len = text.len();
                    let mut bytes = text.into_bytes();
                    bytes.push(0);
                    let stats = verity_token_stats {
                        logprob: stats.logprob,
                        entropy: stats.entropy,
                        self_certainty: stats.self_certainty,
                        confidence: stats.confidence,
                    };
                    let stop = callback(
                        index,
                        token as i32,
                        bytes.as_ptr().cast(),
                        len,
                        &stats,
                        user_data,
                    );
                    if stop != 0 {
                        cancelled = true;
                        generation.abort();
                    }
                }
                Some(Ok(GenerationEvent::Finished(result))) => break *result,
                Some(Err(e)) => return Err(e.into()),
                None => return Err(Error::Unavailable("the runtime stopped".into()).into()),
            }
        };
        *out = new_handle(Object::Result(Arc::new(ResultData::new(result)))) as *mut verity_result;
        if cancelled {
            Err(Fail::new(
                VERITY_ERR_CANCELLED,
                "the token callback cancelled the request; *out holds the traces so far",
            ))
        } else {
            Ok(())
        }
    })
}
