//! `verity bench tokenizer`: writes a model's tokenizer (from a GGUF file's metadata or a
//! Hugging Face folder) as the files a Hugging Face folder carries: `tokenizer.json`,
//! `tokenizer_config.json` (chat template, BOS/EOS and whether encoding adds them) and
//! `generation_config.json` (the end-of-generation ids). A random-weight model saved by
//! `transformers` beside them loads in verity with the real vocabulary (the GPU check makes
//! such models where no real weights can be carried). The folder is read back and compared
//! with the original before the command succeeds.

use std::path::{Path, PathBuf};

use serde_json::json;
use verity::{ChatMessage, Tokenizer};

use super::write_json;

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF file or a Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// The folder to write the tokenizer files into (created if missing).
    #[arg(long)]
    out: PathBuf,
}

fn load(path: &Path) -> Result<Tokenizer, String> {
    let tokenizer = if path.is_dir() {
        Tokenizer::from_hf_dir(path)
    } else {
        Tokenizer::from_gguf_file(path)
    };
    tokenizer.map_err(|e| format!("--model {}: {e}", path.display()))
}

/// A token's text as a tokenizer config names it.
fn text(tokenizer: &Tokenizer, id: Option<u32>) -> Option<String> {
    id.map(|id| String::from_utf8_lossy(tokenizer.token_bytes(id)).into_owned())
}

pub fn run(args: Args) -> Result<(), String> {
    let tokenizer = load(&args.model)?;
    let sp = tokenizer.special();
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let json_path = args.out.join("tokenizer.json");
    let body = tokenizer.to_json().map_err(|e| e.to_string())?;
    std::fs::write(&json_path, body).map_err(|e| format!("{}: {e}", json_path.display()))?;
    let mut config = json!({
        "bos_token": text(&tokenizer, sp.bos),
        "eos_token": text(&tokenizer, sp.eos),
        "add_bos_token": sp.add_bos,
        "add_eos_token": sp.add_eos,
    });
    if let Some(t) = tokenizer.chat_template() {
        config["chat_template"] = json!(t.source());
    }
    write_json(&args.out.join("tokenizer_config.json"), &config)?;
    let mut generation = json!({ "eos_token_id": sp.eog });
    if let Some(bos) = sp.bos {
        generation["bos_token_id"] = json!(bos);
    }
    write_json(&args.out.join("generation_config.json"), &generation)?;

    // Read it back: same vocabulary, specials, template and encodings.
    let back = load(&args.out)?;
    let bs = back.special();
    let mut problems = Vec::new();
    if back.vocab_size() != tokenizer.vocab_size() {
        problems.push(format!(
            "{} tokens instead of {}",
            back.vocab_size(),
            tokenizer.vocab_size()
        ));
    }
    if (bs.bos, bs.eos, bs.add_bos, bs.add_eos) != (sp.bos, sp.eos, sp.add_bos, sp.add_eos) {
        problems.push(format!("special tokens {bs:?} instead of {sp:?}"));
    }
    if let Some(missing) = sp.eog.iter().find(|id| !back.is_eog(**id)) {
        problems.push(format!("token {missing} no longer ends generation"));
    }
    let sample = "Janet’s ducks lay 16 eggs per day; 3 × 4 = 12. Ünïcödé 東京 🦆\n\tdone";
    let rendered = match tokenizer.chat_template() {
        Some(_) => tokenizer
            .apply_chat_template(&[ChatMessage::user(sample)], true)
            .map_err(|e| e.to_string())?,
        None => sample.to_string(),
    };
    let back_rendered = match back.chat_template() {
        Some(_) => back
            .apply_chat_template(&[ChatMessage::user(sample)], true)
            .map_err(|e| e.to_string())?,
        None => sample.to_string(),
    };
    if back_rendered != rendered {
        problems.push("the chat template renders differently".into());
    }
    for (text, special) in [(sample, false), (rendered.as_str(), true)] {
        let a = tokenizer.encode(text, special).map_err(|e| e.to_string())?;
        let b = back.encode(text, special).map_err(|e| e.to_string())?;
        if a != b {
            problems.push(format!("'{text}' encodes to {b:?} instead of {a:?}"));
        }
    }
    if !problems.is_empty() {
        return Err(format!(
            "the tokenizer written to {} does not read back the same: {}",
            args.out.display(),
            problems.join("; ")
        ));
    }
    eprintln!(
        "tokenizer of {} ({} tokens) written to {}",
        args.model.display(),
        tokenizer.vocab_size(),
        args.out.display()
    );
    Ok(())
}
