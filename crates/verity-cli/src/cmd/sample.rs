//! `verity sample`: n samples of one prompt (prefilled once), every trace with its scores,
//! and the answer a selection rule picks.

use std::ffi::OsString;
use std::time::Instant;

use serde_json::json;
use verity::engine::Request;
use verity::runtime::BASE_ADAPTER;
use verity::sampling::SamplingParams;
use verity::select::SelectionRule;
use verity::{ChatMessage, GenerateRequest, GenerateResult};

use crate::args::{chat_prompt, utf8_prompt, ModelArgs};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    prompt: OsString,
    #[arg(long)]
    chat: bool,
    /// Extra chat-template variables as a JSON object (with --chat), e.g.
    /// '{"enable_thinking": false}' for Qwen3.
    #[arg(long, requires = "chat")]
    chat_template_kwargs: Option<String>,
    #[arg(long, default_value_t = 8)]
    n: usize,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Selection rule applied to the traces (greedy, majority, borda:0.5, max:self_certainty, …).
    #[arg(long, default_value = "borda:0.5")]
    select: String,
    /// Print JSON (one object with every trace, its per-token stats and scores).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<(), String> {
    let prompt = utf8_prompt(args.prompt)?;
    let rule: SelectionRule = args.select.parse().map_err(|e| format!("--select: {e}"))?;
    let runtime = ModelArgs::build(args.model.config())?;
    let mut request = if args.chat {
        Request::new(chat_prompt(
            vec![ChatMessage::user(prompt)],
            args.chat_template_kwargs.as_deref(),
        )?)
    } else {
        Request::text(prompt)
    };
    request.n = args.n;
    request.max_tokens = args.max_tokens;
    request.sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        ..Default::default()
    };
    let start = Instant::now();
    let result = runtime
        .generate(GenerateRequest {
            adapter: Some(BASE_ADAPTER.into()),
            selection: Some(rule),
            remember: false,
            ..GenerateRequest::new(request)
        })
        .map_err(|e| e.to_string())?;
    let wall = start.elapsed().as_secs_f64();
    if args.json {
        print_json(&result, wall)
    } else {
        print_text(&result, wall);
        Ok(())
    }
}

fn print_json(result: &GenerateResult, wall: f64) -> Result<(), String> {
    let traces: Vec<serde_json::Value> = result
        .traces
        .iter()
        .map(|t| {
            json!({"index": t.trace.index, "text": t.trace.text, "tokens": t.trace.tokens,
                   "finish": t.trace.finish, "answer": t.answer, "scores": t.scores,
                   "token_stats": t.trace.stats})
        })
        .collect();
    let out = json!({
        "prompt_tokens": result.prompt_tokens,
        "traces": traces,
        "selection": {"rule": result.selection, "answer": result.answer,
                      "chosen": result.selected, "votes": result.votes},
        "wall_seconds": wall,
    });
    let text = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}

fn print_text(result: &GenerateResult, wall: f64) {
    for t in &result.traces {
        let scores: Vec<String> = t
            .scores
            .iter()
            .map(|(k, v)| format!("{k} {v:.3}"))
            .collect();
        println!(
            "── sample {} ({} tokens, {:?}; answer {}) {}",
            t.trace.index,
            t.trace.tokens.len(),
            t.trace.finish,
            t.answer.as_deref().unwrap_or("-"),
            scores.join(" · ")
        );
        println!("{}", t.trace.text.trim());
    }
    println!(
        "── {}: answer {} (sample {:?})",
        result.selection.as_deref().unwrap_or("-"),
        result.answer.as_deref().unwrap_or("none"),
        result.selected
    );
    let tokens = result.generated_tokens();
    eprintln!(
        "[{} samples, {tokens} tokens in {wall:.2} s: {:.1} tok/s; prompt of {} tokens prefilled once]",
        result.traces.len(),
        tokens as f64 / wall,
        result.prompt_tokens
    );
}
