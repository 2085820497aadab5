//! `verity generate`: one completion (an n = 1 request to the runtime), streamed to stdout.

use std::ffi::OsString;
use std::io::Write;
use std::time::Instant;

use verity::engine::Request;
use verity::runtime::BASE_ADAPTER;
use verity::sampling::SamplingParams;
use verity::{ChatMessage, GenerateRequest, GenerationEvent};

use crate::args::{chat_prompt, utf8_prompt, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (raw text, or the user message with --chat).
    #[arg(long)]
    prompt: OsString,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Extra chat-template variables as a JSON object (with --chat), e.g.
    /// '{"enable_thinking": false}' for Qwen3.
    #[arg(long, requires = "chat")]
    chat_template_kwargs: Option<String>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print per-token statistics (log-prob, entropy, self-certainty, confidence) to stderr.
    #[arg(long)]
    stats: bool,
}

pub fn run(args: Args) -> Result<(), String> {
    let prompt = utf8_prompt(args.prompt)?;
    let runtime = ModelArgs::build(args.model.config())?;
    let mut request = if args.chat {
        let mut messages = Vec::new();
        if let Some(s) = args.system {
            messages.push(ChatMessage::system(s));
        }
        messages.push(ChatMessage::user(prompt));
        Request::new(chat_prompt(messages, args.chat_template_kwargs.as_deref())?)
    } else {
        Request::text(prompt)
    };
    request.max_tokens = args.max_tokens;
    request.sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        seed: args.seed,
    };
    let start = Instant::now();
    let mut generation = runtime
        .submit(GenerateRequest {
            adapter: Some(BASE_ADAPTER.into()),
            remember: false,
            ..GenerateRequest::new(request)
        })
        .map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    let mut first_token = None;
    let result = loop {
        match generation.blocking_next() {
            Some(Ok(GenerationEvent::Token { text, stats, .. })) => {
                first_token.get_or_insert_with(Instant::now);
                if args.stats {
                    eprintln!(
                        "[logprob {:.3} entropy {:.3} self-certainty {:.3} conf {:.3}] {text:?}",
                        stats.logprob, stats.entropy, stats.self_certainty, stats.confidence
                    );
                }
                // A closed stdout (`| head`) stops the generation.
                if out
                    .write_all(text.as_bytes())
                    .and_then(|_| out.flush())
                    .is_err()
                {
                    generation.abort();
                }
            }
            Some(Ok(GenerationEvent::Finished(result))) => break result,
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the runtime stopped before the request finished".into()),
        }
    };
    let _ = writeln!(out);
    let trace = &result.traces[0].trace;
    let first = first_token.unwrap_or_else(Instant::now);
    let decode_tokens = trace.tokens.len().saturating_sub(1);
    let decode_seconds = first.elapsed().as_secs_f64();
    eprintln!(
        "[{} prompt tokens in {:.0} ms; {} tokens, {:.1} tok/s; finish: {:?}]",
        result.prompt_tokens,
        (first - start).as_secs_f64() * 1e3,
        trace.tokens.len(),
        if decode_tokens > 0 && decode_seconds > 0.0 {
            decode_tokens as f64 / decode_seconds
        } else {
            0.0
        },
        trace.finish
    );
    Ok(())
}
