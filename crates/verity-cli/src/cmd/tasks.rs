//! `verity tasks`: synthetic verifiable tasks written as JSONL.

use std::path::PathBuf;

use verity_cli::tasks::{generate, TaskKind};

#[derive(clap::Args)]
pub struct Args {
    /// arithmetic, count_letter, sort_list, linear_equation, reverse_word
    #[arg(long, default_value = "arithmetic")]
    kind: String,
    #[arg(long, default_value_t = 2)]
    difficulty: u32,
    #[arg(long, default_value_t = 100)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> Result<(), String> {
    let kind: TaskKind = args.kind.parse().map_err(|e| format!("--kind: {e}"))?;
    let items = generate(kind, args.difficulty, args.n, args.seed);
    let mut text = String::new();
    for item in &items {
        text.push_str(&item.to_json_line().map_err(|e| e.to_string())?);
        text.push('\n');
    }
    std::fs::write(&args.out, text).map_err(|e| format!("{}: {e}", args.out.display()))?;
    eprintln!(
        "wrote {} {kind} tasks (difficulty {}) to {}",
        items.len(),
        args.difficulty,
        args.out.display()
    );
    Ok(())
}
