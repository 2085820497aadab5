//! `verity info`: what a model is (architecture, sizes, weight types, tokenizer, chat
//! template) and the device it runs on.

use crate::args::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(args: Args) -> Result<(), String> {
    let config = args.model.config();
    let requested = config.device;
    let runtime = ModelArgs::build(config)?;
    let m = runtime.model();
    let c = m.config();
    println!("path:          {}", m.path.display());
    println!("format:        {:?}", m.format);
    println!(
        "device:        {} (asked for: {requested})",
        runtime.device()
    );
    println!("architecture:  {}", c.architecture.name());
    println!("parameters:    {}", c.num_parameters());
    println!(
        "layers {} · hidden {} · ffn {} · heads {} / kv {} · head_dim {}",
        c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!("vocab:         {} (logits row)", c.vocab_size);
    println!("context:       {}", c.max_position_embeddings);
    let mut rope = format!("{}", c.rope_theta);
    if c.rope_scaling.is_some() {
        rope.push_str(" · llama3 scaling");
    } else if c.rope_freq_factors.is_some() {
        rope.push_str(" · per-frequency factors");
    }
    if let Some(f) = c.rope_attention_factor {
        rope.push_str(&format!(" · cos/sin ×{f:.4}"));
    }
    if let Some(r) = c.rotary_dim {
        rope.push_str(&format!(" · rotates {r} of {} dims", c.head_dim));
    }
    if let Some(local) = c.rope_local_theta {
        rope.push_str(&format!(" · sliding layers θ {local}"));
    }
    println!("rope θ:        {rope}");
    if let Some(w) = c.sliding_window {
        let layers = if c.sliding_layers.is_empty() {
            "every layer".to_string()
        } else {
            let n = c.sliding_layers.iter().filter(|&&s| s).count();
            format!("{n} of {} layers", c.num_layers)
        };
        println!("sliding window: {w} positions, {layers}");
    }
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
