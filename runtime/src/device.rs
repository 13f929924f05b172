//! The device chosen by the environment, so that tests, examples and benchmarks run on a
//! GPU without edits: `CANDLE_HIGHER_DEVICE` = `cpu` (the default), `cuda:N` or `metal:N`.

use std::sync::Mutex;

use candle_core::Device;

use crate::error::{Error, Result};

/// The device `CANDLE_HIGHER_DEVICE` names (`cpu` when unset). `cuda:N` and `metal:N`
/// need the `cuda` / `metal` cargo feature; an unknown name, a bad ordinal or a device
/// that cannot be opened is an error that says which. A device is opened once per process
/// and every call returns it (candle treats two openings of one GPU as two devices).
///
/// ```
/// // With the variable unset, the CPU.
/// # std::env::remove_var("CANDLE_HIGHER_DEVICE");
/// assert!(candle_higher_runtime::device_from_env().unwrap().is_cpu());
/// ```
pub fn device_from_env() -> Result<Device> {
    match std::env::var("CANDLE_HIGHER_DEVICE") {
        Ok(spec) => parse_device(&spec),
        Err(std::env::VarError::NotPresent) => Ok(Device::Cpu),
        // Not the CPU silently: the user asked for some device.
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::InvalidArgument {
            op: "device",
            message: format!(
                "CANDLE_HIGHER_DEVICE is not valid unicode ({v:?}); expected cpu, cuda:N or metal:N"
            ),
        }),
    }
}

/// `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N` as a device, opened once per process.
pub fn parse_device(spec: &str) -> Result<Device> {
    static OPENED: Mutex<Vec<(String, Device)>> = Mutex::new(Vec::new());
    let mut opened = OPENED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, d)) = opened.iter().find(|(s, _)| s == spec) {
        return Ok(d.clone());
    }
    let device = open(spec)?;
    opened.push((spec.to_string(), device.clone()));
    Ok(device)
}

fn open(spec: &str) -> Result<Device> {
    let bad = |message: String| Error::InvalidArgument {
        op: "device",
        message,
    };
    let (kind, ordinal) = spec.split_once(':').unwrap_or((spec, "0"));
    let ordinal: usize = ordinal
        .parse()
        .map_err(|_| bad(format!("\"{spec}\": the ordinal after ':' is not a number")))?;
    let device = match kind {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Device::new_cuda(ordinal),
        "metal" => Device::new_metal(ordinal),
        _ => return Err(bad(format!("\"{spec}\": expected cpu, cuda:N or metal:N"))),
    };
    device.map_err(|e| bad(format!("\"{spec}\" cannot be opened: {e}")))
}

#[cfg(test)]
mod tests {
    use super::parse_device;

    #[test]
    fn names_parse_and_bad_ones_say_why() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let err = parse_device("tpu:0").unwrap_err().to_string();
        assert!(err.contains("expected cpu, cuda:N or metal:N"), "{err}");
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("not a number"), "{err}");
        if !cfg!(feature = "cuda") {
            let err = parse_device("cuda:0").unwrap_err().to_string();
            assert!(err.contains("cannot be opened"), "{err}");
        }
    }
}
