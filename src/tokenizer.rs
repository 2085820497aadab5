//! Tokenization: a `tokenizers` tokenizer loaded from `tokenizer.json` or built from the
//! byte-level BPE a GGUF embeds (vocab, merges, token types, `tokenizer.ggml.pre`), the
//! special-token rules (BOS/EOS, the end-of-generation set llama.cpp stops on), the chat
//! template, and a streaming decoder that never emits a broken UTF-8 character.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Value;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{Error, Result};
use crate::model::gguf::{value_as_u64, GgufHeader};

/// Qwen2's pre-tokenizer split (llama.cpp `qwen2`, HF Qwen2 tokenizer.json).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama-3's pre-tokenizer split (llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Texts of tokens that end generation, as llama.cpp recognises them.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    "</s>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<reponame>",
    "<|file_sep|>",
    "<｜end▁of▁sentence｜>",
];

/// Special-token facts a generation loop needs.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    /// Beginning-of-sequence token, if the vocabulary has one.
    pub bos: Option<u32>,
    /// End-of-sequence token, if the vocabulary has one.
    pub eos: Option<u32>,
    /// Tokens that end generation (eos, end-of-turn and the like).
    pub eog: Vec<u32>,
    /// [`Tokenizer::encode`] prepends `bos`.
    pub add_bos: bool,
    /// [`Tokenizer::encode`] appends `eos`.
    pub add_eos: bool,
}

/// A byte-level BPE tokenizer with its special tokens and chat template, built from a GGUF
/// file's metadata or a Hugging Face `tokenizer.json`. Decoding is byte-exact.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Same tokenizer, but special tokens in the text are not parsed (split as plain text).
    plain: OnceLock<tokenizers::Tokenizer>,
    /// The bytes each id stands for, for exact and streaming decoding.
    token_bytes: Vec<Vec<u8>>,
    /// Bounds for [`Tokenizer::tokens_at_least`]: the longest token, the longest with an
    /// ASCII letter or digit (both at least 1), and whether text is normalized first.
    longest_token: usize,
    longest_alnum_token: usize,
    normalizes: bool,
    /// Control tokens (rendered as nothing unless asked).
    control: Vec<bool>,
    special: SpecialTokens,
    chat_template: Option<ChatTemplate>,
    /// Where the tokenizer came from ("gguf:qwen2", "tokenizer.json"), for `verity info`.
    pub description: String,
}

/// The length of the longest token that `keep` accepts (at least 1).
fn longest(token_bytes: &[Vec<u8>], keep: impl Fn(&[u8]) -> bool) -> usize {
    token_bytes
        .iter()
        .filter(|t| keep(t))
        .map(Vec::len)
        .max()
        .unwrap_or(1)
        .max(1)
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("description", &self.description)
            .field("vocab", &self.token_bytes.len())
            .field("special", &self.special)
            .finish()
    }
}

/// GPT-2's byte-to-character map used by byte-level BPE, and its inverse.
fn byte_level_maps() -> ([char; 256], HashMap<char, u8>) {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        map[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\u{FFFD}');
            n += 1;
            c
        };
    }
    let inverse = map.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
    (map, inverse)
}

fn byte_level_bytes(token: &str, inverse: &HashMap<char, u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(token.len());
    for c in token.chars() {
        match inverse.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

/// SentencePiece-style pieces: "▁" is a space, "<0xAB>" is a raw byte.
fn sentencepiece_bytes(token: &str) -> Vec<u8> {
    if token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') {
        if let Ok(b) = u8::from_str_radix(&token[3..5], 16) {
            return vec![b];
        }
    }
    token.replace('\u{2581}', " ").into_bytes()
}

fn eog_ids(
    vocab: &[(String, bool)],
    eos: Option<u32>,
    extra: impl IntoIterator<Item = u32>,
) -> Vec<u32> {
    let mut ids: Vec<u32> = eos.into_iter().chain(extra).collect();
    for (id, (text, special)) in vocab.iter().enumerate() {
        if *special && EOG_TEXTS.contains(&text.as_str()) {
            ids.push(id as u32);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A string array of the GGUF metadata.
fn gguf_strings(header: &GgufHeader, key: &str) -> Result<Vec<String>> {
    match header.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(Error::Tokenizer(format!("'{key}' holds a non-string"))),
            })
            .collect(),
        _ => Err(Error::Tokenizer(format!(
            "GGUF metadata lacks the array '{key}'"
        ))),
    }
}

/// The byte-level BPE a GGUF file describes (`tokenizer.ggml.model = gpt2`): its merges and
/// the pre-tokenizer `tokenizer.ggml.pre` names.
fn byte_level_tokenizer(
    header: &GgufHeader,
    tokens: &[String],
    types: &[u64],
    is_added: &[bool],
    is_control: &[bool],
) -> Result<tokenizers::Tokenizer> {
    // A vocabulary of single symbols has nothing to merge (converters then omit the key);
    // any longer token needs the merges that build it. Added and unused (type 5, padding)
    // tokens are not built by merges.
    let single_symbols = tokens
        .iter()
        .enumerate()
        .all(|(id, t)| is_added[id] || types.get(id) == Some(&5) || t.chars().count() == 1);
    let merges = match header.get("tokenizer.ggml.merges") {
        None if single_symbols => Vec::new(),
        _ => gguf_strings(header, "tokenizer.ggml.merges")?,
    };
    let pre = header.get_str("tokenizer.ggml.pre").unwrap_or("default");
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if is_added[id] {
            added.push(serde_json::json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": is_control[id],
            }));
        }
        // Keep the first id of a duplicated string (the rest stay decodable by id).
        vocab.entry(token.clone()).or_insert(id.into());
    }
    let merges: Vec<serde_json::Value> = merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(serde_json::json!([a, b])),
            None => Err(Error::Tokenizer(format!("malformed merge '{m}'"))),
        })
        .collect::<Result<_>>()?;
    let byte_level = |use_regex: bool, trim: bool| serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": trim, "use_regex": use_regex});
    let split = |pattern: &str| serde_json::json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    let (normalizer, pre_tokenizer) = match pre {
        "smollm" => (
            serde_json::Value::Null,
            serde_json::json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true, true)]}),
        ),
        "qwen2" => (
            serde_json::json!({"type": "NFC"}),
            serde_json::json!({"type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false, false)]}),
        ),
        "llama-bpe" | "llama3" => (
            serde_json::Value::Null,
            serde_json::json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false, false)]}),
        ),
        "default" | "gpt2" | "gpt-2" => (serde_json::Value::Null, byte_level(true, true)),
        other => {
            return Err(Error::Tokenizer(format!(
                "pre-tokenizer '{other}' is not supported (known: smollm, qwen2, llama-bpe, gpt2)"
            )))
        }
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    let inner = tokenizers::Tokenizer::from_str(&json.to_string())
        .map_err(|e| Error::Tokenizer(format!("cannot build the BPE tokenizer from GGUF: {e}")))?;
    Ok(inner)
}

/// A SentencePiece vocabulary (GGUF `tokenizer.ggml.model = llama`) as a BPE with byte
/// fallback, tokenizing as llama.cpp's SPM tokenizer does: spaces become "▁" (one in front
/// when `add_space_prefix`), then the adjacent pair whose concatenation is a token with the
/// highest score merges first, and what no token covers falls back to `<0xAB>` bytes. The
/// merges are every split of a token into two tokens, ranked by the token's score (HF's
/// `SentencePieceExtractor` builds the same list). Control and user-defined tokens are
/// matched whole in the raw text first, as llama.cpp does.
fn sentencepiece_tokenizer(
    tokens: &[String],
    scores: &[f32],
    is_added: &[bool],
    is_control: &[bool],
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::normalizers::{Prepend, Replace, Sequence};
    use tokenizers::{AddedToken, NormalizerWrapper};

    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    for (id, t) in tokens.iter().enumerate() {
        vocab.entry(t.as_str()).or_insert(id as u32);
    }
    // (score of the merged token, left id, right id, left, right)
    let mut merges: Vec<(f32, u32, u32, &str, &str)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        if vocab.get(t.as_str()) != Some(&(id as u32)) {
            continue;
        }
        for (at, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(at);
            if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                merges.push((scores[id], li, ri, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges: Vec<(String, String)> = merges
        .into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = vocab
        .into_iter()
        .map(|(t, id)| (t.to_string(), id))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .build()
        .map_err(|e| Error::Tokenizer(format!("cannot build the SentencePiece BPE: {e}")))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let space = Replace::new(" ", "\u{2581}")
        .map_err(|e| Error::Tokenizer(format!("cannot build the normalizer: {e}")))?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        Sequence::new(vec![Prepend::new("\u{2581}".into()).into(), space.into()]).into()
    } else {
        space.into()
    };
    inner
        .with_normalizer(Some(normalizer))
        .map_err(|e| Error::Tokenizer(format!("cannot set the normalizer: {e}")))?;
    let added: Vec<AddedToken> = tokens
        .iter()
        .enumerate()
        .filter(|&(id, _)| is_added[id])
        .map(|(id, t)| AddedToken::from(t.clone(), is_control[id]).normalized(false))
        .collect();
    inner
        .add_tokens(added)
        .map_err(|e| Error::Tokenizer(format!("cannot add the special tokens: {e}")))?;
    Ok(inner)
}

impl Tokenizer {
    /// Reads the tokenizer a GGUF file embeds, without loading any tensors.
    ///
    /// Errors if the file is not GGUF or its tokenizer is neither byte-level BPE
    /// (`tokenizer.ggml.model = gpt2`) nor SentencePiece (`llama`).
    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        let (header, _) = crate::model::gguf::read_header(path)?;
        Self::from_gguf(&header)
    }

    /// Builds the tokenizer a GGUF file embeds: byte-level BPE (`tokenizer.ggml.model =
    /// gpt2`) or SentencePiece (`llama`: Gemma, Llama 2, Phi-3-mini).
    pub(crate) fn from_gguf(header: &GgufHeader) -> Result<Self> {
        let model = header.get_str("tokenizer.ggml.model").unwrap_or("");
        let sentencepiece = match model {
            "gpt2" => false,
            "llama" => true,
            other => {
                return Err(Error::Tokenizer(format!(
                    "GGUF tokenizer model '{other}' is not supported (verity builds byte-level \
                     BPE, 'gpt2', and SentencePiece, 'llama')"
                )))
            }
        };
        let tokens = gguf_strings(header, "tokenizer.ggml.tokens")?;
        let types: Vec<u64> = match header.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => {
                items.iter().map(|v| value_as_u64(v).unwrap_or(1)).collect()
            }
            _ => vec![1; tokens.len()],
        };

        // As llama.cpp does, a token whose text marks the end of a turn is a control token
        // even where the file typed it as normal (Qwen's `</s>`).
        let is_control: Vec<bool> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| types.get(id) == Some(&3) || EOG_TEXTS.contains(&t.as_str()))
            .collect();
        let is_added: Vec<bool> = (0..tokens.len())
            .map(|id| is_control[id] || types.get(id) == Some(&4))
            .collect();
        let (inner, description) = if sentencepiece {
            let scores: Vec<f32> =
                match header.get("tokenizer.ggml.scores") {
                    Some(Value::Array(items)) => items
                        .iter()
                        .map(|v| match v {
                            Value::F32(x) => Ok(*x),
                            Value::F64(x) => Ok(*x as f32),
                            _ => Err(Error::Tokenizer(
                                "'tokenizer.ggml.scores' holds a non-number".into(),
                            )),
                        })
                        .collect::<Result<_>>()?,
                    _ => return Err(Error::Tokenizer(
                        "GGUF metadata lacks the array 'tokenizer.ggml.scores' a SentencePiece \
                         vocabulary needs"
                            .into(),
                    )),
                };
            if scores.len() != tokens.len() {
                return Err(Error::Tokenizer(format!(
                    "{} scores for {} tokens",
                    scores.len(),
                    tokens.len()
                )));
            }
            let add_space_prefix = header
                .get_bool("tokenizer.ggml.add_space_prefix")
                .unwrap_or(true);
            let inner = sentencepiece_tokenizer(
                &tokens,
                &scores,
                &is_added,
                &is_control,
                add_space_prefix,
            )?;
            let description = format!("gguf SentencePiece, {} tokens", tokens.len());
            (inner, description)
        } else {
            let inner = byte_level_tokenizer(header, &tokens, &types, &is_added, &is_control)?;
            let pre = header.get_str("tokenizer.ggml.pre").unwrap_or("default");
            let description = format!(
                "gguf byte-level BPE, pre-tokenizer '{pre}', {} tokens",
                tokens.len()
            );
            (inner, description)
        };

        let (_, inverse) = byte_level_maps();
        let specials: Vec<(String, bool)> = tokens
            .iter()
            .zip(&is_added)
            .map(|(t, &added)| (t.clone(), added))
            .collect();
        let token_bytes: Vec<Vec<u8>> = tokens
            .iter()
            .zip(&is_added)
            .map(|(t, &added)| {
                if added {
                    t.clone().into_bytes()
                } else if sentencepiece {
                    sentencepiece_bytes(t)
                } else {
                    byte_level_bytes(t, &inverse)
                }
            })
            .collect();
        let control = is_control;
        let id = |key: &str| header.get_usize(key).map(|v| v as u32);
        let eos = id("tokenizer.ggml.eos_token_id");
        let bos = id("tokenizer.ggml.bos_token_id");
        let eot = id("tokenizer.ggml.eot_token_id");
        let special = SpecialTokens {
            bos,
            eos,
            eog: eog_ids(&specials, eos, eot),
            add_bos: header
                .get_bool("tokenizer.ggml.add_bos_token")
                .unwrap_or(false),
            add_eos: header
                .get_bool("tokenizer.ggml.add_eos_token")
                .unwrap_or(false),
        };
        let text_of = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize))
                .cloned()
                .unwrap_or_default()
        };
        let chat_template = header
            .get_str("tokenizer.chat_template")
            .map(|src| ChatTemplate::new(src, &text_of(bos), &text_of(eos)))
            .transpose()?;
        Ok(Self {
            normalizes: inner.get_normalizer().is_some(),
            inner,
            plain: OnceLock::new(),
            longest_token: longest(&token_bytes, |_| true),
            longest_alnum_token: longest(&token_bytes, |t| t.iter().any(u8::is_ascii_alphanumeric)),
            token_bytes,
            control,
            special,
            chat_template,
            description,
        })
    }
    /// Loads `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`) from a
    /// Hugging Face folder.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let text = crate::files::read_to_string(&path, crate::files::MAX_TOKENIZER_BYTES)?;
        let inner: tokenizers::Tokenizer = text
            .parse()
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&path, format!("invalid JSON: {e}")))?;
        let read_optional = |name: &str| -> Result<Option<serde_json::Value>> {
            let p = dir.join(name);
            if p.is_file() {
                crate::model::hf::read_json(&p).map(Some)
            } else {
                Ok(None)
            }
        };
        let config = read_optional("tokenizer_config.json")?;
        let generation = read_optional("generation_config.json")?;

        let byte_level = json
            .get("decoder")
            .map(|d| d.to_string().contains("ByteLevel"))
            .unwrap_or(false);
        let (_, inverse) = byte_level_maps();
        let vocab_size = inner.get_vocab_size(true);
        let added = inner.get_added_tokens_decoder();
        let mut token_bytes = Vec::with_capacity(vocab_size);
        let mut control = Vec::with_capacity(vocab_size);
        let mut specials = Vec::with_capacity(vocab_size);
        for id in 0..vocab_size as u32 {
            let (text, is_added, is_special) = match added.get(&id) {
                Some(t) => (t.content.clone(), true, t.special),
                None => (inner.id_to_token(id).unwrap_or_default(), false, false),
            };
            let bytes = if is_added {
                text.clone().into_bytes()
            } else if byte_level {
                byte_level_bytes(&text, &inverse)
            } else {
                sentencepiece_bytes(&text)
            };
            token_bytes.push(bytes);
            control.push(is_special);
            specials.push((text, is_added));
        }
        let token_field = |key: &str| -> Option<String> {
            let v = config.as_ref()?.get(key)?;
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.get("content")?.as_str().map(str::to_string))
        };
        let bos_text = token_field("bos_token");
        let eos_text = token_field("eos_token");
        let bos = bos_text.as_deref().and_then(|t| inner.token_to_id(t));
        let mut eos = eos_text.as_deref().and_then(|t| inner.token_to_id(t));
        let mut extra = Vec::new();
        if let Some(g) = &generation {
            match g.get("eos_token_id") {
                Some(serde_json::Value::Array(ids)) => {
                    extra.extend(ids.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
                }
                Some(v) => {
                    if let Some(id) = v.as_u64() {
                        eos = eos.or(Some(id as u32));
                        extra.push(id as u32);
                    }
                }
                None => {}
            }
        }
        let flag = |key: &str| {
            config
                .as_ref()
                .and_then(|c| c.get(key))
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
        };
        let special = SpecialTokens {
            bos,
            eos,
            eog: eog_ids(&specials, eos, extra),
            add_bos: flag("add_bos_token"),
            add_eos: flag("add_eos_token"),
        };
        let template_source = config
            .as_ref()
            .and_then(|c| c.get("chat_template"))
            .and_then(|t| match t {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(list) => list
                    .iter()
                    .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|e| e.get("template")?.as_str().map(str::to_string)),
                _ => None,
            });
        let chat_template = template_source
            .map(|src| {
                ChatTemplate::new(
                    &src,
                    bos_text.as_deref().unwrap_or(""),
                    eos_text.as_deref().unwrap_or(""),
                )
            })
            .transpose()?;
        Ok(Self {
            normalizes: inner.get_normalizer().is_some(),
            inner,
            plain: OnceLock::new(),
            longest_token: longest(&token_bytes, |_| true),
            longest_alnum_token: longest(&token_bytes, |t| t.iter().any(u8::is_ascii_alphanumeric)),
            token_bytes,
            control,
            special,
            chat_template,
            description: format!("tokenizer.json, {vocab_size} tokens"),
        })
    }

    /// The `tokenizer.json` text of this tokenizer (to write a HF folder).
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Number of token ids the tokenizer knows (may be less than the model's logits row).
    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }
    /// BOS/EOS, end-of-generation tokens and whether encoding adds BOS/EOS.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }
    /// The model's chat template, if it ships one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }
    /// True for tokens that end generation (eos, end-of-turn and the like).
    pub fn is_eog(&self, id: u32) -> bool {
        self.special.eog.binary_search(&id).is_ok()
    }
    /// True for control (special) tokens, which decoding renders as nothing unless asked;
    /// false for unknown ids.
    pub fn is_control(&self, id: u32) -> bool {
        self.control.get(id as usize).copied().unwrap_or(false)
    }

    /// Token ids of `text`. With `parse_special`, special-token text (`<|im_start|>`) becomes
    /// the special token; otherwise it is tokenized as plain text. BOS/EOS are added only
    /// where the vocabulary asks for them.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tk = if parse_special {
            &self.inner
        } else {
            self.plain.get_or_init(|| {
                let mut t = self.inner.clone();
                t.set_encode_special_tokens(true);
                t
            })
        };
        let enc = tk
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode: {e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        if self.special.add_bos {
            ids.extend(self.special.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        if self.special.add_eos {
            ids.extend(self.special.eos);
        }
        Ok(ids)
    }

    /// A lower bound on the number of tokens `text` encodes to, found in one pass over its
    /// bytes without encoding it, to refuse an oversized prompt before paying for its
    /// tokenization. Byte-level BPE tokens cover the (normalized) text's bytes exactly, so
    /// there are at least bytes / longest token, and at least ASCII letters and digits /
    /// the longest token holding one (the longest tokens are runs of spaces or dashes; words
    /// are short). A normalizer (NFC) shrinks text by at most a factor of 3 (three Hangul
    /// jamo compose into one syllable) and can fold an ASCII letter into the combining mark
    /// of 2 or more bytes after it; both are allowed for.
    pub fn tokens_at_least(&self, text: &str) -> usize {
        let bytes = text.as_bytes();
        let alnum = bytes.iter().filter(|b| b.is_ascii_alphanumeric()).count();
        let (alnum, total) = if self.normalizes {
            let non_ascii = bytes.iter().filter(|b| !b.is_ascii()).count();
            (alnum.saturating_sub(non_ascii / 2), bytes.len() / 3)
        } else {
            (alnum, bytes.len())
        };
        (alnum / self.longest_alnum_token).max(total / self.longest_token)
    }

    /// The raw bytes of one token (control tokens give their text).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map(|b| b.as_slice())
            .unwrap_or(&[])
    }

    /// Bytes of a sequence of ids; control tokens are skipped unless `render_special`.
    pub fn decode_bytes(&self, ids: &[u32], render_special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            if render_special || !self.is_control(id) {
                out.extend_from_slice(self.token_bytes(id));
            }
        }
        out
    }

    /// Text of a sequence of ids (invalid UTF-8 replaced by U+FFFD).
    pub fn decode(&self, ids: &[u32], render_special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, render_special)).into_owned()
    }

    /// Renders `messages` with the model's chat template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::ChatTemplate("this model has no chat template".into()))?;
        template.render(messages, add_generation_prompt)
    }

    /// [`Self::apply_chat_template`] with extra template variables (`enable_thinking`).
    pub fn apply_chat_template_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::ChatTemplate("this model has no chat template".into()))?;
        template.render_with(messages, add_generation_prompt, kwargs)
    }

    /// A decoder that turns ids into text as they arrive.
    pub fn stream_decoder(&self, render_special: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            buffer: Utf8Buffer::default(),
            render_special,
        }
    }
}

/// Emits only complete UTF-8 characters; a multi-byte character split across tokens waits
/// until its last byte arrives. Bytes that can never become valid UTF-8 come out as U+FFFD.
#[derive(Debug, Clone, Default)]
pub struct Utf8Buffer {
    pending: Vec<u8>,
}

impl Utf8Buffer {
    /// Text made complete by `bytes` (possibly empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        self.drain(false)
    }

    /// Whatever is left, invalid bytes replaced.
    pub fn finish(&mut self) -> String {
        self.drain(true)
    }

    fn drain(&mut self, flush: bool) -> String {
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None if !flush => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        None => {
                            out.push('\u{FFFD}');
                            self.pending.clear();
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }
}

/// Token ids in, whole UTF-8 characters out (see [`Utf8Buffer`]).
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    buffer: Utf8Buffer,
    render_special: bool,
}

impl StreamDecoder<'_> {
    /// Text made complete by `id` (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        if self.render_special || !self.tokenizer.is_control(id) {
            self.buffer.push(self.tokenizer.token_bytes(id))
        } else {
            String::new()
        }
    }

    /// Whatever is left, invalid bytes replaced.
    pub fn finish(&mut self) -> String {
        self.buffer.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SentencePiece vocabulary by hand: the adjacent pair whose merged token scores
    /// highest merges first (llama.cpp's rule), spaces are "▁", what no token covers falls
    /// back to byte tokens, and control tokens match whole.
    #[test]
    fn sentencepiece_merges_by_score_and_falls_back_to_bytes() {
        let pieces = [
            "<unk>",
            "<ctl>",
            "a",
            "b",
            "c",
            "ab",
            "bc",
            "\u{2581}",
            "\u{2581}a",
        ];
        let mut tokens: Vec<String> = pieces.iter().map(|s| s.to_string()).collect();
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        let n = tokens.len();
        let added: Vec<bool> = (0..n).map(|i| i == 1).collect();
        let encode = |scores: &[f32], text: &str| -> Vec<u32> {
            let mut all = vec![0.0f32; n];
            all[..scores.len()].copy_from_slice(scores);
            let tk = sentencepiece_tokenizer(&tokens, &all, &added, &added, false).unwrap();
            tk.encode_fast(text, false).unwrap().get_ids().to_vec()
        };
        // ab scores above bc: "abc" = ab + c; the other way round: a + bc.
        let ab_first = [0.0, 0.0, -1.0, -1.0, -1.0, -2.0, -3.0, -1.0, -2.5];
        let bc_first = [0.0, 0.0, -1.0, -1.0, -1.0, -3.0, -2.0, -1.0, -2.5];
        assert_eq!(encode(&ab_first, "abc"), [5, 4]);
        assert_eq!(encode(&bc_first, "abc"), [2, 6]);
        // A space is "▁"; it merges with what follows when that pair scores highest.
        assert_eq!(encode(&ab_first, " ab"), [7, 5]);
        let space_a_first = [0.0, 0.0, -1.0, -1.0, -1.0, -2.0, -3.0, -1.0, -1.5];
        assert_eq!(encode(&space_a_first, " ab"), [8, 3]);
        // "d" is not a token: its byte; the control token matches whole.
        let d = 9 + b'd' as u32;
        assert_eq!(encode(&ab_first, "d<ctl>a"), [d, 1, 2]);
        assert_eq!(sentencepiece_bytes("\u{2581}a"), b" a");
        assert_eq!(sentencepiece_bytes("<0x0A>"), b"\n");
    }
}
