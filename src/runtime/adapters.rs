//! The runtime's one adapter registry: every loaded LoRA adapter by id, which one requests
//! get when they name none, and which one the trainer updates. Requests resolve their
//! adapter here once, to an `Arc` the engine decodes with; nothing else keeps a list.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::LoraAdapter;

/// The adapter id that always means "no adapter".
pub const BASE_ADAPTER: &str = "base";

/// An adapter as listed by [`crate::Runtime::adapters`].
#[derive(Debug, Clone, Serialize)]
pub struct AdapterInfo {
    /// The id requests name it by.
    pub id: String,
    /// Bumped by every published update.
    pub version: u64,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// PEFT module names it adapts.
    pub targets: Vec<String>,
    /// The one the trainer updates.
    pub learning: bool,
    /// Used by requests that name no adapter.
    pub default: bool,
}

/// An adapter a request resolved to: its id and the adapter itself.
pub(crate) type Resolved = Option<(String, Arc<LoraAdapter>)>;

pub(crate) struct AdapterRegistry {
    learning: String,
    state: RwLock<State>,
}

struct State {
    adapters: HashMap<String, Arc<LoraAdapter>>,
    default: Option<String>,
}

impl AdapterRegistry {
    /// A registry holding the learning adapter; requests naming none get it when
    /// `serve_learning` is set, else the base model.
    pub fn new(learning_id: String, learning: Arc<LoraAdapter>, serve_learning: bool) -> Self {
        let mut adapters = HashMap::new();
        adapters.insert(learning_id.clone(), learning);
        Self {
            state: RwLock::new(State {
                adapters,
                default: serve_learning.then(|| learning_id.clone()),
            }),
            learning: learning_id,
        }
    }

    pub fn learning_id(&self) -> &str {
        &self.learning
    }

    /// The adapter the trainer updates (always present).
    pub fn learning(&self) -> Arc<LoraAdapter> {
        self.get(&self.learning)
            .expect("the learning adapter is never removed")
    }

    /// `None` → the default adapter; "base" → none; else a loaded id.
    pub fn resolve(&self, requested: Option<&str>) -> Result<Resolved> {
        let state = self.state.read();
        let id = match requested {
            None => match &state.default {
                Some(id) => id.clone(),
                None => return Ok(None),
            },
            Some(BASE_ADAPTER) => return Ok(None),
            Some(id) => id.to_string(),
        };
        match state.adapters.get(&id) {
            Some(a) => Ok(Some((id, a.clone()))),
            None => Err(Error::NotFound(format!("no adapter '{id}' is loaded"))),
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<LoraAdapter>> {
        self.state.read().adapters.get(id).cloned()
    }

    /// Adds or replaces `id`.
    pub fn insert(&self, id: &str, adapter: Arc<LoraAdapter>) {
        self.state.write().adapters.insert(id.to_string(), adapter);
    }

    /// Unloads `id` (never the learning adapter); requests naming none fall back to the
    /// base model if it was their default.
    pub fn remove(&self, id: &str) -> Result<()> {
        if id == self.learning {
            return Err(Error::InvalidArgument(format!(
                "'{id}' is the learning adapter and cannot be removed"
            )));
        }
        let mut state = self.state.write();
        state
            .adapters
            .remove(id)
            .ok_or_else(|| Error::NotFound(format!("no adapter '{id}' is loaded")))?;
        if state.default.as_deref() == Some(id) {
            state.default = None;
        }
        Ok(())
    }

    /// Makes `id` the adapter of requests that name none; "base" or `None` selects the
    /// base model.
    pub fn select(&self, id: Option<&str>) -> Result<()> {
        let mut state = self.state.write();
        state.default = match id {
            None | Some(BASE_ADAPTER) => None,
            Some(id) if state.adapters.contains_key(id) => Some(id.to_string()),
            Some(id) => return Err(Error::NotFound(format!("no adapter '{id}' is loaded"))),
        };
        Ok(())
    }

    pub fn default_id(&self) -> Option<String> {
        self.state.read().default.clone()
    }

    /// Every loaded adapter, by id.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let state = self.state.read();
        let mut list: Vec<AdapterInfo> = state
            .adapters
            .iter()
            .map(|(id, a)| AdapterInfo {
                id: id.clone(),
                version: a.version(),
                rank: a.spec.rank,
                alpha: a.spec.alpha,
                targets: a
                    .spec
                    .targets
                    .iter()
                    .map(|t| t.module_name().to_string())
                    .collect(),
                learning: *id == self.learning,
                default: state.default.as_deref() == Some(id.as_str()),
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }
}

/// Adapter ids are plain names: they become folder names when saved.
pub(crate) fn check_adapter_id(id: &str) -> Result<()> {
    let plain = !id.is_empty()
        && id != BASE_ADAPTER
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && id != "."
        && id != "..";
    if plain {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "adapter id '{id}' must be letters, digits, '-', '_' or '.', and not '{BASE_ADAPTER}'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_ids_are_plain() {
        for ok in ["learned", "a-b_c.1"] {
            assert!(check_adapter_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "base", "..", "a/b", "a b", "ü"] {
            assert!(check_adapter_id(bad).is_err(), "{bad}");
        }
    }
}
