//! Tokenization: a `tokenizers` tokenizer loaded from `tokenizer.json` or built from the
//! vocabulary a GGUF embeds (`gguf.rs`: byte-level BPE or SentencePiece), the
//! special-token rules (BOS/EOS, the end-of-generation set llama.cpp stops on), the chat
//! template, and a streaming decoder that never emits a broken UTF-8 character.

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{Error, Result};

mod gguf;

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

impl Tokenizer {
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
