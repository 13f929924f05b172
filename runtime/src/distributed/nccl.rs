//! [`NcclCommunicator`]: the gradient all-reduce and the parameter broadcast on GPUs, through
//! NCCL (candle's `nccl` feature, cudarc's bindings), one rank per GPU.
//!
//! Type-checked only (against a stand-in `nvcc`, without a CUDA toolkit or GPU): never run.

use std::fmt;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape};

use super::Communicator;
use crate::error::{Error, Result};

/// The ranks of a multi-GPU job, one GPU each, over NCCL. A `bootstrap` communicator (e.g.
/// an `MpiCommunicator`) sends NCCL's unique id from rank 0 and carries the small host-side
/// messages (layout checks, optimizer state); the gradient buffers of
/// [`super::all_reduce_grads`] and the parameters of [`super::broadcast_model`] stay on the
/// GPU and go through NCCL (f32 and f64, a buffer on another device through this rank's GPU;
/// other dtypes take the host path, integers bit for bit). NCCL reduces each
/// element once and copies the result, so every rank gets the same bits; the order of the
/// sum is NCCL's, which can differ from one process's task order by rounding.
///
/// ```ignore
/// // With the features `nccl` and `mpi`:
/// # use candle_higher_runtime::distributed::{Communicator, MpiCommunicator, NcclCommunicator};
/// # use candle_higher_runtime::Device;
/// let mpi = MpiCommunicator::init()?;
/// let device = Device::new_cuda(mpi.rank())?; // one GPU per rank on this machine
/// let comm = NcclCommunicator::new(Box::new(mpi), &device)?;
/// # Ok::<(), candle_higher_runtime::Error>(())
/// ```
pub struct NcclCommunicator {
    comm: Comm,
    bootstrap: Box<dyn Communicator>,
    /// This rank's GPU, where every NCCL collective runs.
    device: Device,
}

/// NCCL's unique id is 128 bytes.
const ID_BYTES: usize = 128;

fn nccl_error(op: &'static str, e: impl fmt::Debug) -> Error {
    Error::Communication {
        op,
        message: format!("NCCL failed: {e:?}"),
    }
}

impl NcclCommunicator {
    /// Joins every rank of `bootstrap` into one NCCL communicator, this rank on `device` (a
    /// CUDA device; each rank its own GPU). Collective: every rank calls it. A rank whose
    /// device is not CUDA, or a failure to create NCCL's id on rank 0, is an error on every
    /// rank.
    pub fn new(bootstrap: Box<dyn Communicator>, device: &Device) -> Result<Self> {
        const OP: &str = "NcclCommunicator::new";
        let cuda: Option<&CudaDevice> = match device {
            Device::Cuda(d) => Some(d),
            _ => None,
        };
        let flags = bootstrap.all_gather_bytes(&[u8::from(cuda.is_some())])?;
        if let Some(rank) = flags.iter().position(|&f| f == 0) {
            return Err(Error::RankMismatch {
                op: OP,
                rank,
                what: format!("rank {rank}'s device is not a CUDA device"),
            });
        }
        let cuda = cuda.expect("checked on every rank");
        // Rank 0 sends the id, or nothing if it could not make one (every rank then fails).
        let mut made = Vec::new();
        let mut failure = None;
        if bootstrap.rank() == 0 {
            match Id::new() {
                Ok(id) => made = id.internal().iter().map(|&c| c as u8).collect(),
                Err(e) => failure = Some(nccl_error(OP, e)),
            }
        }
        let bytes = bootstrap.broadcast_bytes(&made)?;
        if let Some(e) = failure {
            return Err(e);
        }
        if bytes.len() != ID_BYTES {
            return Err(Error::Communication {
                op: OP,
                message: format!(
                    "rank 0 sent an NCCL id of {} bytes, not {ID_BYTES} (it could not create one)",
                    bytes.len()
                ),
            });
        }
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (d, &s) in internal.iter_mut().zip(&bytes) {
            *d = s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            cuda.cuda_stream(),
            bootstrap.rank(),
            bootstrap.size(),
            Id::uninit(internal),
        )
        .map_err(|e| nccl_error(OP, e))?;
        Ok(NcclCommunicator {
            comm,
            bootstrap,
            device: device.clone(),
        })
    }

    /// Whether a buffer goes through NCCL: by its dtype only, which every rank has checked
    /// to be the same, never by its device, which may differ between ranks (a rank that
    /// took the host path while the others waited in NCCL would hang them).
    fn through_nccl(buffer: &candle_core::Tensor) -> bool {
        matches!(buffer.dtype(), DType::F32 | DType::F64)
    }

    /// `kind` on `buffer`, on this rank's GPU, the result back on `buffer`'s device.
    fn run(&self, buffer: &candle_core::Tensor, kind: Kind) -> Result<candle_core::Tensor> {
        let op = NcclOp {
            comm: &self.comm,
            kind,
        };
        let out = buffer.to_device(&self.device)?.apply_op1_no_bwd(&op)?;
        Ok(out.to_device(buffer.device())?)
    }
}

impl fmt::Debug for NcclCommunicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclCommunicator")
            .field("rank", &self.comm.rank())
            .field("size", &self.comm.world_size())
            .finish()
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.bootstrap.rank()
    }

    fn size(&self) -> usize {
        self.bootstrap.size()
    }

    fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        self.bootstrap.broadcast_bytes(bytes)
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        self.bootstrap.all_gather_bytes(bytes)
    }

    fn all_reduce_sum(&self, buffer: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        if !Self::through_nccl(buffer) {
            return super::host_all_reduce_sum(self, buffer);
        }
        self.run(buffer, Kind::AllReduceSum)
    }

    fn broadcast(&self, buffer: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        if !Self::through_nccl(buffer) {
            return super::host_broadcast(self, buffer);
        }
        self.run(buffer, Kind::BroadcastFromRank0)
    }
}

#[derive(Clone, Copy)]
enum Kind {
    AllReduceSum,
    BroadcastFromRank0,
}

/// One NCCL collective on a CUDA tensor, as a candle custom op (candle's own
/// `llama_multiprocess` example does its all-reduce this way), on the device's stream.
struct NcclOp<'a> {
    comm: &'a Comm,
    kind: Kind,
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::AllReduceSum => "nccl-all-reduce",
            Kind::BroadcastFromRank0 => "nccl-broadcast",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{}: the buffer must be on a CUDA device", self.name())
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: the buffer must be contiguous", self.name())
        };
        let n = layout.shape().elem_count();
        let dev = storage.device().clone();
        let failed = |e: candle_core::cuda_backend::cudarc::nccl::result::NcclError| {
            candle_core::Error::Msg(format!("{}: NCCL failed: {e:?}", self.name()))
        };
        macro_rules! run {
            ($t:ty) => {{
                let src = storage.as_cuda_slice::<$t>()?.slice(start..end);
                // SAFETY: every element of `dst` is written by the collective before it is read.
                let mut dst = unsafe { dev.alloc::<$t>(n) }?;
                match self.kind {
                    Kind::AllReduceSum => self
                        .comm
                        .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                        .map_err(failed)?,
                    Kind::BroadcastFromRank0 => self
                        .comm
                        .broadcast(Some(&src), &mut dst, 0)
                        .map_err(failed)?,
                };
                CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match storage.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            other => candle_core::bail!("{}: {other:?} buffers take the host path", self.name()),
        };
        Ok((out, layout.shape().clone()))
    }
}
