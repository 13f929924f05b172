//! Meta-batches across processes: every process (rank) computes the meta-gradient of its
//! share of the tasks, the shares are summed by one collective call per dtype, and every rank
//! takes the same outer step.
//!
//! The engine is a [`Communicator`]: `MpiCommunicator` (feature `mpi`, over rsmpi and the
//! system's MPI library, run with `mpirun -np N`), `NcclCommunicator` (feature `nccl`, GPUs),
//! or [`SingleProcess`] (one rank, nothing sent). On top of it:
//!
//! - [`broadcast_model`] and [`broadcast_optimizer_state`]: rank 0's base model (parameters
//!   and buffers) and outer-optimizer state on every rank, before training;
//! - [`task_share`]: the contiguous block of task indices a rank computes;
//! - [`all_reduce_grads`]: a gradient store summed over ranks, as ONE flattened buffer per
//!   dtype, in the fixed order of the parameter list;
//! - [`meta_batch`]: the three together with [`crate::parallel::meta_batch`] on each rank, so
//!   that N ranks return the meta-gradient that one process computes over the whole batch.
//!
//! Every call here is collective: all ranks make it, in the same order. What can disagree
//! between ranks (parameter counts, names, shapes, dtypes, frozen flags, a gradient of the
//! wrong shape on one rank) is compared first, and then every rank returns
//! [`Error::RankMismatch`] naming the first rank that differs and what differs there, so no
//! rank is left waiting in a collective that the others skipped. What fails on one rank only
//! (a task of its share, a state it cannot send or read) is sent along the same way: that
//! rank returns its own error, the others [`Error::RankMismatch`] with its text.

use std::ops::Range;

use candle_core::{DType, Device};

use crate::autograd::GradStore;
use crate::error::{Error, Result};
use crate::nn::Parameters;
use crate::optim::{Hyperparameters, Optimizer, OptimizerStep};
use crate::parallel::{self, Combine};
use crate::tensor::Tensor;

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "mpi")]
pub use self::mpi::MpiCommunicator;

#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
pub use self::nccl::NcclCommunicator;

mod wire;

#[cfg(test)]
mod tests;

/// The collective operations the distributed helpers need, rank 0 being the root.
///
/// Implementations provide the two byte-level primitives; the tensor-level ones have default
/// implementations through host memory, which a GPU backend overrides to keep buffers on the
/// device.
pub trait Communicator {
    /// This process's rank, in `0..size()`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn size(&self) -> usize;

    /// Rank 0's `bytes` on every rank (the other ranks' `bytes` are ignored; lengths may
    /// differ).
    fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>>;

    /// Every rank's `bytes` (the same length on every rank), concatenated in rank order.
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>>;

    /// The element-wise sum over ranks of a 1-D floating point tensor of the same length on
    /// every rank, added in rank order, so every rank gets the same bits on every run. The
    /// default gathers all buffers on the host: traffic and memory grow with the number of
    /// ranks, which is cheap for meta-learning models (the Omniglot CNN has 112k parameters).
    fn all_reduce_sum(&self, buffer: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        host_all_reduce_sum(self, buffer)
    }

    /// Rank 0's 1-D tensor on every rank, exactly (integer dtypes bit for bit: an `i64`
    /// step counter or index above 2^53 included); the others pass a tensor of the same
    /// dtype and length (its values are ignored). The default sends the values' bytes
    /// through [`Communicator::broadcast_bytes`], each integer dtype as itself.
    fn broadcast(&self, buffer: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        host_broadcast(self, buffer)
    }
}

/// [`Communicator::all_reduce_sum`] through host memory and [`Communicator::all_gather_bytes`].
fn host_all_reduce_sum<C: Communicator + ?Sized>(
    comm: &C,
    buffer: &candle_core::Tensor,
) -> Result<candle_core::Tensor> {
    const OP: &str = "all_reduce_sum";
    if !buffer.dtype().is_float() {
        // The same on every rank (the layouts are compared first): no rank sends alone.
        return Err(unsupported(buffer.dtype()));
    }
    let size = comm.size();
    let n = buffer.elem_count();
    let gathered = comm.all_gather_bytes(&wire::tensor_bytes(buffer)?)?;
    let summed = match buffer.dtype() {
        DType::F32 => {
            let all = wire::decode_f32(&gathered, OP)?;
            check_gathered(OP, all.len(), n, size)?;
            candle_core::Tensor::from_vec(sum_in_rank_order(&all, n, size), n, &Device::Cpu)?
        }
        // f64, and the half types summed in f64 (their bytes are sent as f64).
        dtype if dtype.is_float() => {
            let all = wire::decode_f64(&gathered, OP)?;
            check_gathered(OP, all.len(), n, size)?;
            candle_core::Tensor::from_vec(sum_in_rank_order(&all, n, size), n, &Device::Cpu)?
                .to_dtype(dtype)?
        }
        dtype => return Err(unsupported(dtype)),
    };
    Ok(summed.to_device(buffer.device())?)
}

/// [`Communicator::broadcast`] through host memory and [`Communicator::broadcast_bytes`].
fn host_broadcast<C: Communicator + ?Sized>(
    comm: &C,
    buffer: &candle_core::Tensor,
) -> Result<candle_core::Tensor> {
    let bytes = comm.broadcast_bytes(&wire::tensor_bytes(buffer)?)?;
    let out = wire::tensor_from_bytes(&bytes, buffer.dtype(), buffer.elem_count())?;
    Ok(out.to_device(buffer.device())?)
}

/// The ranks of this run: with the `mpi` feature, MPI's world (`MpiCommunicator::init`:
/// `mpirun -np N program` gives N ranks, a plain start rank 0 of 1); without it,
/// [`SingleProcess`]. Call it once per process.
pub fn world() -> Result<Box<dyn Communicator>> {
    #[cfg(feature = "mpi")]
    return Ok(Box::new(MpiCommunicator::init()?));
    #[cfg(not(feature = "mpi"))]
    Ok(Box::new(SingleProcess))
}

/// One process alone: rank 0 of 1. Every collective returns its input. Programs written for
/// several ranks run unchanged without a launcher.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        Ok(bytes.to_vec())
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        Ok(bytes.to_vec())
    }
}

/// An all-gather must return `per_rank` values from each of `size` ranks (at least one): a
/// reply of another length (a communicator that cut it short) is an error, not an index out
/// of bounds.
fn check_gathered(op: &'static str, got: usize, per_rank: usize, size: usize) -> Result<()> {
    if size == 0 || Some(got) != per_rank.checked_mul(size) {
        return Err(Error::Communication {
            op,
            message: format!(
                "the all-gather returned {got} values, not {per_rank} from each of {size} ranks"
            ),
        });
    }
    Ok(())
}

/// Every rank's `words` (the same count on every rank), concatenated in rank order. The
/// first collective of every call: a communicator whose rank is not below its size is an
/// error here.
fn gather_words(comm: &dyn Communicator, op: &'static str, words: &[u64]) -> Result<Vec<u64>> {
    if comm.rank() >= comm.size() {
        return Err(Error::Communication {
            op,
            message: format!(
                "the communicator is rank {} of {}",
                comm.rank(),
                comm.size()
            ),
        });
    }
    let all = wire::decode_u64(&comm.all_gather_bytes(&wire::u64_bytes(words))?, op)?;
    check_gathered(op, all.len(), words.len(), comm.size())?;
    Ok(all)
}

fn sum_in_rank_order<T: Copy + std::ops::AddAssign>(all: &[T], n: usize, size: usize) -> Vec<T> {
    let mut out = all[..n].to_vec();
    for r in 1..size {
        for (o, v) in out.iter_mut().zip(&all[r * n..(r + 1) * n]) {
            *o += *v;
        }
    }
    out
}

fn unsupported(dtype: DType) -> Error {
    Error::UnsupportedDType {
        op: "all_reduce_sum",
        dtype,
        expected: "gradients are floating point (f32, f64, bf16, f16)",
    }
}

/// The contiguous block of task indices that `rank` of `size` computes: `tasks / size`
/// each, the first `tasks % size` ranks one more. The blocks cover `0..tasks` in rank
/// order, so summing the ranks' results in rank order adds the tasks in their order.
///
/// ```
/// # use candle_higher_runtime::distributed::task_share;
/// assert_eq!(task_share(7, 0, 2), 0..4);
/// assert_eq!(task_share(7, 1, 2), 4..7);
/// assert_eq!(task_share(1, 1, 2), 1..1); // nothing left for rank 1
/// ```
pub fn task_share(tasks: usize, rank: usize, size: usize) -> Range<usize> {
    let size = size.max(1);
    let (base, extra) = (tasks / size, tasks % size);
    // Saturating: a rank past `size` gets an empty range, not an overflow.
    let start = rank.saturating_mul(base).saturating_add(rank.min(extra));
    let len = if rank < extra { base + 1 } else { base };
    let start = start.min(tasks);
    start..start.saturating_add(len).min(tasks)
}

/// One tensor as [`check_layout`] compares it across ranks: always its dtype and shape; its
/// name and whether it requires grad where the call gives them (a model's parameters).
#[derive(Clone, Copy)]
struct Item<'a> {
    tensor: &'a Tensor,
    name: Option<&'a str>,
    requires_grad: Option<bool>,
}

impl<'a> Item<'a> {
    /// A tensor compared by dtype and shape only.
    fn plain(tensor: &'a Tensor) -> Self {
        Item {
            tensor,
            name: None,
            requires_grad: None,
        }
    }
}

/// No name, in [`layout_words`].
const NO_NAME: u64 = u64::MAX;

/// The items as words, for comparing layouts across ranks: the count, then per item its
/// dtype, rank, dims, requires-grad word (0: not compared, 1: frozen, 2: requires grad) and
/// name (its byte count, or [`NO_NAME`], then its bytes packed 8 to a word).
fn layout_words(items: &[Item<'_>]) -> Vec<u64> {
    let mut words = vec![items.len() as u64];
    for item in items {
        let t = item.tensor;
        words.push(wire::dtype_code(t.dtype()));
        words.push(t.rank() as u64);
        words.extend(t.dims().iter().map(|&d| d as u64));
        words.push(item.requires_grad.map_or(0, |r| 1 + u64::from(r)));
        match item.name {
            None => words.push(NO_NAME),
            Some(name) => {
                words.push(name.len() as u64);
                words.extend(name.as_bytes().chunks(8).map(|c| {
                    let mut w = [0u8; 8];
                    w[..c.len()].copy_from_slice(c);
                    u64::from_le_bytes(w)
                }));
            }
        }
    }
    words
}

/// One item of rank 0's [`layout_words`], read back.
struct RootItem {
    dtype: u64,
    dims: Vec<usize>,
    requires_grad: u64,
    name: Option<String>,
}

/// Reads the item at `*at` of `words`, moving `at` past it; `None` where the words end early.
fn read_item(words: &[u64], at: &mut usize) -> Option<RootItem> {
    let mut next = || {
        let w = words.get(*at).copied();
        *at += 1;
        w
    };
    let dtype = next()?;
    let rank = usize::try_from(next()?).ok()?;
    let dims = (0..rank.min(words.len()))
        .map(|_| next().map(|d| d as usize))
        .collect::<Option<Vec<_>>>()?;
    let requires_grad = next()?;
    let name = match next()? {
        NO_NAME => None,
        len => {
            let len = usize::try_from(len).ok()?;
            let packed = words.get(*at..*at + len.div_ceil(8))?;
            *at += packed.len();
            let bytes: Vec<u8> = packed.iter().flat_map(|w| w.to_le_bytes()).collect();
            Some(String::from_utf8_lossy(&bytes[..len]).into_owned())
        }
    };
    Some(RootItem {
        dtype,
        dims,
        requires_grad,
        name,
    })
}

fn fingerprint(words: &[u64]) -> u64 {
    // FNV-1a over the words' bytes: the same on every rank and build.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words {
        for b in w.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// [`fingerprint`] of a text.
fn fingerprint_text(text: &str) -> u64 {
    fingerprint(&text.bytes().map(u64::from).collect::<Vec<_>>())
}

fn describe(t: &Tensor) -> String {
    format!("{:?} {}", t.dims(), t.dtype().as_str())
}

/// The longest description of a problem that a rank sends to the others (longer ones are
/// cut): bounds what a rank allocates for a reply.
const MAX_TEXT: usize = 4096;

/// Every rank's `mine` (a description of its problem, "" for none), in rank order. Two
/// collectives (the lengths, then the texts padded to the longest), made only on the path
/// where some rank failed, by every rank.
fn all_gather_texts(comm: &dyn Communicator, op: &'static str, mine: &str) -> Result<Vec<String>> {
    let mut cut = mine.len().min(MAX_TEXT);
    while !mine.is_char_boundary(cut) {
        cut -= 1;
    }
    let mine = &mine.as_bytes()[..cut];
    let lengths = gather_words(comm, op, &[mine.len() as u64])?;
    let malformed = |message: String| Error::Communication { op, message };
    let lengths = lengths
        .iter()
        .map(|&n| usize::try_from(n).ok().filter(|&n| n <= MAX_TEXT))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| malformed(format!("a rank's message length is not at most {MAX_TEXT}")))?;
    let width = lengths.iter().copied().max().unwrap_or(0);
    let mut padded = mine.to_vec();
    padded.resize(width, 0);
    let all = comm.all_gather_bytes(&padded)?;
    check_gathered(op, all.len(), width, comm.size())?;
    Ok(lengths
        .iter()
        .enumerate()
        .map(|(r, &n)| String::from_utf8_lossy(&all[r * width..r * width + n]).into_owned())
        .collect())
}

/// The error of every rank that did not fail itself when the ranks in `bad` (at least one)
/// failed or differ: [`Error::RankMismatch`] naming the first, with its description and
/// those of the others.
fn mismatch(op: &'static str, bad: &[usize], texts: &[String]) -> Error {
    let text = |r: usize| match texts.get(r) {
        Some(t) if !t.is_empty() => t.as_str(),
        _ => "(no description)",
    };
    let mut what = text(bad[0]).to_string();
    for &r in &bad[1..] {
        what.push_str(&format!("; rank {r}: {}", text(r)));
    }
    Error::RankMismatch {
        op,
        rank: bad[0],
        what,
    }
}

/// Checks that every rank holds items of the same count, dtypes and shapes (and names and
/// requires-grad flags, where given) as rank 0 (`what` names them: "parameter", "buffer"),
/// plus a `local_problem` each rank may have found on its own. On any disagreement every
/// rank returns [`Error::RankMismatch`] naming the first rank that failed or differs, with
/// what that rank found (the difference from rank 0's layout, or its problem) and what the
/// other bad ranks found. A caller whose rank had a `local_problem` may return its own error
/// instead, after this returns. `notes` are three more words sent along; every rank's notes
/// are returned, in rank order.
fn check_layout(
    comm: &dyn Communicator,
    op: &'static str,
    what: &str,
    items: &[Item<'_>],
    local_problem: Option<String>,
    notes: [u64; 3],
) -> Result<Vec<[u64; 3]>> {
    let words = layout_words(items);
    let mine = [
        fingerprint(&words),
        u64::from(local_problem.is_some()),
        notes[0],
        notes[1],
        notes[2],
    ];
    let all = gather_words(comm, op, &mine)?;
    let ranks: Vec<&[u64]> = all.chunks(mine.len()).collect();
    let differs = |r: usize| ranks[r][0] != ranks[0][0];
    let bad: Vec<usize> = (0..ranks.len())
        .filter(|&r| differs(r) || ranks[r][1] != 0)
        .collect();
    if bad.is_empty() {
        return Ok(ranks.iter().map(|w| [w[2], w[3], w[4]]).collect());
    }
    // Rare path: rank 0's layout for the ranks that differ to compare with, then every bad
    // rank's description for all.
    let mut text = local_problem.unwrap_or_default();
    if (0..ranks.len()).any(differs) {
        let root_words = wire::decode_u64(&comm.broadcast_bytes(&wire::u64_bytes(&words))?, op)?;
        if text.is_empty() && differs(comm.rank()) {
            text = compare_layout(what, &root_words, items, comm.rank());
        }
    }
    let texts = all_gather_texts(comm, op, &text)?;
    Err(mismatch(op, &bad, &texts))
}

/// What differs between rank 0's layout words and the local items (on rank `me`).
fn compare_layout(what: &str, root_words: &[u64], items: &[Item<'_>], me: usize) -> String {
    let root_count = root_words.first().copied().unwrap_or(0);
    if root_count != items.len() as u64 {
        return format!(
            "{root_count} {what}s on rank 0, {} on rank {me}",
            items.len()
        );
    }
    let mut at = 1;
    for (i, item) in items.iter().enumerate() {
        let Some(root) = read_item(root_words, &mut at) else {
            break;
        };
        let t = item.tensor;
        if let (Some(root_name), Some(name)) = (&root.name, item.name) {
            if root_name != name {
                return format!("{what} {i} is {root_name:?} on rank 0, {name:?} on rank {me}");
            }
        }
        let label = item
            .name
            .map_or_else(|| format!("{what} {i}"), |n| format!("{what} {n:?}"));
        if root.dtype != wire::dtype_code(t.dtype()) || root.dims != t.dims() {
            let root_dtype = wire::dtype_from_code(root.dtype).map_or("?", |d| d.as_str());
            return format!(
                "{label} is {:?} {root_dtype} on rank 0, {} on rank {me}",
                root.dims,
                describe(t)
            );
        }
        let grad = |w: u64| if w == 2 { "requires grad" } else { "is frozen" };
        let mine = item.requires_grad.map_or(0, |r| 1 + u64::from(r));
        if root.requires_grad != mine && root.requires_grad != 0 && mine != 0 {
            return format!(
                "{label} {} on rank 0 but {} on rank {me}",
                grad(root.requires_grad),
                grad(mine)
            );
        }
    }
    format!("the {what} layouts differ")
}

/// Flattens `tensors` into one 1-D buffer per dtype (dtypes in a fixed order, tensors in
/// list order within each) and returns, per dtype, the buffer and the indices it holds. A
/// buffer is on the device of its first tensor: tensors of one dtype on several devices (a
/// placement that may differ between ranks) are not an error on one rank only, which would
/// leave the others waiting in the collective.
fn flatten_by_dtype(tensors: &[Tensor]) -> Result<Vec<(Vec<usize>, candle_core::Tensor)>> {
    let mut dtypes: Vec<DType> = tensors.iter().map(Tensor::dtype).collect();
    dtypes.sort_by_key(|d| wire::dtype_code(*d));
    dtypes.dedup();
    dtypes
        .into_iter()
        .map(|dtype| {
            let members: Vec<usize> = (0..tensors.len())
                .filter(|&i| tensors[i].dtype() == dtype)
                .collect();
            let device = tensors[members[0]].device();
            let parts = members
                .iter()
                .map(|&i| tensors[i].value().flatten_all()?.to_device(device))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok((members, candle_core::Tensor::cat(&parts, 0)?))
        })
        .collect()
}

/// Splits buffers made by [`flatten_by_dtype`] back into tensors shaped like `like`, each on
/// its `like`'s device.
fn unflatten(
    buffers: &[(Vec<usize>, candle_core::Tensor)],
    like: &[Tensor],
) -> Result<Vec<candle_core::Tensor>> {
    let mut out: Vec<Option<candle_core::Tensor>> = vec![None; like.len()];
    for (members, buffer) in buffers {
        let mut offset = 0;
        for &i in members {
            let n = like[i].elem_count();
            let part = buffer.narrow(0, offset, n)?.reshape(like[i].dims())?;
            out[i] = Some(part.to_device(like[i].device())?);
            offset += n;
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// Rank 0's values of `tensors` on every rank, one broadcast per dtype, exactly (integers
/// too, bit for bit). Every rank must pass tensors of the same count, dtypes and shapes
/// (else [`Error::RankMismatch`] on every rank). Returns constants (no gradient), on each
/// tensor's device.
pub fn broadcast_tensors(comm: &dyn Communicator, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    let items: Vec<Item<'_>> = tensors.iter().map(Item::plain).collect();
    check_layout(comm, "broadcast_tensors", "tensor", &items, None, [0; 3])?;
    broadcast_checked(comm, tensors)
}

fn broadcast_checked(comm: &dyn Communicator, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    let buffers = flatten_by_dtype(tensors)?
        .into_iter()
        .map(|(members, buffer)| Ok((members, comm.broadcast(&buffer)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(unflatten(&buffers, tensors)?
        .into_iter()
        .map(Tensor::new)
        .collect())
}

/// Gives every rank rank 0's base model: its parameters (trainable ones stay leaves that
/// require grad, frozen ones stay constants) and its buffers (batch-norm statistics, step
/// counters: integers arrive bit for bit). Call it once before training, on every rank,
/// after building the model the same way everywhere: different parameter or buffer counts,
/// names, shapes or dtypes, a parameter frozen on some ranks only, and layers in training
/// mode on some ranks and in evaluation mode on others, are [`Error::RankMismatch`] on every
/// rank, naming the parameter, and no model is changed. A model that cannot list its
/// parameters or buffers on one rank is that rank's own error there and
/// [`Error::RankMismatch`] on the others. Rank 0's model is left untouched (same tensors).
pub fn broadcast_model<M: Parameters + Clone>(
    comm: &dyn Communicator,
    model: &mut M,
) -> Result<()> {
    const OP: &str = "broadcast_model";
    // Listed before any collective, and a failure goes with the first check: a rank that
    // returned here would leave the others waiting in it.
    let listed = model
        .param_infos()
        .and_then(|params| Ok((params, model.named_buffers()?, training_words(model)?)));
    let (infos, named_buffers, training, failed) = match listed {
        Ok((params, buffers, training)) => (params, buffers, training, None),
        Err(e) => (Vec::new(), Vec::new(), [0; 3], Some(e)),
    };
    let problem = failed
        .as_ref()
        .map(|e| format!("its model's parameters or buffers could not be listed: {e}"));
    let items: Vec<Item<'_>> = infos
        .iter()
        .map(|p| Item {
            tensor: &p.tensor,
            name: Some(&p.name),
            requires_grad: Some(!p.frozen),
        })
        .collect();
    let checked = check_layout(comm, OP, "parameter", &items, problem, [0; 3]);
    if let Some(e) = failed {
        return Err(e);
    }
    checked?;
    let items: Vec<Item<'_>> = named_buffers
        .iter()
        .map(|(name, b)| Item {
            tensor: b,
            name: Some(name),
            requires_grad: None,
        })
        .collect();
    let notes = check_layout(comm, OP, "buffer", &items, None, training)?;
    if let Some(rank) = notes.iter().position(|n| *n != notes[0]) {
        let what = if notes[rank][1..] == notes[0][1..] {
            format!("other layers are in training mode on rank {rank} than on rank 0")
        } else {
            let (r0, r) = (&notes[0], &notes[rank]);
            format!(
                "layers in training mode: {} of {} on rank 0, {} of {} on rank {rank}",
                r0[1], r0[2], r[1], r[2]
            )
        };
        let what = format!("{what}; call `train()` or `eval()` alike on every rank");
        return Err(Error::RankMismatch { op: OP, rank, what });
    }
    let params: Vec<Tensor> = infos.into_iter().map(|p| p.tensor).collect();
    let buffers: Vec<Tensor> = named_buffers.into_iter().map(|(_, b)| b).collect();
    let all: Vec<Tensor> = params.iter().chain(&buffers).cloned().collect();
    let values = broadcast_checked(comm, &all)?;
    if comm.rank() == 0 {
        return Ok(());
    }
    let (new_params, new_buffers) = values.split_at(params.len());
    let new_params: Vec<Tensor> = params
        .iter()
        .zip(new_params)
        .map(|(old, new)| {
            if old.requires_grad() {
                new.to_leaf()
            } else {
                new.clone()
            }
        })
        .collect();
    let mut updated = model.clone();
    updated.set_parameters(&new_params)?;
    updated.set_buffers(new_buffers)?;
    *model = updated;
    Ok(())
}

/// A model's train/eval flags as [`check_layout`]'s notes: a fingerprint of every flag with
/// its layer's name, how many are set (training mode), and how many there are.
fn training_words<M: Parameters + Clone>(model: &M) -> Result<[u64; 3]> {
    let (mut words, mut set, mut flags) = (Vec::new(), 0, 0);
    crate::nn::walk(&mut model.clone(), &mut |name, entry| {
        if let crate::nn::Entry::Training(flag) = entry {
            words.extend(name.bytes().map(u64::from));
            words.push(u64::MAX - u64::from(*flag));
            set += u64::from(*flag);
            flags += 1;
        }
        Ok(())
    })?;
    Ok([fingerprint(&words), set, flags])
}

/// Gives every rank rank 0's outer-optimizer state (moment estimates, step counters, ...),
/// exactly (integer tensors bit for bit), its tensors placed on `device` on every rank, rank
/// 0 included, and in the same form everywhere: constants, in entries of their own (an
/// in-place update through a handle taken before the call reaches none of them), entries
/// that shared one tensor (an in-place update through one reaches the other) still sharing
/// one.
///
/// The hyperparameters are not sent: build the optimizer the same way on every rank.
/// Different parameter counts, optimizer types, parameter groups or hyperparameters (every
/// field, flags such as `amsgrad` too, compared by their `Debug` text) and different tensors
/// given by [`Optimizer::inject`] (injected on some ranks only, of another value or dtype, or
/// requiring grad on some ranks only; `inject` keeps its one element as a 0-dim tensor, so
/// `[1]` and `[]` are the same) are [`Error::RankMismatch`] on every rank, naming the first
/// rank that differs and the group or hyperparameter that differs there.
/// Injected tensors are compared, not broadcast: the optimizer holds the caller's own tensor
/// (a learned learning rate that the meta-gradient reaches), which a copy from rank 0 would
/// cut off; to start every rank from rank 0's value, broadcast the tensor
/// ([`broadcast_tensors`]) and inject the result on every rank.
///
/// A state that rank 0 cannot send or a rank cannot read or place on `device` is that rank's
/// own error there and [`Error::RankMismatch`] on the others. On any error no optimizer is
/// changed.
pub fn broadcast_optimizer_state<O: Hyperparameters + OptimizerStep + std::fmt::Debug>(
    comm: &dyn Communicator,
    optimizer: &mut Optimizer<O>,
    device: &Device,
) -> Result<()> {
    const OP: &str = "broadcast_optimizer_state";
    let type_name = std::any::type_name::<O>();
    let settings = optimizer_settings(optimizer);
    let mut groups = Vec::new();
    for g in optimizer.groups() {
        // The floats to the bit (their text rounds a NaN's payload).
        groups.extend(
            O::FLOAT_NAMES
                .iter()
                .map(|name| g.hyperparameters.float(name).map_or(u64::MAX, f64::to_bits)),
        );
    }
    // Each group's parameters, floats and `Debug` text (the fields that are not floats,
    // Adam's `amsgrad`, SGD's `nesterov`, change the step as much; `Debug`, which
    // `#[differentiable_optimizer]` derives, shows them all), and the injected tensors.
    for (what, value) in settings.iter().flatten() {
        groups.push(fingerprint_text(what));
        groups.push(fingerprint_text(value));
    }
    let mine = [
        optimizer.n_params() as u64,
        fingerprint_text(type_name),
        fingerprint(&groups),
    ];
    let all = gather_words(comm, OP, &mine)?;
    let ranks: Vec<&[u64]> = all.chunks(mine.len()).collect();
    // What rank `rank` of a different size or type says; `None` when only its groups or
    // hyperparameters differ.
    let size_or_type = |rank: usize| {
        if ranks[rank][0] != ranks[0][0] {
            Some(format!(
                "the optimizer holds {} parameters on rank 0, {} on rank {rank}",
                ranks[0][0], ranks[rank][0]
            ))
        } else if ranks[rank][1] != ranks[0][1] {
            Some(format!(
                "rank {rank}'s optimizer is of another type (this rank's is {type_name})"
            ))
        } else {
            None
        }
    };
    if let Some(rank) = ranks.iter().position(|w| *w != ranks[0]) {
        if let Some(what) = size_or_type(rank) {
            return Err(Error::RankMismatch { op: OP, rank, what });
        }
        // Rare path, taken by every rank alike (the words are the same everywhere): rank 0's
        // settings for the ranks that differ to compare with, then each of those ranks' words
        // for all.
        let bad: Vec<usize> = (0..ranks.len()).filter(|&r| ranks[r] != ranks[0]).collect();
        let lists: Vec<&[(String, String)]> = settings.iter().map(Vec::as_slice).collect();
        let root = comm.broadcast_bytes(&wire::encode_text_pairs(&lists))?;
        let me = comm.rank();
        let text = if !bad.contains(&me) {
            String::new()
        } else if let Some(what) = size_or_type(me) {
            what
        } else {
            compare_settings(&root, &settings, me)
        };
        let texts = all_gather_texts(comm, OP, &text)?;
        return Err(mismatch(OP, &bad, &texts));
    }
    let encoded = (comm.rank() == 0).then(|| wire::encode_states(optimizer.states()));
    let sent = match &encoded {
        Some(Ok(bytes)) => bytes.as_slice(),
        _ => &[],
    };
    let bytes = comm.broadcast_bytes(sent)?;
    let not_sent = matches!(encoded, Some(Err(_)));
    // Rank 0 places its own states on `device` as the other ranks place what they read.
    let (received, failed_to) = match encoded {
        Some(Err(e)) => (Err(e), "send its optimizer state"),
        Some(Ok(_)) => (
            place_states(optimizer.states(), device),
            "place its optimizer state on the device",
        ),
        None => (
            wire::decode_states(&bytes, device),
            "read rank 0's optimizer state",
        ),
    };
    // Whether each rank could send, read and place the states: a failure on one rank is an
    // error on every rank, not a success on the others only. The rank that failed keeps its
    // own error; a rank that could not read what rank 0 could not send has no failure of its
    // own.
    let status = match &received {
        Ok(_) => STATE_OK,
        Err(_) if not_sent => STATE_NOT_SENT,
        Err(_) => STATE_FAILED,
    };
    let ok = gather_words(comm, OP, &[status])?;
    let bad: Vec<usize> = if ok[0] == STATE_NOT_SENT {
        vec![0]
    } else {
        (0..ok.len()).filter(|&r| ok[r] != STATE_OK).collect()
    };
    if !bad.is_empty() {
        let own = received.err().filter(|_| bad.contains(&comm.rank()));
        let text = match &own {
            Some(e) => format!("it could not {failed_to}: {e}"),
            None => String::new(),
        };
        let texts = all_gather_texts(comm, OP, &text);
        if let Some(e) = own {
            return Err(e);
        }
        return Err(mismatch(OP, &bad, &texts?));
    }
    optimizer.set_states(received?)
}

/// [`broadcast_optimizer_state`]'s status word: this rank's states are ready.
const STATE_OK: u64 = 1;
/// ... this rank failed (to read or place them).
const STATE_FAILED: u64 = 0;
/// ... rank 0 could not encode its states and sent nothing.
const STATE_NOT_SENT: u64 = 2;

/// `states` with every tensor a constant on `device`, as [`wire::decode_states`] gives them
/// to the ranks that receive them: entries of their own, shared ones still shared.
fn place_states(
    states: &[crate::optim::State],
    device: &Device,
) -> Result<Vec<crate::optim::State>> {
    states
        .iter()
        .map(|s| s.map_tensors(|t| Ok(Tensor::new(t.value().to_device(device)?))))
        .collect()
}

/// What the ranks' optimizers must agree on beyond their size and type, as (what, value)
/// texts that name a difference: the groups (their count, and per group its parameters,
/// every float, and its `Debug` text), then the tensors of [`Optimizer::inject`] by name.
fn optimizer_settings<O: Hyperparameters + OptimizerStep + std::fmt::Debug>(
    optimizer: &Optimizer<O>,
) -> [Vec<(String, String)>; 2] {
    let groups = optimizer.groups();
    let mut facts = vec![(
        "the number of parameter groups".to_string(),
        groups.len().to_string(),
    )];
    for (g, group) in groups.iter().enumerate() {
        facts.push((
            format!("parameter group {g}'s parameter list"),
            format!("{:?}", group.params),
        ));
        for name in O::FLOAT_NAMES {
            let value = group.hyperparameters.float(name);
            facts.push((
                format!("hyperparameter {name:?} of parameter group {g}"),
                value.map_or_else(|| "unset".to_string(), |v| format!("{v:?}")),
            ));
        }
        facts.push((
            format!("parameter group {g}"),
            format!("{:?}", group.hyperparameters),
        ));
    }
    let mut injected: Vec<(String, String)> = optimizer
        .injected()
        .entries()
        .map(|(name, values)| {
            let shown: Vec<String> = values.iter().map(describe_scalar).collect();
            (name.to_string(), shown.join(", "))
        })
        .collect();
    // The order of `inject` calls for different names changes nothing.
    injected.sort();
    [facts, injected]
}

/// A hyperparameter's value as [`optimizer_settings`] compares it: a float exactly (Rust's
/// shortest text that reads back to the same f64); a tensor's values likewise, with its
/// dtype, its shape if it has dimensions, and whether it requires grad.
fn describe_scalar(value: &crate::optim::Scalar) -> String {
    let t = match value {
        crate::optim::Scalar::Float(v) => return format!("{v:?}"),
        crate::optim::Scalar::Tensor(t) => t,
    };
    let flat = t.value().flatten_all();
    let values = if t.dtype().is_float() {
        flat.and_then(|f| f.to_dtype(DType::F64)?.to_vec1::<f64>())
            .map(|v| v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>())
    } else {
        flat.and_then(|f| f.to_dtype(DType::I64)?.to_vec1::<i64>())
            .map(|v| v.iter().map(i64::to_string).collect::<Vec<_>>())
    };
    let values = match values {
        Ok(v) if v.len() == 1 => v[0].clone(),
        Ok(v) => format!("[{}]", v.join(", ")),
        Err(e) => format!("(unreadable: {e})"),
    };
    let shape = if t.rank() > 0 {
        format!(" {:?}", t.dims())
    } else {
        String::new()
    };
    let grad = if t.requires_grad() {
        "requires grad"
    } else {
        "constant"
    };
    format!("{values} ({}{shape}, {grad})", t.dtype().as_str())
}

/// What differs between rank 0's [`optimizer_settings`] (as `root_bytes`) and `mine` (on
/// rank `me`), in words that name the group or hyperparameter.
fn compare_settings(root_bytes: &[u8], mine: &[Vec<(String, String)>; 2], me: usize) -> String {
    const SAME_WAY: &str = "build the optimizer the same way on every rank";
    let fallback =
        format!("rank {me}'s optimizer has other parameter groups or hyperparameters; {SAME_WAY}");
    let root = match wire::decode_text_pairs(root_bytes) {
        Ok(lists) if lists.len() == 2 => lists,
        _ => return fallback,
    };
    let (root_facts, root_injected) = (&root[0], &root[1]);
    let [facts, injected] = mine;
    for ((root_what, root_value), (what, value)) in root_facts.iter().zip(facts) {
        if root_what != what {
            break;
        }
        if root_value != value {
            return format!("{what} is {root_value} on rank 0, {value} on rank {me}; {SAME_WAY}");
        }
    }
    if root_facts != facts {
        return fallback;
    }
    let value_of = |list: &[(String, String)], name: &str| {
        list.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    };
    let mut names: Vec<&str> = root_injected
        .iter()
        .chain(injected)
        .map(|(n, _)| n.as_str())
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let what = match (value_of(root_injected, name), value_of(injected, name)) {
            (Some(r), Some(m)) if r == m => continue,
            (Some(r), Some(m)) => format!(
                "hyperparameter {name:?} is injected (Optimizer::inject) as {r} on rank 0, \
                 {m} on rank {me}"
            ),
            (Some(r), None) => format!(
                "hyperparameter {name:?} is injected (Optimizer::inject) as {r} on rank 0 but \
                 not on rank {me}"
            ),
            (None, Some(m)) => format!(
                "hyperparameter {name:?} is injected (Optimizer::inject) as {m} on rank {me} \
                 but not on rank 0"
            ),
            (None, None) => continue,
        };
        return format!("{what}; inject the same tensor on every rank");
    }
    fallback
}

/// Sums a gradient store over all ranks: the gradients of `params` (every rank passes its
/// own copy of the same parameter list: the same count, shapes and dtypes) are flattened
/// into ONE buffer per dtype, in list order, and summed by one collective call per dtype,
/// added in rank order, so every rank gets the same bits on every run. A parameter with a
/// gradient on some rank but not on this one counts zeros here; one with a gradient on no
/// rank has none in the result. The result is keyed by this rank's `params`, ready for
/// [`Optimizer::step`]; gradients of leaves not in `params` (a learned hyperparameter kept
/// outside the model, say) are not summed and not returned: list them in `params`.
///
/// Ranks with different parameter layouts, or a gradient whose shape, dtype or device is not
/// its parameter's, are [`Error::RankMismatch`] on every rank.
pub fn all_reduce_grads(
    comm: &dyn Communicator,
    params: &[Tensor],
    grads: &GradStore,
) -> Result<GradStore> {
    reduce_grads(comm, "all_reduce_grads", params, grads, None, [0, 0])
}

/// [`all_reduce_grads`] as `op`, with a problem this rank found before (its tasks failed)
/// and two words of the call that every rank must agree on ([`meta_batch`]'s task count and
/// combine): both go with the layout check, so that they cost no collective of their own
/// and every rank returns the same error.
fn reduce_grads(
    comm: &dyn Communicator,
    op: &'static str,
    params: &[Tensor],
    grads: &GradStore,
    earlier_problem: Option<String>,
    call: [u64; 2],
) -> Result<GradStore> {
    let local: Vec<Option<&Tensor>> = params.iter().map(|p| grads.get(p)).collect();
    let problem = earlier_problem.or_else(|| {
        params
            .iter()
            .zip(&local)
            .enumerate()
            .find_map(|(i, (p, g))| {
                let g = (*g)?;
                if g.dims() != p.dims() || g.dtype() != p.dtype() {
                    Some(format!(
                        "the gradient of parameter {i} is {} but the parameter is {}",
                        describe(g),
                        describe(p)
                    ))
                } else if !g.device().same_device(p.device()) {
                    // It would fail the optimizer's step on this rank only.
                    Some(format!(
                        "the gradient of parameter {i} is on {:?} but the parameter on {:?}",
                        g.device().location(),
                        p.device().location()
                    ))
                } else {
                    None
                }
            })
    });
    let items: Vec<Item<'_>> = params.iter().map(Item::plain).collect();
    let complete = u64::from(local.iter().all(Option::is_some));
    let notes = check_layout(
        comm,
        op,
        "parameter",
        &items,
        problem,
        [complete, call[0], call[1]],
    )?;
    if let Some(rank) = notes.iter().position(|n| n[1..] != notes[0][1..]) {
        let combine = |n: &[u64; 3]| if n[2] == 1 { "Mean" } else { "Sum" };
        return Err(Error::RankMismatch {
            op,
            rank,
            what: format!(
                "a meta-batch of {} tasks (Combine::{}) on rank 0, of {} (Combine::{}) on rank \
                 {rank}",
                notes[0][1],
                combine(&notes[0]),
                notes[rank][1],
                combine(&notes[rank])
            ),
        });
    }
    let present: Vec<usize> = if notes.iter().all(|n| n[0] == 1) {
        (0..params.len()).collect() // the common case: no more messages
    } else {
        // Which parameters have a gradient somewhere: one bit each, OR-ed over ranks.
        let words = params.len().div_ceil(64);
        let mut mask = vec![0u64; words];
        for (i, g) in local.iter().enumerate() {
            if g.is_some() {
                mask[i / 64] |= 1 << (i % 64);
            }
        }
        let gathered = gather_words(comm, op, &mask)?;
        let any =
            |i: usize| (0..comm.size()).any(|r| gathered[r * words + i / 64] >> (i % 64) & 1 == 1);
        (0..params.len()).filter(|&i| any(i)).collect()
    };
    let values = present
        .iter()
        .map(|&i| match local[i] {
            Some(g) => Ok(g.clone()),
            None => params[i].zeros_like(),
        })
        .collect::<Result<Vec<Tensor>>>()?;
    let summed = flatten_by_dtype(&values)?
        .into_iter()
        .map(|(members, buffer)| Ok((members, comm.all_reduce_sum(&buffer)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut out = GradStore::default();
    for (&i, g) in present.iter().zip(unflatten(&summed, &values)?) {
        out.insert(&params[i], Tensor::new(g));
    }
    Ok(out)
}

/// [`crate::parallel::meta_batch`] across ranks: this rank runs its [`task_share`] of
/// `0..tasks` on `threads` threads (`task(i)` gets the global task index), the ranks' sums
/// are combined by [`all_reduce_grads`] over `params`, and `combine` is applied over all
/// `tasks`. Every rank gets the same store, equal (to rounding: the tasks are added in the
/// same order, grouped by rank) to what one process computes over the whole meta-batch.
///
/// An error in one rank's share (a task that fails or panics, 0 threads) is sent along with
/// the all-reduce's layout check, so that no rank is left waiting: that rank returns its own
/// error, unchanged (a task's [`Error::NonFinite`] stays one; a panic is the
/// [`Error::InvalidArgument`] of [`crate::parallel::meta_batch`]), and every other rank
/// returns [`Error::RankMismatch`] naming the first rank that failed, with its error's text
/// (and those of the others that failed). Ranks given different `tasks` or `combine` are
/// [`Error::RankMismatch`] on every rank.
pub fn meta_batch(
    comm: &dyn Communicator,
    params: &[Tensor],
    tasks: usize,
    threads: usize,
    combine: Combine,
    task: impl Fn(usize) -> Result<GradStore> + Sync,
) -> Result<GradStore> {
    let share = task_share(tasks, comm.rank(), comm.size());
    let (local, failed) = match parallel::meta_batch_of(share, threads, Combine::Sum, task) {
        Ok(local) => (local, None),
        Err(e) => (GradStore::default(), Some(e)),
    };
    let problem = failed
        .as_ref()
        .map(|e| format!("its share of the tasks failed: {e}"));
    let call = [tasks as u64, u64::from(combine == Combine::Mean)];
    let reduced = reduce_grads(comm, "meta_batch", params, &local, problem, call);
    // After the collectives that tell the other ranks: the caller here can match on what
    // went wrong (skip a batch on `NonFinite`) as it would on one process.
    if let Some(e) = failed {
        return Err(e);
    }
    let mut total = reduced?;
    if combine == Combine::Mean && tasks > 0 {
        total.scale(1.0 / tasks as f64)?;
    }
    Ok(total)
}
