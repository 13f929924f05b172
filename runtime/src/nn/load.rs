//! Loading named tensors from another library's naming (a candle-nn `VarMap`, a PyTorch
//! checkpoint): prefix renaming, and non-strict loading that reports what it left out.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use candle_core::DType;

use super::safetensors::load_vetted;
use super::{walk, Entry, ParamLayout, Parameters};
use crate::error::{Error, Result};
use crate::tensor::TensorId;

/// A renaming of the other side's names to the model's (see [`LoadOptions::rename_with`]).
type RenameFn = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// How [`load_state_dict_with`] (and, with the `candle-nn` feature, `load_varmap` and
/// `write_varmap`) map and check names.
///
/// Names always go from the other side's (a checkpoint's, a `VarMap`'s) to the model's:
/// first the prefix replacements, then the [`rename_with`](LoadOptions::rename_with)
/// function. Writing back uses the same direction: each `VarMap` name is renamed and
/// receives the model's tensor of that name.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// `(from, to)` prefix replacements applied to the source's names, first match wins:
    /// `("model.encoder.", "0.")` loads `model.encoder.weight` into `0.weight`; `("", "net.")`
    /// adds a prefix, `("backbone.", "")` strips one.
    pub rename: Vec<(String, String)>,
    /// Non-strict (PyTorch's `strict=False`): names the model has and the source lacks keep
    /// their current values, names the source has and the model lacks are skipped, and
    /// both are reported. Mis-shaped and non-finite tensors are errors either way.
    pub non_strict: bool,
    /// Converts a tensor of another dtype to the receiving side's (an f32 `VarMap` into an
    /// f64 model). Off by default: a dtype mismatch is [`Error::LoadDType`], naming every
    /// mismatched tensor, since converting f64 to f32 loses precision silently.
    pub convert_dtype: bool,
    rename_fn: Option<RenameFn>,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("rename", &self.rename)
            .field("non_strict", &self.non_strict)
            .field("convert_dtype", &self.convert_dtype)
            .field("rename_with", &self.rename_fn.as_ref().map(|_| "<fn>"))
            .finish()
    }
}

impl LoadOptions {
    /// Strict loading with no renaming and no dtype conversion.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a prefix replacement (see [`LoadOptions::rename`]).
    pub fn rename_prefix(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.rename.push((from.into(), to.into()));
        self
    }

    /// Renames each of the other side's names (after the prefix replacements) to the
    /// model's, e.g. from a table: `rename_with(move |n| table.get(n).cloned()
    /// .unwrap_or_else(|| n.to_string()))`, or `|n| n.replace(".gamma", ".weight")`.
    pub fn rename_with(mut self, f: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.rename_fn = Some(Arc::new(f));
        self
    }

    /// Non-strict loading (see [`LoadOptions::non_strict`]).
    pub fn non_strict(mut self, non_strict: bool) -> Self {
        self.non_strict = non_strict;
        self
    }

    /// Dtype conversion (see [`LoadOptions::convert_dtype`]).
    pub fn convert_dtype(mut self, convert: bool) -> Self {
        self.convert_dtype = convert;
        self
    }

    fn map_name(&self, name: &str) -> String {
        let prefixed = self
            .rename
            .iter()
            .find_map(|(from, to)| {
                name.strip_prefix(from.as_str())
                    .map(|rest| format!("{to}{rest}"))
            })
            .unwrap_or_else(|| name.to_string());
        match &self.rename_fn {
            Some(f) => f(&prefixed),
            None => prefixed,
        }
    }

    /// The other side's names by the model's name they are renamed to; two renamed to
    /// one name is an error.
    pub(crate) fn rename_all<'a>(
        &self,
        op: &'static str,
        names: impl IntoIterator<Item = &'a String>,
        source: &str,
    ) -> Result<HashMap<String, &'a String>> {
        let mut renamed = HashMap::new();
        for name in names {
            let new = self.map_name(name);
            if let Some(other) = renamed.insert(new.clone(), name) {
                return Err(Error::InvalidArgument {
                    op,
                    message: format!(
                        "{source}: {other} and {name} are both renamed to {new}; nothing loaded"
                    ),
                });
            }
        }
        Ok(renamed)
    }

    /// Matches the model's named tensors with the other side's (by the model's names):
    /// in strict mode any name on one side only is [`Error::LoadMismatch`]; a shape that
    /// differs is that error in either mode (all listed at once), and then a dtype that
    /// differs without `convert_dtype` is [`Error::LoadDType`]. Returns what would be
    /// loaded and what was left out.
    pub(crate) fn match_tensors(
        &self,
        source: &str,
        model: &[(&String, &crate::Tensor)],
        other: &HashMap<String, (Vec<usize>, DType)>,
    ) -> Result<LoadReport> {
        let known: HashSet<&str> = model.iter().map(|(n, _)| n.as_str()).collect();
        let mut report = LoadReport::default();
        let mut mis_shaped = Vec::new();
        let mut mismatched = Vec::new();
        for (name, t) in model {
            match other.get(name.as_str()) {
                None => report.missing.push(name.to_string()),
                Some((shape, dtype)) => {
                    if shape.as_slice() != t.dims() {
                        mis_shaped.push((name.to_string(), t.dims().to_vec(), shape.clone()));
                    } else if *dtype != t.dtype() && !self.convert_dtype {
                        mismatched.push((name.to_string(), t.dtype(), *dtype));
                    }
                    report.loaded.push(name.to_string());
                }
            }
        }
        report.unexpected = other
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .cloned()
            .collect();
        report.loaded.sort();
        report.missing.sort();
        report.unexpected.sort();
        let one_sided = !(report.missing.is_empty() && report.unexpected.is_empty());
        let strict_failure = !self.non_strict && one_sided;
        if strict_failure || !mis_shaped.is_empty() {
            let (missing, unexpected) = if self.non_strict {
                (Vec::new(), Vec::new())
            } else {
                (report.missing, report.unexpected)
            };
            return Err(Error::LoadMismatch {
                source_name: source.to_string(),
                missing,
                unexpected,
                mis_shaped,
            });
        }
        if !mismatched.is_empty() {
            return Err(Error::LoadDType {
                source_name: source.to_string(),
                mismatched,
            });
        }
        Ok(report)
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

/// The model's parameters and then its buffers, by name, from a layout.
pub(crate) fn named_entries(layout: &ParamLayout) -> Vec<(&String, &crate::Tensor)> {
    layout
        .names
        .iter()
        .zip(&layout.tensors)
        .chain(layout.buffer_names.iter().zip(&layout.buffer_tensors))
        .collect()
}

/// `tensors` without the copies of a tied parameter (or shared buffer) under its later
/// names, which the model lists under its first name only: PyTorch's `state_dict` holds a
/// tied weight under every name. A copy whose values differ from the first name's is an
/// error naming both, since one tensor cannot take two values; a later name present
/// without the first stays (and is reported as unexpected, the first as missing).
pub(crate) fn without_tied_copies<'a, M: Parameters>(
    model: &mut M,
    tensors: &'a HashMap<String, candle_core::Tensor>,
    source: &str,
) -> Result<Cow<'a, HashMap<String, candle_core::Tensor>>> {
    // Each slot's name, and the first name of the tensor it holds.
    let mut first: HashMap<TensorId, String> = HashMap::new();
    let mut aliases: Vec<(String, String)> = Vec::new();
    walk(model, &mut |name, entry| {
        let id = match entry {
            Entry::Param(t) | Entry::Buffer(t) => t.id(),
            Entry::Training(_) => return Ok(()),
        };
        match first.get(&id) {
            Some(primary) if primary != name => aliases.push((name.to_string(), primary.clone())),
            Some(_) => {}
            None => {
                first.insert(id, name.to_string());
            }
        }
        Ok(())
    })?;
    let copies: Vec<&(String, String)> = aliases
        .iter()
        .filter(|(alias, primary)| tensors.contains_key(alias) && tensors.contains_key(primary))
        .collect();
    if copies.is_empty() {
        return Ok(Cow::Borrowed(tensors));
    }
    let mut kept = tensors.clone();
    for (alias, primary) in copies {
        if !same_values(&tensors[primary], &tensors[alias])? {
            return Err(Error::InvalidArgument {
                op: "load_state_dict",
                message: format!(
                    "{source}: {primary} and {alias} are one tied tensor in the model, but the \
                     source holds different values for them; nothing loaded"
                ),
            });
        }
        kept.remove(alias);
    }
    Ok(Cow::Owned(kept))
}

/// Same shape, dtype and elements.
fn same_values(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<bool> {
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        return Ok(false);
    }
    if a.elem_count() == 0 {
        return Ok(true);
    }
    let b = b.to_device(a.device())?;
    Ok(a.ne(&b)?.flatten_all()?.max(0)?.to_scalar::<u8>()? == 0)
}

/// [`load_state_dict`](super::load_state_dict) with renamed source names and, optionally,
/// non-strict matching and dtype conversion. All-or-nothing as `load_state_dict`: on any
/// error (a mis-shaped or non-finite tensor, a dtype mismatch without `convert_dtype`, in
/// strict mode a missing or extra name, two source names renamed to one, or a tied
/// parameter given two values) the model is unchanged. Every trainable parameter becomes a
/// fresh leaf, loaded or kept; only the loaded tensors are checked for NaN and infinities.
pub fn load_state_dict_with<M: Parameters>(
    model: &mut M,
    tensors: &HashMap<String, candle_core::Tensor>,
    source: &str,
    options: &LoadOptions,
) -> Result<LoadReport> {
    let renamed: HashMap<String, candle_core::Tensor> = options
        .rename_all("load_state_dict_with", tensors.keys(), source)?
        .into_iter()
        .map(|(new, old)| (new, tensors[old].clone()))
        .collect();
    let renamed = without_tied_copies(model, &renamed, source)?;
    let layout = ParamLayout::of(model)?;
    let entries = named_entries(&layout);
    let other = renamed
        .iter()
        .map(|(name, t)| (name.clone(), (t.dims().to_vec(), t.dtype())))
        .collect();
    let report = options.match_tensors(source, &entries, &other)?;
    let mut complete: HashMap<String, candle_core::Tensor> = report
        .loaded
        .iter()
        .map(|name| (name.clone(), renamed[name].clone()))
        .collect();
    for (name, current) in &entries {
        if report.missing.contains(name) {
            complete.insert(name.to_string(), current.to_candle());
        }
    }
    drop(entries);
    drop(layout);
    // `loaded` is sorted.
    let from_source = |name: &str| {
        report
            .loaded
            .binary_search_by(|n| n.as_str().cmp(name))
            .is_ok()
    };
    load_vetted(model, &complete, source, &from_source)?;
    Ok(report)
}
