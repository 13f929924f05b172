//! [`MpiCommunicator`]: the collectives over MPI (rsmpi), for processes started by `mpirun`.

use std::fmt;

use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::traits::{CommunicatorCollectives as _, Root as _};

use super::Communicator;
use crate::error::{Error, Result};

/// The ranks of an MPI job (`mpirun -np N program`), over `MPI_COMM_WORLD` or a
/// communicator of your own. MPI's default error handler ends the job on a failed
/// collective, so the calls here fail only on what they check themselves.
///
/// ```no_run
/// # use candle_higher_runtime::distributed::{Communicator, MpiCommunicator};
/// let comm = MpiCommunicator::init()?; // MPI_Init; dropping it calls MPI_Finalize
/// println!("rank {} of {}", comm.rank(), comm.size());
/// # Ok::<(), candle_higher_runtime::Error>(())
/// ```
pub struct MpiCommunicator {
    comm: SimpleCommunicator,
    // Declared last: dropped after `comm`, it finalizes MPI.
    _universe: Option<mpi::environment::Universe>,
}

impl MpiCommunicator {
    /// Initializes MPI (single-threaded use: collectives from one thread) and communicates
    /// over `MPI_COMM_WORLD`. Started without `mpirun`, the process is rank 0 of 1. MPI
    /// already initialized in this process is an [`Error::Communication`]: use
    /// [`MpiCommunicator::from_communicator`] with its world then.
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| Error::Communication {
            op: "MpiCommunicator::init",
            message: "MPI is already initialized in this process; pass its communicator to \
                      MpiCommunicator::from_communicator"
                .into(),
        })?;
        Ok(MpiCommunicator {
            comm: universe.world(),
            _universe: Some(universe),
        })
    }

    /// Communicates over `comm`, in a program that initialized MPI itself (and finalizes it).
    pub fn from_communicator(comm: SimpleCommunicator) -> Self {
        MpiCommunicator {
            comm,
            _universe: None,
        }
    }
}

impl fmt::Debug for MpiCommunicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpiCommunicator")
            .field("rank", &self.comm.rank())
            .field("size", &self.comm.size())
            .finish()
    }
}

impl Communicator for MpiCommunicator {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let root = self.comm.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        let mut buffer = if self.comm.rank() == 0 {
            bytes.to_vec()
        } else {
            vec![0u8; len as usize]
        };
        root.broadcast_into(&mut buffer[..]);
        Ok(buffer)
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let mut out = vec![0u8; bytes.len() * self.size()];
        self.comm.all_gather_into(bytes, &mut out[..]);
        Ok(out)
    }
}
