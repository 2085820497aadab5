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
    let scaling = if c.rope_scaling.is_some() {
        " (llama3 scaling)"
    } else {
        ""
    };
    println!("rope θ:        {}{scaling}", c.rope_theta);
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
