//! The `verity` command line: `generate` streams a completion, `info` describes a model.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use verity::generate::generate;
use verity::sampling::SamplingParams;
use verity::{ChatMessage, LoadOptions, Model, WeightFormat};

const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

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

#[derive(clap::Args)]
struct ModelArgs {
    /// A GGUF file or a Hugging Face model folder.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Dequantize weights to dense tensors instead of running on quantized blocks.
    #[arg(long)]
    dense: bool,
}

impl ModelArgs {
    fn load(&self) -> Result<Model, String> {
        if !self.model.exists() && self.model.as_os_str() == DEFAULT_MODEL {
            return Err(format!(
                "{DEFAULT_MODEL} is missing: run `models/fetch.sh` first to get the default model"
            ));
        }
        let options = LoadOptions {
            format: if self.dense {
                WeightFormat::Dense
            } else {
                WeightFormat::Quantized
            },
            ..LoadOptions::default()
        };
        Model::load(&self.model, &options).map_err(|e| e.to_string())
    }
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion and stream it to stdout.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// The prompt (raw text, or the user message with --chat).
        #[arg(long)]
        prompt: OsString,
        /// Render the prompt as a user message with the model's chat template.
        #[arg(long)]
        chat: bool,
        /// A system message (with --chat).
        #[arg(long)]
        system: Option<String>,
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
    },
    /// Describe a model: architecture, sizes, weight types, tokenizer, chat template.
    Info {
        #[command(flatten)]
        model: ModelArgs,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Generate {
            model,
            prompt,
            chat,
            system,
            max_tokens,
            temperature,
            top_p,
            top_k,
            min_p,
            seed,
            stats,
        } => {
            let prompt = prompt
                .into_string()
                .map_err(|p| format!("--prompt is not valid UTF-8: {}", p.to_string_lossy()))?;
            let model = model.load()?;
            let text = if chat {
                let mut messages = Vec::new();
                if let Some(s) = system {
                    messages.push(ChatMessage::system(s));
                }
                messages.push(ChatMessage::user(prompt));
                model
                    .tokenizer
                    .apply_chat_template(&messages, true)
                    .map_err(|e| e.to_string())?
            } else {
                prompt
            };
            let ids = model
                .tokenizer
                .encode(&text, chat)
                .map_err(|e| e.to_string())?;
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                seed,
            };
            let mut out = std::io::stdout().lock();
            let mut printed = 0;
            let generation = generate(&model, &ids, max_tokens, &params, |_, st, piece| {
                printed += piece.len();
                if stats {
                    eprintln!(
                        "[logprob {:.3} entropy {:.3} self-certainty {:.3} conf {:.3}] {piece:?}",
                        st.logprob, st.entropy, st.self_certainty, st.confidence
                    );
                }
                out.write_all(piece.as_bytes())
                    .and_then(|_| out.flush())
                    .is_ok()
            })
            .map_err(|e| e.to_string())?;
            let _ = out.write_all(&generation.text.as_bytes()[printed..]);
            let _ = writeln!(out);
            eprintln!(
                "[{} prompt tokens in {:.0} ms; {} tokens, {:.1} tok/s; finish: {:?}]",
                generation.prompt_tokens,
                generation.prefill_time.as_secs_f64() * 1e3,
                generation.tokens.len(),
                generation.decode_tokens_per_second(),
                generation.finish
            );
            Ok(())
        }
        Command::Info { model } => {
            let m = model.load()?;
            let c = m.config();
            println!("path:          {}", m.path.display());
            println!("format:        {:?}", m.format);
            println!("architecture:  {}", c.architecture.name());
            println!("parameters:    {}", c.num_parameters());
            println!(
                "layers {} · hidden {} · ffn {} · heads {} / kv {} · head_dim {}",
                c.num_layers,
                c.hidden_size,
                c.intermediate_size,
                c.num_heads,
                c.num_kv_heads,
                c.head_dim
            );
            println!("vocab:         {} (logits row)", c.vocab_size);
            println!("context:       {}", c.max_position_embeddings);
            println!(
                "rope θ:        {}{}",
                c.rope_theta,
                if c.rope_scaling.is_some() {
                    " (llama3 scaling)"
                } else {
                    ""
                }
            );
            println!(
                "tied embeddings: {}  qkv bias: {}",
                c.tie_word_embeddings, c.qkv_bias
            );
            println!(
                "weights:       {} ({:.1} MB read per token)",
                m.transformer.weight_types(),
                m.transformer.weight_bytes_per_token() as f64 / 1e6
            );
            println!("activations:   {:?}", m.transformer.dtype());
            println!("tokenizer:     {}", m.tokenizer.description);
            let sp = m.tokenizer.special();
            println!(
                "special:       bos {:?} eos {:?} eog {:?} add_bos {}",
                sp.bos, sp.eos, sp.eog, sp.add_bos
            );
            match m.tokenizer.chat_template() {
                Some(t) => println!("chat template: {} chars\n{}", t.source().len(), t.source()),
                None => println!("chat template: none"),
            }
            if !m.unused_weights.is_empty() {
                println!("unused weights: {}", m.unused_weights.join(", "));
            }
            Ok(())
        }
    }
}
