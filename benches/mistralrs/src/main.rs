//! mistral.rs 0.8.1 decode throughput, measured the way `verity bench decode` measures verity.
//!
//! Same GGUF, same prompt tokens (the GSM8K duck-egg question in the model's chat template,
//! and its first 8 tokens for the batch-scaling rows), the same number of new tokens per
//! sequence (EOS is suppressed by a logits processor, since mistral.rs has no `ignore_eos`),
//! temperature 0.8, and the same clock: all requests of a row submitted at once, generated
//! tokens divided by the wall time until the last one finishes.
//!
//! Usage: `verity-mistralrs-bench MODEL.gguf [BATCHES (1,4,16,64)] [TOKENS (64)]`.
//! `run.sh` next to this crate builds it and prints both engines and their ratios.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use mistralrs::{
    CustomLogitsProcessor, GgufModelBuilder, Model, NormalRequest, Request, Response,
    SamplingParams, Tensor, TextMessageRole, TextMessages,
};

/// The question `verity bench decode` uses, with verity's `\boxed{}` instruction.
const QUESTION: &str = "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?";
const BOXED_INSTRUCTION: &str =
    " Please reason step by step, and put your final answer within \\boxed{}.";

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(model_path) = args.get(1) else {
        bail!("usage: {} MODEL.gguf [BATCHES] [TOKENS]", args[0]);
    };
    let batches: Vec<usize> = args
        .get(2)
        .map(String::as_str)
        .unwrap_or("1,4,16,64")
        .split(',')
        .map(|b| {
            b.trim()
                .parse()
                .context("batch sizes are comma-separated integers")
        })
        .collect::<Result<_>>()?;
    let tokens: usize = match args.get(3) {
        Some(t) => t.parse().context("TOKENS is an integer")?,
        None => 64,
    };
    let path = Path::new(model_path);
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let file = path
        .file_name()
        .context("MODEL is a path to a .gguf file")?
        .to_string_lossy()
        .into_owned();
    let max_batch = batches.iter().copied().max().unwrap_or(1).max(16);
    let model = GgufModelBuilder::new(dir.to_string_lossy(), vec![file])
        .with_force_cpu()
        .with_max_num_seqs(max_batch)
        .build()
        .await
        .with_context(|| format!("mistral.rs could not load {model_path}"))?;

    let messages = TextMessages::new().add_message(
        TextMessageRole::User,
        format!("{QUESTION}{BOXED_INSTRUCTION}"),
    );
    let prompt = model
        .tokenize(either::Either::Left(messages), None, true, true, None)
        .await?;
    let short = &prompt[..8.min(prompt.len())];
    let eos = eos_ids(&model, &prompt).await?;
    if std::env::var_os("VERBOSE").is_some() {
        eprintln!("suppressed: {eos:?}");
    }

    println!("mistral.rs 0.8.1, CPU, {}", path.display());
    println!(
        "decode, {tokens} new tokens per sequence after an {}-token prompt",
        short.len()
    );
    // One untimed request first: mistral.rs warms up its pipeline on the first request.
    throughput(&model, 1, 1, 8, short, &eos).await?;
    let mut single = None;
    for &b in &batches {
        let tps = throughput(&model, b, 1, tokens, short, &eos).await?;
        let base = *single.get_or_insert(tps);
        println!(
            "  batch {b:>3}: {tps:>8.1} tok/s  ({:.2}× batch 1)",
            tps / base
        );
    }
    println!(
        "GSM8K prompt of {} tokens (prefill included):",
        prompt.len()
    );
    let shared = throughput(&model, 1, 16, tokens, &prompt, &eos).await?;
    let independent = throughput(&model, 16, 1, tokens, &prompt, &eos).await?;
    println!(
        "  n = 16 of one prompt: {shared:.1} tok/s; 16 independent requests: {independent:.1} tok/s ({:.2}×)",
        shared / independent
    );
    Ok(())
}

/// The tokens that end a completion: the chat template's end-of-turn token (the last
/// special token of the rendered assistant header is not it, so ask the tokenizer) and the
/// usual end-of-text names.
async fn eos_ids(model: &Model, prompt: &[u32]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for name in [
        "<|im_end|>",
        "<|endoftext|>",
        "<|im_start|>",
        "</s>",
        "<s>",
        "<|eot_id|>",
    ] {
        let encoded = model
            .tokenize(
                either::Either::Right(name.to_string()),
                None,
                false,
                false,
                None,
            )
            .await?;
        if let [id] = encoded[..] {
            ids.push(id);
        }
    }
    if ids.is_empty() {
        bail!(
            "found no end-of-sequence token to suppress (prompt starts {:?})",
            &prompt[..prompt.len().min(4)]
        );
    }
    Ok(ids)
}

/// A logits processor that makes the `eos` tokens impossible. mistral.rs 0.8.1 accepts
/// `SamplingParams::logits_bias` but never applies it (checked: nothing reads the field),
/// so the bias has to be a processor. It costs one vocabulary-sized add per token.
fn suppress(eos: &[u32]) -> Arc<dyn CustomLogitsProcessor> {
    let eos = eos.to_vec();
    Arc::new(
        move |logits: &Tensor, _: &[u32]| -> mistralrs::Result<Tensor> {
            let n = logits.dims().last().copied().unwrap_or(0);
            let mut mask = vec![0f32; n];
            for &id in &eos {
                if let Some(m) = mask.get_mut(id as usize) {
                    *m = f32::NEG_INFINITY;
                }
            }
            let mask = Tensor::from_vec(mask, n, logits.device())?.to_dtype(logits.dtype())?;
            logits.broadcast_add(&mask)
        },
    )
}

/// Generated tokens per second for `requests` concurrent requests of `n` choices each.
async fn throughput(
    model: &Model,
    requests: usize,
    n: usize,
    tokens: usize,
    prompt: &[u32],
    eos: &[u32],
) -> Result<f64> {
    let sender = model.inner().get_sender(None)?;
    let start = Instant::now();
    let mut receivers = Vec::with_capacity(requests);
    for i in 0..requests {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut sampling = SamplingParams::neutral();
        sampling.temperature = Some(0.8);
        sampling.max_len = Some(tokens);
        sampling.n_choices = n;
        let mut request = NormalRequest::new_simple(
            mistralrs::core::RequestMessage::CompletionTokens(prompt.to_vec()),
            sampling,
            tx,
            i,
            None,
            None,
        );
        request.logits_processors = Some(vec![suppress(eos)]);
        let request = Request::Normal(Box::new(request));
        sender.send(request).await?;
        receivers.push(rx);
    }
    let mut generated = 0;
    for mut rx in receivers {
        match rx.recv().await {
            Some(Response::CompletionDone(done)) => {
                // `usage` counts one choice's tokens; with EOS suppressed every choice runs
                // to `tokens`, which the finish reasons confirm.
                if let Some(c) = done.choices.iter().find(|c| c.finish_reason != "length") {
                    bail!(
                        "a mistral.rs sequence ended early ({}) after {} tokens",
                        c.finish_reason,
                        done.usage.completion_tokens
                    );
                }
                generated += done.choices.len() * done.usage.completion_tokens;
            }
            Some(Response::CompletionModelError(e, _)) => bail!("mistral.rs model error: {e}"),
            Some(Response::InternalError(e)) | Some(Response::ValidationError(e)) => {
                bail!("mistral.rs error: {e}")
            }
            Some(_) => bail!("unexpected mistral.rs response"),
            None => bail!("mistral.rs closed the response channel"),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    // EOS is suppressed, so every sequence runs to `tokens`; a shortfall would make the
    // comparison unfair to mistral.rs.
    if generated != requests * n * tokens {
        bail!(
            "mistral.rs generated {generated} tokens, expected {} ({requests} requests × {n} × {tokens})",
            requests * n * tokens
        );
    }
    Ok(generated as f64 / elapsed)
}
