//! The `verity` command line: `generate` streams a completion, `info` describes a model,
//! `sample`/`eval`/`tasks`/`rl` run the reasoning and learning loops, `serve` the HTTP API,
//! `bench` measures decode speed, logits and trainer steps. Every subcommand builds its runtime through
//! [`args::ModelArgs`] (model, device, weight format) and lives in its own file in `cmd/`.

mod args;
mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "verity",
    version,
    about = "An embeddable inference-time reasoning runtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion and stream it to stdout.
    Generate(cmd::generate::Args),
    /// Describe a model: architecture, sizes, weight types, tokenizer, chat template, device.
    Info(cmd::info::Args),
    /// Draw n samples of one prompt (prefilled once) and print every trace with its scores.
    Sample(cmd::sample::Args),
    /// Accuracy of selection rules on a JSONL data set (GSM8K format).
    Eval(cmd::eval::Args),
    /// Write synthetic verifiable tasks as JSONL (question/answer, GSM8K style).
    Tasks(cmd::tasks::Args),
    /// Learn a LoRA adapter online from rollouts (GRPO), with held-out evaluation.
    Rl(cmd::rl::Args),
    /// Benchmarks and the measurements the GPU check compares (decode, logits, train).
    Bench {
        #[command(subcommand)]
        what: cmd::bench::Command,
    },
    /// Serve the OpenAI-compatible HTTP API (plus feedback, learning, adapters, metrics).
    Serve(cmd::serve::Args),
}

fn main() -> ExitCode {
    verity::pin_thread_count();
    verity::bound_malloc_arenas(2);
    let result = match Cli::parse().command {
        Command::Generate(a) => cmd::generate::run(a),
        Command::Info(a) => cmd::info::run(a),
        Command::Sample(a) => cmd::sample::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Tasks(a) => cmd::tasks::run(a),
        Command::Rl(a) => cmd::rl::run(a),
        Command::Bench { what } => cmd::bench::run(what),
        Command::Serve(a) => cmd::serve::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
