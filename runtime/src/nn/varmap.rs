//! Interop with candle-nn (the `candle-nn` feature): a model's parameters and buffers from a
//! live `candle_nn::VarMap`, and written back into its `Var`s in place.

use std::collections::HashMap;

use super::load::named_entries;
use super::{load_state_dict_with, LoadOptions, LoadReport, ParamLayout, Parameters};
use crate::error::{Error, Result};

const SOURCE: &str = "VarMap";

/// Loads `model`'s parameters and buffers (BatchNorm's running statistics included) from
/// the current values of a candle-nn `VarMap`, as [`load_state_dict_with`] does: renaming
/// the `VarMap`'s names by `options`, strict or non-strict, all-or-nothing.
///
/// The values are copied: later changes to the `Var`s (candle-nn training, or
/// [`write_varmap`]) do not reach the model, and the model's tensors never alias a `Var`.
pub fn load_varmap<M: Parameters>(
    model: &mut M,
    varmap: &candle_nn::VarMap,
    options: &LoadOptions,
) -> Result<LoadReport> {
    let tensors = {
        let vars = lock(varmap)?;
        vars.iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?)))
            .collect::<Result<HashMap<_, _>>>()?
    };
    load_state_dict_with(model, &tensors, SOURCE, options)
}

/// Writes `model`'s parameters and buffers into the `Var`s of a candle-nn `VarMap`, in
/// place (`Var::set`), so a candle-nn model built on that `VarMap` computes with them.
///
/// Each `VarMap` name is renamed by `options` (the same options that loaded the model) and
/// receives the model's tensor of that name, converted to the `Var`'s device (and, with
/// `convert_dtype`, to its dtype). Strict by default: a `Var` the model has no tensor for,
/// or a model tensor with no `Var`, is [`Error::LoadMismatch`]; non-strict, those are left
/// alone and reported (`missing`: the model's names with no `Var`; `unexpected`: the
/// `VarMap`'s names, renamed, the model lacks). A shape that differs is `LoadMismatch`
/// either way, a dtype that differs without `convert_dtype` is [`Error::LoadDType`], a
/// tensor holding NaN or an infinity is [`Error::NonFinite`]; on any error no `Var` is
/// changed. The `VarMap` stays locked while it is written.
pub fn write_varmap<M: Parameters + Clone>(
    model: &M,
    varmap: &candle_nn::VarMap,
    options: &LoadOptions,
) -> Result<LoadReport> {
    let mut model = model.clone();
    let layout = ParamLayout::of(&mut model)?;
    let entries = named_entries(&layout);
    let vars = lock(varmap)?;
    let names: Vec<&String> = vars.keys().collect();
    let renamed = options.rename_all("write_varmap", names, SOURCE)?;
    let other = renamed
        .iter()
        .map(|(new, old)| {
            let var = &vars[*old];
            (new.clone(), (var.dims().to_vec(), var.dtype()))
        })
        .collect();
    let report = options.match_tensors(SOURCE, &entries, &other)?;
    let mut non_finite = Vec::new();
    let mut updates = Vec::with_capacity(report.loaded.len());
    for (name, t) in &entries {
        if !report.loaded.contains(name) {
            continue;
        }
        let value = t.to_candle();
        if !crate::tensor::anomaly::all_finite(&value)? {
            non_finite.push(name.to_string());
            continue;
        }
        let var = &vars[renamed[name.as_str()]];
        if !var.as_tensor().is_contiguous() {
            return Err(Error::InvalidArgument {
                op: "write_varmap",
                message: format!(
                    "the Var {} is not contiguous, so it cannot be set; nothing written",
                    renamed[name.as_str()]
                ),
            });
        }
        // A fresh copy even where nothing converts: `Var::set` refuses a tensor that shares
        // the `Var`'s storage, and a model built on the `Var`'s own tensors would.
        let value = if value.dtype() == var.dtype() && value.device().same_device(var.device()) {
            value.copy()?
        } else {
            value.to_dtype(var.dtype())?.to_device(var.device())?
        };
        updates.push((var, value));
    }
    if !non_finite.is_empty() {
        return Err(Error::NonFinite {
            what: format!(
                "write_varmap: nothing written; tensors {}",
                non_finite.join(", ")
            ),
        });
    }
    // Every check is done and every value converted: the sets below only copy data into
    // contiguous storage of the same shape and dtype.
    for (var, value) in updates {
        var.set(&value)?;
    }
    Ok(report)
}

fn lock(
    varmap: &candle_nn::VarMap,
) -> Result<std::sync::MutexGuard<'_, HashMap<String, candle_core::Var>>> {
    varmap.data().lock().map_err(|_| Error::InvalidArgument {
        op: "VarMap",
        message: "its lock is poisoned (a thread panicked while holding it)".into(),
    })
}
