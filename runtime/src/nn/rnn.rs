//! Recurrent layers built from differentiable ops (so second order works through them,
//! unlike cuDNN RNNs in PyTorch): RNN (tanh), LSTM and GRU cells, and their multi-layer
//! sequence forms, with PyTorch's parameter names, gate order and initialisation.

use super::{Module, Parameters, VarBuilder, Visitor};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Which recurrence a cell computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellKind {
    /// `h' = tanh(W_ih x + b_ih + W_hh h + b_hh)`.
    Rnn,
    /// LSTM with gates in PyTorch's order `i, f, g, o`.
    Lstm,
    /// GRU with gates in PyTorch's order `r, z, n`.
    Gru,
}

impl CellKind {
    fn gates(self) -> usize {
        match self {
            CellKind::Rnn => 1,
            CellKind::Lstm => 4,
            CellKind::Gru => 3,
        }
    }
}

/// The state of a cell: `h`, and `c` for an LSTM.
#[derive(Clone, Debug)]
pub struct CellState {
    /// Hidden state `[batch, hidden]`.
    pub h: Tensor,
    /// Cell state `[batch, hidden]` (LSTM only).
    pub c: Option<Tensor>,
}

/// One recurrent cell (`nn.RNNCell`, `nn.LSTMCell`, `nn.GRUCell`): `weight_ih`
/// `[gates*hidden, input]`, `weight_hh` `[gates*hidden, hidden]`, `bias_ih`, `bias_hh`
/// `[gates*hidden]`, all uniform on `(-1/sqrt(hidden), 1/sqrt(hidden))` as PyTorch.
#[derive(Clone, Debug)]
pub struct RecurrentCell {
    /// RNN, LSTM or GRU.
    pub kind: CellKind,
    /// `[gates*hidden, input]`.
    pub weight_ih: Tensor,
    /// `[gates*hidden, hidden]`.
    pub weight_hh: Tensor,
    /// `[gates*hidden]`.
    pub bias_ih: Tensor,
    /// `[gates*hidden]`.
    pub bias_hh: Tensor,
    hidden: usize,
}

fn cell(
    kind: CellKind,
    input: usize,
    hidden: usize,
    vb: &VarBuilder,
    suffix: &str,
) -> Result<RecurrentCell> {
    if hidden == 0 {
        // torch's nn.RNN: "hidden_size must be greater than zero"; the cells follow it.
        return Err(Error::InvalidArgument {
            op: "RecurrentCell",
            message: "hidden size (0) must be positive, as in PyTorch".into(),
        });
    }
    let g = kind
        .gates()
        .checked_mul(hidden)
        .ok_or_else(|| Error::InvalidArgument {
            op: "RecurrentCell",
            message: format!(
                "{} gates of hidden size {hidden} pass usize::MAX",
                kind.gates()
            ),
        })?;
    let b = super::var_builder::fan_in_bound(hidden);
    Ok(RecurrentCell {
        kind,
        weight_ih: vb.uniform(&format!("weight_ih{suffix}"), &[g, input], -b, b)?,
        weight_hh: vb.uniform(&format!("weight_hh{suffix}"), &[g, hidden], -b, b)?,
        bias_ih: vb.uniform(&format!("bias_ih{suffix}"), &[g], -b, b)?,
        bias_hh: vb.uniform(&format!("bias_hh{suffix}"), &[g], -b, b)?,
        hidden,
    })
}

/// `nn.RNNCell(input, hidden)` (tanh).
pub fn rnn_cell(input: usize, hidden: usize, vb: VarBuilder) -> Result<RecurrentCell> {
    cell(CellKind::Rnn, input, hidden, &vb, "")
}

/// `nn.LSTMCell(input, hidden)`.
pub fn lstm_cell(input: usize, hidden: usize, vb: VarBuilder) -> Result<RecurrentCell> {
    cell(CellKind::Lstm, input, hidden, &vb, "")
}

/// `nn.GRUCell(input, hidden)`.
pub fn gru_cell(input: usize, hidden: usize, vb: VarBuilder) -> Result<RecurrentCell> {
    cell(CellKind::Gru, input, hidden, &vb, "")
}

impl RecurrentCell {
    /// Hidden size.
    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The task count when the weights are task-batched (`weight_ih` `[T, gates, input]`).
    fn tasks(&self) -> Result<Option<usize>> {
        let batched = super::tasks::batched("RecurrentCell", &self.weight_ih, 2)?;
        Ok(batched.then(|| self.weight_ih.dims()[0]))
    }

    /// A zero state for `batch` rows (`[T, batch, hidden]` when task-batched), in the
    /// weights' dtype and device.
    pub fn zero_state(&self, batch: usize) -> Result<CellState> {
        let shape = match self.tasks()? {
            Some(tasks) => vec![tasks, batch, self.hidden],
            None => vec![batch, self.hidden],
        };
        let z = Tensor::zeros(&shape, self.weight_ih.dtype(), self.weight_ih.device())?;
        Ok(CellState {
            c: (self.kind == CellKind::Lstm).then(|| z.clone()),
            h: z,
        })
    }

    /// Checks that `state` has `x`'s leading (batch) dims and this cell's hidden size, and
    /// a cell state exactly for an LSTM: a state of another batch size would broadcast.
    fn check_state(&self, x: &Tensor, state: &CellState) -> Result<()> {
        let mut expected = x.dims().to_vec();
        if let Some(last) = expected.last_mut() {
            *last = self.hidden;
        }
        let lstm = self.kind == CellKind::Lstm;
        if lstm != state.c.is_some() {
            return Err(Error::InvalidArgument {
                op: "RecurrentCell",
                message: format!(
                    "a {:?} cell's state {} cell state c",
                    self.kind,
                    if lstm { "needs a" } else { "has no" }
                ),
            });
        }
        for (name, t) in [("h", Some(&state.h)), ("c", state.c.as_ref())] {
            if let Some(t) = t.filter(|t| t.dims() != expected.as_slice()) {
                return Err(Error::ShapeMismatch {
                    op: "RecurrentCell",
                    expected: format!(
                        "state {name} of shape {expected:?} for input {:?}",
                        x.dims()
                    ),
                    got: t.dims().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// One step: `x` `[batch, input]` and the previous state give the next state.
    /// Task-batched when the weights are `[T, .., ..]` (biases `[T, ..]`): then `x` is `[T,
    /// batch, input]` and the state `[T, batch, hidden]`.
    pub fn step(&self, x: &Tensor, state: &CellState) -> Result<CellState> {
        let tasks = self.tasks()?;
        let input = self.weight_ih.dims()[self.weight_ih.rank() - 1];
        let lead = usize::from(tasks.is_some());
        let fits = x.rank() == 2 + lead
            && x.dims()[x.rank() - 1] == input
            && tasks.is_none_or(|t| x.dims()[0] == t);
        if !fits {
            let expected = match tasks {
                Some(t) => format!("[{t}, batch, {input}] (task-batched)"),
                None => format!("[batch, {input}]"),
            };
            return Err(Error::ShapeMismatch {
                op: "RecurrentCell",
                expected,
                got: x.dims().to_vec(),
            });
        }
        self.check_state(x, state)?;
        let hsz = self.hidden;
        let (gi, gh) = if tasks.is_some() {
            (
                x.linear_tasks(&self.weight_ih, Some(&self.bias_ih))?,
                state.h.linear_tasks(&self.weight_hh, Some(&self.bias_hh))?,
            )
        } else {
            (
                x.linear(&self.weight_ih, Some(&self.bias_ih))?,
                state.h.linear(&self.weight_hh, Some(&self.bias_hh))?,
            )
        };
        let last = 1 + lead;
        let chunk = |t: &Tensor, k: usize| t.narrow(last, k * hsz, hsz);
        match self.kind {
            CellKind::Rnn => Ok(CellState {
                h: gi.add(&gh)?.tanh()?,
                c: None,
            }),
            CellKind::Lstm => {
                let gates = gi.add(&gh)?;
                let i = chunk(&gates, 0)?.sigmoid()?;
                let f = chunk(&gates, 1)?.sigmoid()?;
                let g = chunk(&gates, 2)?.tanh()?;
                let o = chunk(&gates, 3)?.sigmoid()?;
                let c_prev = match &state.c {
                    Some(c) => c.clone(),
                    None => state.h.zeros_like()?,
                };
                let c = f.mul(&c_prev)?.add(&i.mul(&g)?)?;
                let h = o.mul(&c.tanh()?)?;
                Ok(CellState { h, c: Some(c) })
            }
            CellKind::Gru => {
                let r = chunk(&gi, 0)?.add(&chunk(&gh, 0)?)?.sigmoid()?;
                let z = chunk(&gi, 1)?.add(&chunk(&gh, 1)?)?.sigmoid()?;
                let n = chunk(&gi, 2)?.add(&r.mul(&chunk(&gh, 2)?)?)?.tanh()?;
                // h' = (1 - z) n + z h = n + z (h - n)
                let h = n.add(&z.mul(&state.h.sub(&n)?)?)?;
                Ok(CellState { h, c: None })
            }
        }
    }

    fn visit_suffixed(&mut self, v: &mut Visitor<'_>, suffix: &str) -> Result<()> {
        v.param(&format!("weight_ih{suffix}"), &mut self.weight_ih)?;
        v.param(&format!("weight_hh{suffix}"), &mut self.weight_hh)?;
        v.param(&format!("bias_ih{suffix}"), &mut self.bias_ih)?;
        v.param(&format!("bias_hh{suffix}"), &mut self.bias_hh)
    }
}

impl Module for RecurrentCell {
    /// One step from a zero state; returns `h`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let lead = usize::from(self.tasks()?.is_some());
        let batch = x.dims().get(lead).copied().unwrap_or(0);
        Ok(self.step(x, &self.zero_state(batch)?)?.h)
    }
}

impl Parameters for RecurrentCell {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        self.visit_suffixed(v, "")
    }
}

/// A multi-layer recurrent network over a sequence (`nn.RNN`, `nn.LSTM`, `nn.GRU`;
/// unidirectional, no inter-layer dropout). Input `[seq, batch, input]`, or
/// `[batch, seq, input]` with `batch_first`; task-batched (weights `[T, ..]`) `[T, seq,
/// batch, input]` or `[T, batch, seq, input]`. Parameters are named as PyTorch's:
/// `weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`, `weight_ih_l1`, ...
#[derive(Clone, Debug)]
pub struct Recurrent {
    /// One cell per layer.
    pub cells: Vec<RecurrentCell>,
    /// Whether inputs and outputs are `[batch, seq, ..]`.
    pub batch_first: bool,
}

fn recurrent(
    kind: CellKind,
    input: usize,
    hidden: usize,
    layers: usize,
    vb: &VarBuilder,
) -> Result<Recurrent> {
    if layers == 0 || hidden == 0 {
        return Err(Error::InvalidArgument {
            op: "Recurrent",
            message: format!(
                "num_layers ({layers}) and hidden size ({hidden}) must be positive, as in PyTorch"
            ),
        });
    }
    let cells = (0..layers)
        .map(|l| {
            cell(
                kind,
                if l == 0 { input } else { hidden },
                hidden,
                vb,
                &format!("_l{l}"),
            )
        })
        .collect::<Result<_>>()?;
    Ok(Recurrent {
        cells,
        batch_first: false,
    })
}

/// `nn.RNN(input, hidden, num_layers)` (tanh).
pub fn rnn(input: usize, hidden: usize, num_layers: usize, vb: VarBuilder) -> Result<Recurrent> {
    recurrent(CellKind::Rnn, input, hidden, num_layers, &vb)
}

/// `nn.LSTM(input, hidden, num_layers)`.
pub fn lstm(input: usize, hidden: usize, num_layers: usize, vb: VarBuilder) -> Result<Recurrent> {
    recurrent(CellKind::Lstm, input, hidden, num_layers, &vb)
}

/// `nn.GRU(input, hidden, num_layers)`.
pub fn gru(input: usize, hidden: usize, num_layers: usize, vb: VarBuilder) -> Result<Recurrent> {
    recurrent(CellKind::Gru, input, hidden, num_layers, &vb)
}

impl Recurrent {
    /// Runs the sequence from `initial` states (one per layer; zeros when `None`) and
    /// returns the last layer's outputs (same layout as the input) and each layer's final
    /// state.
    pub fn forward_with_state(
        &self,
        x: &Tensor,
        initial: Option<Vec<CellState>>,
    ) -> Result<(Tensor, Vec<CellState>)> {
        let tasks = match self.cells.first() {
            Some(c) => c.tasks()?,
            None => None,
        };
        let lead = usize::from(tasks.is_some());
        if x.rank() != 3 + lead {
            let task = if lead == 1 { "a task axis, then " } else { "" };
            return Err(Error::ShapeMismatch {
                op: "Recurrent",
                expected: format!(
                    "{task}[seq, batch, input] (or [batch, seq, input] with batch_first)"
                ),
                got: x.dims().to_vec(),
            });
        }
        let (seq_dim, batch) = if self.batch_first {
            (lead + 1, x.dims()[lead])
        } else {
            (lead, x.dims()[lead + 1])
        };
        if x.dims()[seq_dim] == 0 {
            // PyTorch: "Expected sequence length to be larger than 0 in RNN".
            return Err(Error::ShapeMismatch {
                op: "Recurrent",
                expected: format!("a sequence of at least one step at dim {seq_dim}"),
                got: x.dims().to_vec(),
            });
        }
        let mut states = match initial {
            Some(s) if s.len() == self.cells.len() => s,
            Some(s) => {
                return Err(Error::InvalidArgument {
                    op: "Recurrent",
                    message: format!("{} initial states for {} layers", s.len(), self.cells.len()),
                })
            }
            None => self
                .cells
                .iter()
                .map(|c| c.zero_state(batch))
                .collect::<Result<_>>()?,
        };
        let mut outputs = Vec::with_capacity(x.dims()[seq_dim]);
        for t in 0..x.dims()[seq_dim] {
            let mut inp = x.narrow(seq_dim, t, 1)?.squeeze(seq_dim)?;
            for (cell, state) in self.cells.iter().zip(states.iter_mut()) {
                *state = cell.step(&inp, state)?;
                inp = state.h.clone();
            }
            outputs.push(inp);
        }
        Ok((Tensor::stack(&outputs, seq_dim)?, states))
    }
}

impl Module for Recurrent {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_state(x, None)?.0)
    }
}

impl Parameters for Recurrent {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        for (l, cell) in self.cells.iter_mut().enumerate() {
            cell.visit_suffixed(v, &format!("_l{l}"))?;
        }
        Ok(())
    }
}
