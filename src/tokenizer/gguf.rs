//! The tokenizer a GGUF file embeds: byte-level BPE (`tokenizer.ggml.model = gpt2`, with the
//! pre-tokenizer `tokenizer.ggml.pre` names) or SentencePiece (`llama`), built as llama.cpp
//! tokenizes, with its special tokens and chat template.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::Value;

use super::{
    byte_level_bytes, byte_level_maps, eog_ids, longest, sentencepiece_bytes, SpecialTokens,
    Tokenizer, EOG_TEXTS,
};
use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::model::gguf::{value_as_u64, GgufHeader};

/// Qwen2's pre-tokenizer split (llama.cpp `qwen2`, HF Qwen2 tokenizer.json).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama-3's pre-tokenizer split (llama.cpp `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

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
