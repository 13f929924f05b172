//! Loading named tensors from another library's naming (a candle-nn `VarMap`, a PyTorch
//! checkpoint): prefix renaming, and non-strict loading that reports what it left out.

use std::collections::{HashMap, HashSet};

use super::{load_state_dict, ParamLayout, Parameters};
use crate::error::Result;

/// How [`load_state_dict_with`] maps and checks names.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// `(from, to)` prefix replacements applied to the source's names, first match wins:
    /// `("model.encoder.", "0.")` loads `model.encoder.weight` into `0.weight`; `("", "net.")`
    /// adds a prefix, `("backbone.", "")` strips one.
    pub rename: Vec<(String, String)>,
    /// Non-strict (PyTorch's `strict=False`): names the model has and the source lacks keep
    /// their current values, names the source has and the model lacks are skipped, and
    /// both are reported. Mis-shaped and non-finite tensors are errors either way.
    pub non_strict: bool,
}

impl LoadOptions {
    /// Strict loading with no renaming (what [`load_state_dict`] does).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a prefix replacement (see [`LoadOptions::rename`]).
    pub fn rename_prefix(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.rename.push((from.into(), to.into()));
        self
    }

    /// Non-strict loading (see [`LoadOptions::non_strict`]).
    pub fn non_strict(mut self, non_strict: bool) -> Self {
        self.non_strict = non_strict;
        self
    }

    fn map_name(&self, name: &str) -> String {
        for (from, to) in &self.rename {
            if let Some(rest) = name.strip_prefix(from.as_str()) {
                return format!("{to}{rest}");
            }
        }
        name.to_string()
    }
}

/// What [`load_state_dict_with`] did, by the model's names (after renaming).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Parameters and buffers replaced from the source, sorted.
    pub loaded: Vec<String>,
    /// The model's names the source lacked (kept as they were), sorted; empty when strict.
    pub missing: Vec<String>,
    /// The source's names (renamed) the model lacks (skipped), sorted; empty when strict.
    pub unexpected: Vec<String>,
}

/// [`load_state_dict`] with renamed source names and, optionally, non-strict matching.
/// All-or-nothing as `load_state_dict`: on any error (a mis-shaped or non-finite tensor, or
/// in strict mode a missing or extra name, or two source names renamed to one) the model
/// is unchanged. Every trainable parameter becomes a fresh leaf, loaded or kept.
pub fn load_state_dict_with<M: Parameters>(
    model: &mut M,
    tensors: &HashMap<String, candle_core::Tensor>,
    source: &str,
    options: &LoadOptions,
) -> Result<LoadReport> {
    let mut renamed: HashMap<String, candle_core::Tensor> = HashMap::new();
    for (name, t) in tensors {
        let new = options.map_name(name);
        if renamed.insert(new.clone(), t.clone()).is_some() {
            return Err(crate::Error::InvalidArgument {
                op: "load_state_dict_with",
                message: format!("{source}: two tensors are renamed to {new}; nothing loaded"),
            });
        }
    }
    let layout = ParamLayout::of(model)?;
    let model_names: Vec<(&String, &crate::Tensor)> = layout
        .names
        .iter()
        .zip(&layout.tensors)
        .chain(layout.buffer_names.iter().zip(&layout.buffer_tensors))
        .collect();
    let known: HashSet<&str> = model_names.iter().map(|(n, _)| n.as_str()).collect();
    let mut report = LoadReport::default();
    if options.non_strict {
        report.unexpected = renamed
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .cloned()
            .collect();
        for k in &report.unexpected {
            renamed.remove(k);
        }
        for (name, current) in &model_names {
            if !renamed.contains_key(name.as_str()) {
                report.missing.push(name.to_string());
                renamed.insert(name.to_string(), current.to_candle());
            }
        }
    }
    report.loaded = model_names
        .iter()
        .map(|(n, _)| n.to_string())
        .filter(|n| !report.missing.contains(n))
        .collect();
    drop(layout);
    load_state_dict(model, &renamed, source)?;
    report.loaded.sort();
    report.missing.sort();
    report.unexpected.sort();
    Ok(report)
}
