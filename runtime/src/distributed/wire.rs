//! Bytes on the wire: tensors, words, and optimizer states (little-endian).

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::optim::{Scalar, State, StateTensor, StateValue};
use crate::tensor::Tensor;

/// A stable number for each dtype (candle's enum order is not a promise).
pub(super) fn dtype_code(dtype: DType) -> u64 {
    match dtype {
        DType::U8 => 1,
        DType::U32 => 2,
        DType::I16 => 3,
        DType::I32 => 4,
        DType::I64 => 5,
        DType::BF16 => 6,
        DType::F16 => 7,
        DType::F32 => 8,
        DType::F64 => 9,
        other => 100 + other.as_str().bytes().map(u64::from).sum::<u64>(),
    }
}

pub(super) fn dtype_from_code(code: u64) -> Option<DType> {
    [
        DType::U8,
        DType::U32,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::BF16,
        DType::F16,
        DType::F32,
        DType::F64,
    ]
    .into_iter()
    .find(|&d| dtype_code(d) == code)
}

pub(super) fn u64_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn truncated(op: &'static str, len: usize, unit: usize) -> Error {
    Error::Communication {
        op,
        message: format!("received {len} bytes, not a whole number of {unit}-byte values"),
    }
}

/// `bytes` as `N`-byte values read by `from` (a type's `from_le_bytes`).
fn decode<T, const N: usize>(
    bytes: &[u8],
    op: &'static str,
    from: fn([u8; N]) -> T,
) -> Result<Vec<T>> {
    if !bytes.len().is_multiple_of(N) {
        return Err(truncated(op, bytes.len(), N));
    }
    Ok(bytes
        .chunks_exact(N)
        .map(|c| from(c.try_into().expect("N bytes")))
        .collect())
}

pub(super) fn decode_u64(bytes: &[u8], op: &'static str) -> Result<Vec<u64>> {
    decode(bytes, op, u64::from_le_bytes)
}

pub(super) fn decode_f64(bytes: &[u8], op: &'static str) -> Result<Vec<f64>> {
    Ok(decode_u64(bytes, op)?
        .into_iter()
        .map(f64::from_bits)
        .collect())
}

pub(super) fn decode_f32(bytes: &[u8], op: &'static str) -> Result<Vec<f32>> {
    decode(bytes, op, f32::from_le_bytes)
}

/// The values' little-endian bytes.
macro_rules! le_bytes {
    ($flat:expr, $t:ty) => {
        $flat
            .to_vec1::<$t>()?
            .into_iter()
            .flat_map(<$t>::to_le_bytes)
            .collect()
    };
}

/// A tensor's values, flattened: every integer dtype and f32 as itself (bit for bit: an i64
/// above 2^53 would not survive a float), f64 and the half types as f64 (exact both ways
/// but for a NaN's payload, and the precision in which the host all-reduce sums
/// half-precision gradients). A dtype
/// that [`dtype_from_code`] cannot read back (candle's f8 and smaller floats) is an error on
/// the sending side, before any conversion.
pub(super) fn tensor_bytes(t: &candle_core::Tensor) -> Result<Vec<u8>> {
    if dtype_from_code(dtype_code(t.dtype())).is_none() {
        return Err(Error::UnsupportedDType {
            op: "distributed",
            dtype: t.dtype(),
            expected: "the wire carries u8, u32, i16, i32, i64, bf16, f16, f32 and f64",
        });
    }
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::U32 => le_bytes!(flat, u32),
        DType::I16 => le_bytes!(flat, i16),
        DType::I32 => le_bytes!(flat, i32),
        DType::I64 => le_bytes!(flat, i64),
        DType::F32 => le_bytes!(flat, f32),
        _ => le_bytes!(flat.to_dtype(DType::F64)?, f64),
    })
}

/// A 1-D CPU tensor of `values`.
fn cpu<T: candle_core::WithDType>(values: Vec<T>) -> candle_core::Result<candle_core::Tensor> {
    let n = values.len();
    candle_core::Tensor::from_vec(values, n, &Device::Cpu)
}

/// The inverse of [`tensor_bytes`]: a 1-D CPU tensor of `n` elements of `dtype`.
pub(super) fn tensor_from_bytes(
    bytes: &[u8],
    dtype: DType,
    n: usize,
) -> Result<candle_core::Tensor> {
    const OP: &str = "broadcast";
    let t = match dtype {
        DType::U8 => cpu(bytes.to_vec())?,
        DType::U32 => cpu(decode(bytes, OP, u32::from_le_bytes)?)?,
        DType::I16 => cpu(decode(bytes, OP, i16::from_le_bytes)?)?,
        DType::I32 => cpu(decode(bytes, OP, i32::from_le_bytes)?)?,
        DType::I64 => cpu(decode(bytes, OP, i64::from_le_bytes)?)?,
        DType::F32 => cpu(decode_f32(bytes, OP)?)?,
        _ => cpu(decode_f64(bytes, OP)?)?.to_dtype(dtype)?,
    };
    if t.elem_count() != n {
        return Err(Error::Communication {
            op: OP,
            message: format!("expected {n} values, received {}", t.elem_count()),
        });
    }
    Ok(t)
}

const TENSOR: u8 = 0;
const FLOAT: u8 = 1;
const SCALAR_TENSOR: u8 = 2;
const INT: u8 = 3;
/// Another key for an earlier tensor entry of the same state (entries that share one
/// tensor, so that an in-place update through one reaches the other).
const ALIAS: u8 = 4;

fn put_u64(out: &mut Vec<u8>, w: u64) {
    out.extend_from_slice(&w.to_le_bytes());
}

fn put_tensor(out: &mut Vec<u8>, t: &Tensor) -> Result<()> {
    put_u64(out, dtype_code(t.dtype()));
    put_u64(out, t.rank() as u64);
    for &d in t.dims() {
        put_u64(out, d as u64);
    }
    let data = tensor_bytes(t.value())?;
    put_u64(out, data.len() as u64);
    out.extend_from_slice(&data);
    Ok(())
}

/// Every entry of every state: a count, then per entry its key, kind and value; an entry
/// that shares an earlier entry's tensor is sent as the earlier entry's position.
pub(super) fn encode_states(states: &[State]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    put_u64(&mut out, states.len() as u64);
    for state in states {
        let entries: Vec<(&str, StateValue)> = state.entries().collect();
        put_u64(&mut out, entries.len() as u64);
        let mut sent: Vec<(usize, StateTensor)> = Vec::new();
        for (position, (key, value)) in entries.into_iter().enumerate() {
            put_u64(&mut out, key.len() as u64);
            out.extend_from_slice(key.as_bytes());
            match value {
                StateValue::Tensor(t) => {
                    let handle = state.get(key)?;
                    match sent.iter().find(|(_, h)| h.same_entry(&handle)) {
                        Some(&(earlier, _)) => {
                            out.push(ALIAS);
                            put_u64(&mut out, earlier as u64);
                        }
                        None => {
                            out.push(TENSOR);
                            put_tensor(&mut out, &t)?;
                            sent.push((position, handle));
                        }
                    }
                }
                StateValue::Scalar(Scalar::Float(v)) => {
                    out.push(FLOAT);
                    put_u64(&mut out, v.to_bits());
                }
                StateValue::Scalar(Scalar::Tensor(t)) => {
                    out.push(SCALAR_TENSOR);
                    put_tensor(&mut out, &t)?;
                }
                StateValue::Int(n) => {
                    out.push(INT);
                    put_u64(&mut out, n as u64);
                }
            }
        }
    }
    Ok(out)
}

/// Reads what [`encode_states`] wrote, with a typed error if it is cut short or malformed.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(malformed(format!(
                "cut short: {n} more bytes wanted at offset {} of {}",
                self.at,
                self.bytes.len()
            )));
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len())
            .ok_or_else(|| {
                malformed(format!(
                    "a length of {n} in a message of {} bytes",
                    self.bytes.len()
                ))
            })
    }

    fn tensor(&mut self, device: &Device) -> Result<Tensor> {
        let code = self.u64()?;
        let dtype =
            dtype_from_code(code).ok_or_else(|| malformed(format!("unknown dtype code {code}")))?;
        let rank = self.len()?;
        let dims = (0..rank)
            .map(|_| self.len())
            .collect::<Result<Vec<usize>>>()?;
        let count = dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| malformed(format!("a tensor of dims {dims:?}")))?;
        let n = self.len()?;
        let data = self.take(n)?;
        let flat = tensor_from_bytes(data, dtype, count)?;
        Ok(Tensor::new(flat.reshape(dims)?.to_device(device)?))
    }
}

fn malformed(message: String) -> Error {
    Error::Communication {
        op: "broadcast_optimizer_state",
        message: format!("malformed optimizer state: {message}"),
    }
}

pub(super) fn decode_states(bytes: &[u8], device: &Device) -> Result<Vec<State>> {
    let mut r = Reader { bytes, at: 0 };
    let count = r.len()?;
    let mut states = Vec::with_capacity(count);
    for _ in 0..count {
        let entries = r.len()?;
        let mut state = State::new();
        let mut keys: Vec<String> = Vec::new();
        for _ in 0..entries {
            let key_len = r.len()?;
            let key = std::str::from_utf8(r.take(key_len)?)
                .map_err(|_| malformed("a key that is not UTF-8".into()))?
                .to_string();
            keys.push(key.clone());
            let value = match r.take(1)?[0] {
                ALIAS => {
                    let earlier = r.u64()?;
                    let shared = usize::try_from(earlier)
                        .ok()
                        // An earlier entry: `keys` ends with this one.
                        .filter(|&e| e < keys.len() - 1)
                        .and_then(|e| state.get(&keys[e]).ok())
                        .ok_or_else(|| {
                            malformed(format!(
                                "entry {key:?} names entry {earlier}, not an earlier tensor entry"
                            ))
                        })?;
                    state.set(&key, shared);
                    continue;
                }
                TENSOR => StateValue::Tensor(r.tensor(device)?),
                FLOAT => StateValue::Scalar(Scalar::Float(f64::from_bits(r.u64()?))),
                SCALAR_TENSOR => StateValue::Scalar(Scalar::Tensor(r.tensor(device)?)),
                INT => StateValue::Int(r.u64()? as i64),
                kind => return Err(malformed(format!("unknown entry kind {kind}"))),
            };
            state.insert(&key, value);
        }
        states.push(state);
    }
    if r.at != bytes.len() {
        return Err(malformed(format!("{} bytes left over", bytes.len() - r.at)));
    }
    Ok(states)
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    put_u64(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

/// Lists of (what, value) texts: per list a count, then per pair both texts, each as its
/// byte count and bytes. What [`decode_text_pairs`] reads.
pub(super) fn encode_text_pairs(lists: &[&[(String, String)]]) -> Vec<u8> {
    let mut out = Vec::new();
    put_u64(&mut out, lists.len() as u64);
    for list in lists {
        put_u64(&mut out, list.len() as u64);
        for (what, value) in *list {
            put_text(&mut out, what);
            put_text(&mut out, value);
        }
    }
    out
}

/// The inverse of [`encode_text_pairs`], with a typed error if the bytes are cut short or
/// malformed.
pub(super) fn decode_text_pairs(bytes: &[u8]) -> Result<Vec<Vec<(String, String)>>> {
    let mut r = Reader { bytes, at: 0 };
    let text = |r: &mut Reader<'_>| -> Result<String> {
        let n = r.len()?;
        Ok(String::from_utf8_lossy(r.take(n)?).into_owned())
    };
    let lists = r.len()?;
    let mut out = Vec::new();
    for _ in 0..lists {
        let pairs = r.len()?;
        let mut list = Vec::new();
        for _ in 0..pairs {
            let what = text(&mut r)?;
            list.push((what, text(&mut r)?));
        }
        out.push(list);
    }
    if r.at != bytes.len() {
        return Err(malformed(format!("{} bytes left over", bytes.len() - r.at)));
    }
    Ok(out)
}
