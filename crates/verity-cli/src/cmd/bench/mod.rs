//! `verity bench`: measurements through the runtime, each with an optional JSON report for
//! scripts (`scripts/gpu-check.sh` reads them): decode and prefill speed, the logits of given token ids,
//! GRPO trainer steps, and a helper that writes a model's tokenizer as a Hugging Face folder
//! (for random-weight models made elsewhere).

mod decode;
mod logits;
mod prefill;
mod tokenizer;
mod train;

use std::path::Path;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Decode tokens/s by batch size, n samples vs independent requests, cost of the stats.
    Decode(decode::Args),
    /// Prompt tokens/s: the time from a prompt to its first new token.
    Prefill(prefill::Args),
    /// The last prompt position's logits row for given token ids and a greedy continuation
    /// (with log-probs and per-token statistics), directly and through the engine.
    Logits(logits::Args),
    /// Time GRPO trainer steps on synthetic rollouts (and the hand-off to the decoder).
    Train(train::Args),
    /// Write a model's tokenizer as `tokenizer.json` + `tokenizer_config.json` in a folder.
    Tokenizer(tokenizer::Args),
}

pub fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Decode(a) => decode::run(a),
        Command::Prefill(a) => prefill::run(a),
        Command::Logits(a) => logits::run(a),
        Command::Train(a) => train::run(a),
        Command::Tokenizer(a) => tokenizer::run(a),
    }
}

/// Writes `value` as pretty JSON to `path` (through a temporary file, so that a reader, or
/// a run killed by a timeout, never sees half a file).
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A comma-separated list of numbers, or an error naming `flag`.
pub(crate) fn parse_list<T: std::str::FromStr>(list: &str, flag: &str) -> Result<Vec<T>, String> {
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| format!("{flag}: '{}' is not a number", s.trim()))
        })
        .collect()
}
