//! OpenAI-compatible request and response bodies (`/v1/completions`,
//! `/v1/chat/completions`), their validation, and the `verity` extension field.
//!
//! Unknown top-level fields are refused (a misspelt `max_token` must not be ignored), as
//! are OpenAI features verity does not have (tools, response formats, `echo`, `best_of`).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use verity::chat::ChatMessage;
use verity::engine::{FinishReason, Penalties, Prompt, Request};
use verity::runtime::{GenerateRequest, GenerateResult, GeneratedTrace};
use verity::sampling::SamplingParams;
use verity::select::SelectionRule;
use verity::tokenizer::Tokenizer;

/// Limits the server enforces on a request.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_n: usize,
    pub max_tokens: usize,
    pub max_top_logprobs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_n: 64,
            max_tokens: 4096,
            max_top_logprobs: 20,
        }
    }
}

/// A 400 with a message naming the parameter at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRequest {
    pub message: String,
    pub param: Option<String>,
}

fn bad(param: &str, message: impl Into<String>) -> BadRequest {
    BadRequest {
        message: message.into(),
        param: Some(param.to_string()),
    }
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

/// `prompt`: a string, a list with one string, or token ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

/// The `verity` extension of a request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerityOptions {
    /// A selection rule ("majority", "borda:0.5", "max:self_certainty", ...). The
    /// sequential rules ("esc:4", "adaptive:0.95", "deepconf-online:8:90:64:0.95") draw
    /// the n samples a few at a time and stop once the answer is settled; DeepConf online
    /// also stops each sample after its warm-up whose confidence falls below the warm-up's
    /// threshold, and starts the next in its place.
    pub selection: Option<String>,
    /// Samples decoding at once under a sequential rule (default: the ESC window; 4 for
    /// adaptive; DeepConf online's warm-up).
    pub parallel: Option<usize>,
    /// Per-token statistics and trace scores in the response.
    #[serde(default)]
    pub return_scores: bool,
    /// Adapter id; "base" for none; absent for the server's default.
    pub adapter: Option<String>,
    /// Verifier name and reference answer: rewards recorded as feedback.
    pub verifier: Option<String>,
    pub reference: Option<String>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// Extra chat-template variables (`{"enable_thinking": false}`); chat requests only.
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

/// Fields both endpoints share.
#[derive(Debug, Clone)]
pub struct Common {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<usize>,
    pub stop: Option<StopField>,
    pub seed: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<Value>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub verity: Option<VerityOptions>,
}

/// Declares a request body: its own fields, then the ones both endpoints share, with
/// `common()` copying the shared ones out. (serde's `flatten` cannot be combined with
/// `deny_unknown_fields`, hence one macro instead of a flattened `Common`.)
macro_rules! request_body {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            pub model: Option<String>,
            pub max_tokens: Option<usize>,
            pub temperature: Option<f32>,
            pub top_p: Option<f32>,
            pub n: Option<usize>,
            pub stop: Option<StopField>,
            pub seed: Option<i64>,
            pub stream: Option<bool>,
            pub stream_options: Option<Value>,
            pub frequency_penalty: Option<f32>,
            pub presence_penalty: Option<f32>,
            pub logit_bias: Option<HashMap<String, f32>>,
            /// Accepted for compatibility (an end-user id); not used.
            #[allow(dead_code)]
            pub user: Option<String>,
            pub verity: Option<VerityOptions>,
        }

        impl $name {
            pub fn common(&self) -> Common {
                Common {
                    max_tokens: self.max_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    n: self.n,
                    stop: self.stop.clone(),
                    seed: self.seed,
                    stream: self.stream,
                    stream_options: self.stream_options.clone(),
                    frequency_penalty: self.frequency_penalty,
                    presence_penalty: self.presence_penalty,
                    logit_bias: self.logit_bias.clone(),
                    verity: self.verity.clone(),
                }
            }
        }
    };
}

request_body!(
    /// `POST /v1/completions`.
    CompletionBody {
        prompt: PromptField,
        logprobs: Option<usize>,
        echo: Option<bool>,
        best_of: Option<usize>,
        suffix: Option<String>,
    }
);

request_body!(
    /// `POST /v1/chat/completions`.
    ChatBody {
        messages: Vec<ChatMessageBody>,
        logprobs: Option<bool>,
        top_logprobs: Option<usize>,
        max_completion_tokens: Option<usize>,
        /// Extra chat-template variables, vLLM's field (`{"enable_thinking": false}`).
        chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    }
);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessageBody {
    pub role: String,
    pub content: Option<Value>,
    /// Accepted for compatibility; chat templates have no place for it.
    #[allow(dead_code)]
    pub name: Option<String>,
}

/// A validated request, ready for the runtime.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub request: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    /// Top alternatives per token asked for (0 with logprobs only); `None` = no logprobs.
    pub logprobs: Option<usize>,
    pub return_scores: bool,
}

/// Parses JSON into `T`, turning serde's message into a 400.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, BadRequest> {
    serde_json::from_slice(bytes).map_err(|e| BadRequest {
        message: format!("invalid request body: {e}"),
        param: None,
    })
}

pub fn parse_completion(
    body: &CompletionBody,
    limits: &Limits,
    tokenizer: &Tokenizer,
) -> Result<Parsed, BadRequest> {
    if body.echo == Some(true) {
        return Err(bad("echo", "echo is not supported"));
    }
    if body.best_of.is_some_and(|b| b > 1) {
        return Err(bad(
            "best_of",
            "best_of is not supported; use n with verity.selection",
        ));
    }
    if body.suffix.is_some() {
        return Err(bad("suffix", "suffix is not supported"));
    }
    let prompt = match &body.prompt {
        PromptField::Text(t) => Prompt::Text(t.clone()),
        PromptField::Texts(t) if t.len() == 1 => Prompt::Text(t[0].clone()),
        PromptField::Texts(_) => {
            return Err(bad(
                "prompt",
                "a list of prompts is not supported: send one prompt per request",
            ))
        }
        PromptField::Tokens(ids) => Prompt::Tokens(ids.clone()),
    };
    if let Some(k) = body.logprobs {
        if k > limits.max_top_logprobs {
            return Err(bad(
                "logprobs",
                format!("logprobs must be at most {}", limits.max_top_logprobs),
            ));
        }
    }
    if body
        .verity
        .as_ref()
        .is_some_and(|v| v.chat_template_kwargs.is_some())
    {
        return Err(bad(
            "verity.chat_template_kwargs",
            "chat_template_kwargs applies to /v1/chat/completions",
        ));
    }
    build(prompt, &body.common(), body.logprobs, 16, limits, tokenizer)
}

pub fn parse_chat(
    body: &ChatBody,
    limits: &Limits,
    tokenizer: &Tokenizer,
) -> Result<Parsed, BadRequest> {
    if body.messages.is_empty() {
        return Err(bad("messages", "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer"
        ) {
            return Err(bad(
                &format!("messages[{i}].role"),
                format!(
                    "role '{}' is not supported (system, developer, user, assistant)",
                    m.role
                ),
            ));
        }
        let role = if m.role == "developer" {
            "system"
        } else {
            &m.role
        };
        let content = match &m.content {
            // Only an assistant turn may be empty (OpenAI's tool-call turns have no text).
            None | Some(Value::Null) if m.role == "assistant" => String::new(),
            None | Some(Value::Null) => {
                return Err(bad(
                    &format!("messages[{i}].content"),
                    "a user or system message needs content",
                ))
            }
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => text.push_str(t),
                        _ => {
                            return Err(bad(
                                &format!("messages[{i}].content"),
                                "only text content parts are supported",
                            ))
                        }
                    }
                }
                text
            }
            Some(_) => {
                return Err(bad(
                    &format!("messages[{i}].content"),
                    "content must be a string or a list of text parts",
                ))
            }
        };
        messages.push(ChatMessage::new(role, content));
    }
    let logprobs = match (body.logprobs, body.top_logprobs) {
        (Some(true), k) => Some(k.unwrap_or(0)),
        (_, Some(_)) => return Err(bad("top_logprobs", "top_logprobs needs logprobs: true")),
        _ => None,
    };
    if logprobs.is_some_and(|k| k > limits.max_top_logprobs) {
        return Err(bad(
            "top_logprobs",
            format!("top_logprobs must be at most {}", limits.max_top_logprobs),
        ));
    }
    let mut common = body.common();
    if common.max_tokens.is_none() {
        common.max_tokens = body.max_completion_tokens;
    }
    let default_max = limits.max_tokens.min(512);
    let ext_kwargs = common
        .verity
        .as_ref()
        .and_then(|v| v.chat_template_kwargs.clone());
    let prompt = match (body.chat_template_kwargs.clone(), ext_kwargs) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "chat_template_kwargs",
                "give chat_template_kwargs once: at the top level or in verity, not both",
            ))
        }
        (Some(kwargs), None) | (None, Some(kwargs)) => Prompt::ChatWith(messages, kwargs),
        (None, None) => Prompt::Chat(messages),
    };
    build(prompt, &common, logprobs, default_max, limits, tokenizer)
}

fn build(
    prompt: Prompt,
    c: &Common,
    logprobs: Option<usize>,
    default_max_tokens: usize,
    limits: &Limits,
    tokenizer: &Tokenizer,
) -> Result<Parsed, BadRequest> {
    let n = c.n.unwrap_or(1);
    if n == 0 || n > limits.max_n {
        return Err(bad("n", format!("n must be in 1..={}", limits.max_n)));
    }
    let max_tokens = c.max_tokens.unwrap_or(default_max_tokens);
    if max_tokens == 0 || max_tokens > limits.max_tokens {
        return Err(bad(
            "max_tokens",
            format!("max_tokens must be in 1..={}", limits.max_tokens),
        ));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad("temperature", "temperature must be in [0, 2]"));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad("top_p", "top_p must be in (0, 1]"));
    }
    for (name, v) in [
        ("frequency_penalty", c.frequency_penalty),
        ("presence_penalty", c.presence_penalty),
    ] {
        if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(bad(name, format!("{name} must be in [-2, 2]")));
        }
    }
    let stop = match &c.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty()) {
        return Err(bad("stop", "stop takes at most 4 non-empty strings"));
    }
    let mut logit_bias = HashMap::new();
    for (k, v) in c.logit_bias.iter().flatten() {
        let id: u32 = k
            .parse()
            .ok()
            .filter(|&id: &u32| (id as usize) < tokenizer.vocab_size())
            .ok_or_else(|| bad("logit_bias", format!("'{k}' is not a token id")))?;
        if !(-100.0..=100.0).contains(v) {
            return Err(bad("logit_bias", "biases must be in [-100, 100]"));
        }
        logit_bias.insert(id, *v);
    }
    let ext = c.verity.clone().unwrap_or_default();
    let selection = match &ext.selection {
        Some(s) => Some(
            s.parse::<SelectionRule>()
                .map_err(|e| bad("verity.selection", e.to_string()))?,
        ),
        None => None,
    };
    let verify = match (&ext.verifier, &ext.reference) {
        (Some(v), Some(r)) => Some((v.clone(), r.clone())),
        (None, None) => None,
        _ => return Err(bad("verity.verifier", "verifier and reference go together")),
    };
    if ext.min_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
        return Err(bad("verity.min_p", "min_p must be in [0, 1]"));
    }
    if ext.repetition_penalty.is_some_and(|p| p <= 0.0) {
        return Err(bad(
            "verity.repetition_penalty",
            "repetition_penalty must be positive",
        ));
    }
    let mut request = Request::new(prompt);
    request.n = n;
    request.max_tokens = max_tokens;
    request.stop = stop;
    request.top_logprobs = logprobs.unwrap_or(0);
    request.sampling = SamplingParams {
        temperature,
        top_p,
        top_k: ext.top_k.unwrap_or(0),
        min_p: ext.min_p.unwrap_or(0.0),
        // A request without a seed gets a fresh one, as OpenAI's API does.
        seed: c.seed.map(|s| s as u64).unwrap_or_else(random_seed),
    };
    request.penalties = Penalties {
        repetition: ext.repetition_penalty.unwrap_or(1.0),
        frequency: c.frequency_penalty.unwrap_or(0.0),
        presence: c.presence_penalty.unwrap_or(0.0),
        logit_bias,
    };
    let include_usage = match &c.stream_options {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            if let Some(key) = o.keys().find(|k| k.as_str() != "include_usage") {
                return Err(bad(
                    "stream_options",
                    format!("unknown field '{key}' (include_usage)"),
                ));
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(bad(
                        "stream_options.include_usage",
                        "include_usage must be true or false",
                    ))
                }
            }
        }
        Some(_) => {
            return Err(bad(
                "stream_options",
                "stream_options must be an object like {\"include_usage\": true}",
            ))
        }
    };
    if ext.parallel.is_some() && !selection.is_some_and(|s| s.is_sequential()) {
        return Err(bad(
            "verity.parallel",
            "parallel applies to a sequential selection rule (esc, adaptive, deepconf-online)",
        ));
    }
    if ext.parallel == Some(0) {
        return Err(bad("verity.parallel", "parallel must be at least 1"));
    }
    Ok(Parsed {
        request: GenerateRequest {
            adapter: ext.adapter.clone(),
            selection,
            parallel: ext.parallel,
            verify,
            ..GenerateRequest::new(request)
        },
        stream: c.stream.unwrap_or(false),
        include_usage,
        logprobs,
        return_scores: ext.return_scores,
    })
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// OpenAI's finish reasons; verity's own is in the extension.
pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

/// The text of one token, as the logprobs objects show it.
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tokenizer.token_bytes(id).to_vec();
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

fn chat_logprobs(tokenizer: &Tokenizer, t: &GeneratedTrace) -> Value {
    let content: Vec<Value> = t
        .trace
        .tokens
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let (text, bytes) = token_text(tokenizer, id);
            let top: Vec<Value> = t
                .trace
                .top_logprobs
                .get(i)
                .into_iter()
                .flatten()
                .map(|&(alt, lp)| {
                    let (text, bytes) = token_text(tokenizer, alt);
                    json!({"token": text, "logprob": lp, "bytes": bytes})
                })
                .collect();
            json!({
                "token": text,
                "logprob": t.trace.stats.get(i).map(|s| s.logprob).unwrap_or(0.0),
                "bytes": bytes,
                "top_logprobs": top,
            })
        })
        .collect();
    json!({ "content": content })
}

fn completion_logprobs(tokenizer: &Tokenizer, t: &GeneratedTrace) -> Value {
    let mut tokens = Vec::new();
    let mut offsets = Vec::new();
    let mut top = Vec::new();
    let mut start = 0;
    for (i, &id) in t.trace.tokens.iter().enumerate() {
        tokens.push(token_text(tokenizer, id).0);
        offsets.push(start);
        start = t.trace.token_end.get(i).copied().unwrap_or(start);
        let alts: BTreeMap<String, f32> = t
            .trace
            .top_logprobs
            .get(i)
            .into_iter()
            .flatten()
            .map(|&(alt, lp)| (token_text(tokenizer, alt).0, lp))
            .collect();
        top.push(alts);
    }
    let logprobs: Vec<f32> = t.trace.stats.iter().map(|s| s.logprob).collect();
    json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// The `verity` field of a response.
pub fn verity_field(result: &GenerateResult, adapter_version: u64, scores: bool) -> Value {
    let traces: Vec<Value> = result
        .traces
        .iter()
        .map(|t| {
            let mut v = json!({
                "id": t.id,
                "index": t.trace.index,
                "finish_reason": t.trace.finish,
                "answer": t.answer,
                "reward": t.reward,
                "adapter_version": t.trace.adapter_version,
            });
            if scores {
                v["scores"] = json!(t.scores);
                v["token_stats"] = json!(t.trace.stats);
            }
            v
        })
        .collect();
    json!({
        "request_id": result.request_id,
        "adapter": result.adapter,
        "adapter_version": adapter_version,
        "selection": result.selection,
        "selected": result.selected,
        "answer": result.answer,
        "votes": result.votes,
        "settled_after": result.settled_after,
        "traces": traces,
    })
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn of(result: &GenerateResult) -> Self {
        let completion: usize = result.traces.iter().map(|t| t.trace.tokens.len()).sum();
        Usage {
            prompt_tokens: result.prompt_tokens,
            completion_tokens: completion,
            total_tokens: result.prompt_tokens + completion,
        }
    }
}

/// What a response needs besides the result.
pub struct ResponseMeta<'a> {
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub logprobs: Option<usize>,
    pub return_scores: bool,
    pub adapter_version: u64,
}

pub fn chat_response(tokenizer: &Tokenizer, m: &ResponseMeta, result: &GenerateResult) -> Value {
    let choices: Vec<Value> = result
        .traces
        .iter()
        .map(|t| {
            json!({
                "index": t.trace.index,
                "message": {"role": "assistant", "content": t.trace.text},
                "logprobs": m.logprobs.map(|_| chat_logprobs(tokenizer, t)),
                "finish_reason": finish_reason(t.trace.finish),
            })
        })
        .collect();
    json!({
        "id": m.id,
        "object": "chat.completion",
        "created": m.created,
        "model": m.model,
        "choices": choices,
        "usage": Usage::of(result),
        "system_fingerprint": null,
        "verity": verity_field(result, m.adapter_version, m.return_scores),
    })
}

pub fn completion_response(
    tokenizer: &Tokenizer,
    m: &ResponseMeta,
    result: &GenerateResult,
) -> Value {
    let choices: Vec<Value> = result
        .traces
        .iter()
        .map(|t| {
            json!({
                "index": t.trace.index,
                "text": t.trace.text,
                "logprobs": m.logprobs.map(|_| completion_logprobs(tokenizer, t)),
                "finish_reason": finish_reason(t.trace.finish),
            })
        })
        .collect();
    json!({
        "id": m.id,
        "object": "text_completion",
        "created": m.created,
        "model": m.model,
        "choices": choices,
        "usage": Usage::of(result),
        "verity": verity_field(result, m.adapter_version, m.return_scores),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_and_prompt_fields_take_both_shapes() {
        let one: StopField = serde_json::from_str("\"x\"").unwrap();
        assert!(matches!(one, StopField::One(s) if s == "x"));
        let many: StopField = serde_json::from_str("[\"a\",\"b\"]").unwrap();
        assert!(matches!(many, StopField::Many(v) if v.len() == 2));
        let ids: PromptField = serde_json::from_str("[1,2,3]").unwrap();
        assert!(matches!(ids, PromptField::Tokens(v) if v == vec![1, 2, 3]));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = parse_body::<CompletionBody>(br#"{"prompt":"x","max_token":3}"#).unwrap_err();
        assert!(err.message.contains("max_token"), "{}", err.message);
        let err =
            parse_body::<ChatBody>(br#"{"messages":[],"verity":{"selektion":"x"}}"#).unwrap_err();
        assert!(err.message.contains("selektion"), "{}", err.message);
    }
}
