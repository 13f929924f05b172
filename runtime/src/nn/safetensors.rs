//! Saving and loading parameters and buffers by name, in the safetensors format.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::load::without_tied_copies;
use super::{ParamLayout, Parameters};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Every parameter and buffer of `model` by dotted name (tied ones once), as candle
/// tensors: what [`save_safetensors`] writes.
pub fn state_dict<M: Parameters + Clone>(
    model: &M,
) -> Result<HashMap<String, candle_core::Tensor>> {
    let mut map = HashMap::new();
    for (n, t) in model.named_parameters()? {
        map.insert(n, t.to_candle());
    }
    for (n, t) in model.named_buffers()? {
        map.insert(n, t.to_candle());
    }
    Ok(map)
}

/// Writes every parameter and buffer of `model` to a safetensors file, by dotted name. A
/// file that cannot be written is [`Error::File`], naming it.
pub fn save_safetensors<M: Parameters + Clone>(model: &M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    candle_core::safetensors::save(&state_dict(model)?, path).map_err(|e| Error::File {
        op: "save_safetensors",
        path: path.display().to_string(),
        message: format!("cannot write: {e}"),
    })
}

/// Loads every parameter and buffer of `model` from a safetensors file, by name.
///
/// All names and shapes are checked before anything is replaced: any missing, extra or
/// mis-shaped tensor gives one [`Error::LoadMismatch`] listing them all, a tensor holding
/// NaN or an infinity gives [`Error::NonFinite`] naming them, and either way the model is
/// unchanged. Values are converted to the dtype and device of the tensor they replace (as
/// PyTorch's `load_state_dict` copies them); trainable parameters become fresh leaves,
/// frozen ones stay frozen. A tied parameter is loaded once, under its first name; the
/// source may also hold it under its other names (PyTorch's `state_dict` does) with the
/// same values, and different values there are an error naming both. A file that cannot be
/// read, or is not a safetensors file (truncated, corrupt), is [`Error::File`], naming it.
pub fn load_safetensors<M: Parameters>(model: &mut M, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let file_error = |message: String| Error::File {
        op: "load_safetensors",
        path: path.display().to_string(),
        message: format!("{message}; nothing loaded"),
    };
    let data = std::fs::read(path).map_err(|e| file_error(format!("cannot read: {e}")))?;
    let tensors = candle_core::safetensors::load_buffer(&data, &candle_core::Device::Cpu)
        .map_err(|e| file_error(format!("not a safetensors file candle can read: {e}")))?;
    load_state_dict(model, &tensors, &path.display().to_string())
}

/// Loads parameters and buffers from named candle tensors, with the checks of
/// [`load_safetensors`]; `source` names where they came from in the error.
pub fn load_state_dict<M: Parameters>(
    model: &mut M,
    tensors: &HashMap<String, candle_core::Tensor>,
    source: &str,
) -> Result<()> {
    let tensors = without_tied_copies(model, tensors, source)?;
    load_vetted(model, &tensors, source, &|_| true)
}

/// [`load_state_dict`] of a source that holds each tied tensor once, checking for NaN and
/// infinities only the tensors whose names `vetted` accepts (the others are the model's
/// own values, kept by a non-strict load).
pub(crate) fn load_vetted<M: Parameters>(
    model: &mut M,
    tensors: &HashMap<String, candle_core::Tensor>,
    source: &str,
    vetted: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let layout = ParamLayout::of(model)?;
    let current: Vec<(&String, &Tensor)> = layout
        .names
        .iter()
        .zip(&layout.tensors)
        .chain(layout.buffer_names.iter().zip(&layout.buffer_tensors))
        .collect();
    let known: HashSet<&str> = current.iter().map(|(n, _)| n.as_str()).collect();
    let mut missing = Vec::new();
    let mut mis_shaped = Vec::new();
    for (name, t) in &current {
        match tensors.get(name.as_str()) {
            None => missing.push(name.to_string()),
            Some(v) if v.dims() != t.dims() => {
                mis_shaped.push((name.to_string(), t.dims().to_vec(), v.dims().to_vec()))
            }
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<String> = tensors
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .cloned()
        .collect();
    unexpected.sort();
    if !(missing.is_empty() && unexpected.is_empty() && mis_shaped.is_empty()) {
        return Err(Error::LoadMismatch {
            source_name: source.to_string(),
            missing,
            unexpected,
            mis_shaped,
        });
    }
    // NaN or inf weights are never what a checkpoint should hold: refuse them all, by
    // name, before anything is replaced (one pass over the values; loading reads them anyway).
    let mut non_finite = Vec::new();
    for (name, _) in current.iter().filter(|(n, _)| vetted(n)) {
        if !crate::tensor::anomaly::all_finite(&tensors[name.as_str()])? {
            non_finite.push(name.to_string());
        }
    }
    if !non_finite.is_empty() {
        return Err(Error::NonFinite {
            what: format!(
                "{source}: nothing loaded; tensors {}",
                non_finite.join(", ")
            ),
        });
    }
    let convert = |name: &String, like: &Tensor| -> Result<Tensor> {
        let v = tensors[name.as_str()]
            .to_dtype(like.dtype())?
            .to_device(like.device())?;
        Ok(Tensor::new(v))
    };
    let params = layout
        .names
        .iter()
        .zip(&layout.tensors)
        .map(|(n, old)| {
            let t = convert(n, old)?;
            Ok(if old.requires_grad() { t.to_leaf() } else { t })
        })
        .collect::<Result<Vec<_>>>()?;
    let buffers = layout
        .buffer_names
        .iter()
        .zip(&layout.buffer_tensors)
        .map(|(n, old)| convert(n, old))
        .collect::<Result<Vec<_>>>()?;
    layout.write(model, &params)?;
    if let Err(e) = layout.write_buffers(model, &buffers) {
        // The parameters are in: put the listed ones back, so a failed load changes nothing.
        let _ = layout.write(model, &layout.tensors);
        return Err(e);
    }
    Ok(())
}
