//! Reverse-mode differentiation over the tape: `grad` (like `torch.autograd.grad`) and
//! `backward` (gradients of every leaf, for outer loops).

mod custom;
mod store;

pub use custom::{apply_custom_op, CustomOp};
pub use store::GradStore;

use rustc_hash::FxHashMap as HashMap;

use crate::error::{Error, Result};
use crate::tensor::{NoGradGuard, Node, Tensor};

/// The vector-Jacobian product of one recorded op. Implementations build the input
/// gradients from the library's own differentiable ops, so that with `create_graph` the
/// backward pass is itself recorded and can be differentiated again.
pub(crate) trait Backward: Send + Sync {
    /// The op's name, for debugging output.
    fn name(&self) -> &'static str;

    /// Gradients with respect to each input, given the gradient of the output.
    /// `needs[i]` is false where input `i` needs no gradient; return `None` there (or
    /// anywhere the gradient is zero by construction).
    fn vjp(&self, ctx: &VjpCtx<'_>) -> Result<Vec<Option<Tensor>>>;
}

/// What a vector-Jacobian product sees.
pub(crate) struct VjpCtx<'a> {
    /// The op's inputs, in the order they were recorded.
    pub(crate) inputs: &'a [Tensor],
    /// The op's output (its value, and its handle for rules like `d exp = exp`).
    pub(crate) output: &'a Tensor,
    /// The gradient flowing into the output, same shape as the output.
    pub(crate) grad: &'a Tensor,
    /// Which inputs need a gradient.
    pub(crate) needs: &'a [bool],
}

/// Options of [`grad`], with PyTorch's defaults.
#[derive(Clone, Debug, Default)]
pub struct GradOptions {
    /// Record the backward pass so the result can be differentiated again.
    pub create_graph: bool,
    /// Return `None` for inputs the outputs do not reach, instead of an error.
    pub allow_unused: bool,
    /// The vector in the vector-Jacobian product, one per output; `None` means ones, which
    /// is allowed only for outputs with one element.
    pub grad_outputs: Option<Vec<Tensor>>,
}

impl GradOptions {
    /// `create_graph` on: the returned gradients are differentiable.
    pub fn create_graph() -> Self {
        GradOptions {
            create_graph: true,
            ..Self::default()
        }
    }

    /// Sets `allow_unused`.
    pub fn allow_unused(mut self, allow: bool) -> Self {
        self.allow_unused = allow;
        self
    }

    /// Sets `grad_outputs`.
    pub fn grad_outputs(mut self, grad_outputs: Vec<Tensor>) -> Self {
        self.grad_outputs = Some(grad_outputs);
        self
    }
}

/// Gradients of the sum of `outputs` (weighted by `grad_outputs`) with respect to each of
/// `inputs`, which may be leaves or intermediate tensors (`torch.autograd.grad`).
///
/// Only nodes on a path from an output to an input are visited, and nodes created before
/// the earliest input are never expanded (they cannot depend on it), so one inner step of an
/// unroll costs the same at step 1 and at step 1000.
///
/// ```
/// # use candle_higher_runtime::{grad, GradOptions, Tensor};
/// # fn main() -> candle_higher_runtime::Result<()> {
/// let x = Tensor::scalar(3.0f64).to_leaf();
/// let y = x.mul(&x)?.mul(&x)?; // x^3
/// let dy = grad(&[y], &[x.clone()], GradOptions::create_graph())?[0].clone().unwrap();
/// let d2y = grad(&[dy], &[x], GradOptions::default())?[0].clone().unwrap();
/// assert_eq!(d2y.to_scalar_f64()?, 18.0); // 6x
/// # Ok(()) }
/// ```
pub fn grad(
    outputs: &[Tensor],
    inputs: &[Tensor],
    options: GradOptions,
) -> Result<Vec<Option<Tensor>>> {
    Ok(grad_with_stats(outputs, inputs, options)?.0)
}

/// What one [`grad_with_stats`] call did: a measure of how much of the graph it walked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GradStats {
    /// Tensors the traversal looked at (expanded or found to be a dead end).
    pub nodes_visited: usize,
    /// Of those, the tensors on a path from an output to an input, whose VJPs ran.
    pub nodes_on_path: usize,
}

/// [`grad`], also reporting how many graph nodes it visited: the number stays the same
/// at every step of an unroll, since traversal stops at the inputs and never expands
/// nodes created before the earliest input.
pub fn grad_with_stats(
    outputs: &[Tensor],
    inputs: &[Tensor],
    options: GradOptions,
) -> Result<(Vec<Option<Tensor>>, GradStats)> {
    if inputs.is_empty() {
        // torch.autograd.grad: "grad requires non-empty inputs".
        return Err(Error::InvalidArgument {
            op: "grad",
            message: "no inputs: list at least one tensor to differentiate with respect to".into(),
        });
    }
    for t in inputs {
        check_float_leaf("grad", t)?;
    }
    let seeds = seeds("grad", outputs, options.grad_outputs.as_deref())?;
    let input_index: HashMap<u64, usize> = inputs
        .iter()
        .enumerate()
        .filter(|(_, t)| t.requires_grad())
        .map(|(i, t)| (t.0.id, i))
        .collect();
    let min_input_id = input_index.keys().copied().min().unwrap_or(u64::MAX);
    let (order, nodes_visited) =
        reaching_nodes(outputs, |t| input_index.contains_key(&t.0.id), min_input_id);
    let stats = GradStats {
        nodes_visited,
        nodes_on_path: order.len(),
    };
    let grads = propagate(&order, seeds, options.create_graph, |id| {
        input_index.contains_key(&id)
    })?;
    let found: HashMap<u64, Tensor> = order
        .iter()
        .zip(grads)
        .filter_map(|(t, g)| Some((t.0.id, g?)))
        .filter(|(id, _)| input_index.contains_key(id))
        .collect();
    // `get`, not `remove`: an input listed twice gets its gradient at both positions.
    let grads = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| match found.get(&t.0.id).cloned() {
            Some(g) => Ok(Some(g)),
            None if options.allow_unused => Ok(None),
            None if !t.requires_grad() => Err(Error::InputDoesNotRequireGrad {
                index: i,
                shape: t.dims().to_vec(),
            }),
            None => Err(Error::UnusedInput {
                index: i,
                shape: t.dims().to_vec(),
            }),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((grads, stats))
}

/// Gradients of a scalar `output` with respect to every leaf that requires grad and that
/// it depends on (`loss.backward()` without the in-place accumulation). The graph is not
/// consumed: `backward` can run again, and so can `grad`.
pub fn backward(output: &Tensor) -> Result<GradStore> {
    let seeds = seeds("backward", std::slice::from_ref(output), None)?;
    let (order, _) = reaching_nodes(
        std::slice::from_ref(output),
        |t| matches!(t.node(), Some(Node::Leaf)),
        0,
    );
    for t in &order {
        if matches!(t.node(), Some(Node::Leaf)) {
            check_float_leaf("backward", t)?;
        }
    }
    // Leaves are never expanded, so only their gradients need to outlive their use.
    let grads = propagate(&order, seeds, false, |_| false)?;
    let mut store = GradStore::default();
    for (t, g) in order.iter().zip(grads) {
        if let (Some(Node::Leaf), Some(g)) = (t.node(), g) {
            store.insert(t, g);
        }
    }
    Ok(store)
}

/// Only floating point tensors can require gradients (PyTorch's rule): an integer leaf
/// would get a truncated gradient.
fn check_float_leaf(op: &'static str, t: &Tensor) -> Result<()> {
    if !t.requires_grad() || t.dtype().is_float() {
        return Ok(());
    }
    Err(Error::UnsupportedDType {
        op,
        dtype: t.dtype(),
        expected: "only floating point tensors can require gradients",
    })
}

/// The initial output gradients: `grad_outputs`, or ones for single-element outputs. `op`
/// (`grad` or `backward`, which has no `grad_outputs`) names the caller in errors.
fn seeds(
    op: &'static str,
    outputs: &[Tensor],
    grad_outputs: Option<&[Tensor]>,
) -> Result<Vec<(Tensor, Tensor)>> {
    if let Some(go) = grad_outputs {
        if go.len() != outputs.len() {
            return Err(Error::GradOutputsLength {
                outputs: outputs.len(),
                grad_outputs: go.len(),
            });
        }
    }
    outputs
        .iter()
        .enumerate()
        .map(|(i, out)| {
            let seed = match grad_outputs {
                Some(go) => {
                    let g = &go[i];
                    if g.dims() != out.dims() {
                        return Err(Error::ShapeMismatch {
                            op: "grad (grad_outputs)",
                            expected: format!("{:?}, the shape of output {i}", out.dims()),
                            got: g.dims().to_vec(),
                        });
                    }
                    out.check_same(g, "grad (grad_outputs)")?;
                    g.clone()
                }
                None if out.elem_count() == 1 => out.ones_like()?,
                None if op == "backward" => {
                    return Err(Error::NonScalarOutput {
                        op,
                        what: "the output".into(),
                        index: i,
                        shape: out.dims().to_vec(),
                        hint: "backward needs a one-element output: reduce it with sum_all or \
                               mean_all, or weight it with grad's grad_outputs",
                    })
                }
                None => {
                    return Err(Error::NonScalarOutput {
                        op,
                        what: format!("output {i}"),
                        index: i,
                        shape: out.dims().to_vec(),
                        hint: "a non-scalar output needs grad_outputs (one tensor of its \
                               shape), or reduce it to one element with sum_all or mean_all",
                    })
                }
            };
            Ok((out.clone(), seed))
        })
        .collect()
}

/// The tensors that lie on a path from `outputs` to a target, in topological order
/// (outputs first), and the number of tensors visited. Nodes with an id up to `min_id` are
/// not expanded: they were created no later than every target and so cannot depend on one
/// (the node with id `min_id` is the earliest target itself).
fn reaching_nodes(
    outputs: &[Tensor],
    is_target: impl Fn(&Tensor) -> bool,
    min_id: u64,
) -> (Vec<Tensor>, usize) {
    // Iterative post-order DFS; `reaches` records whether a visited tensor reaches a target.
    let mut reaches: HashMap<u64, bool> = HashMap::default();
    let mut post_order: Vec<Tensor> = Vec::new();
    let mut stack: Vec<(Tensor, usize)> = Vec::new();
    for out in outputs {
        if out.requires_grad() && !reaches.contains_key(&out.0.id) {
            stack.push((out.clone(), 0));
        }
        while let Some((t, child)) = stack.pop() {
            let inputs: &[Tensor] = match t.node() {
                Some(Node::Op { inputs, .. }) if t.0.id > min_id => inputs,
                _ => &[],
            };
            if child < inputs.len() {
                let next = inputs[child].clone();
                stack.push((t, child + 1));
                if next.requires_grad() && !reaches.contains_key(&next.0.id) {
                    reaches.insert(next.0.id, false);
                    stack.push((next, 0));
                }
                continue;
            }
            let r = is_target(&t) || inputs.iter().any(|i| reaches.get(&i.0.id) == Some(&true));
            reaches.insert(t.0.id, r);
            if r {
                post_order.push(t);
            }
        }
    }
    // Only tensors that reach a target were kept, each once (a tensor is marked in
    // `reaches` before it is pushed, and an output only starts a search when unmarked);
    // the reversed post-order puts every tensor before the inputs it was computed from.
    post_order.reverse();
    (post_order, reaches.len())
}

/// Pushes the seed gradients through `order` and returns the gradient of each of its
/// tensors, by position. The gradient of an op's output is dropped once its VJP has run
/// (the order is topological, so nothing more reaches it), unless `keep(id)`: the caller
/// wants it. Leaves keep theirs. So a backward pass holds only the gradients still to be
/// pushed, not every one it made; positions instead of a map keyed by id keep the
/// bookkeeping to one lookup per edge.
fn propagate(
    order: &[Tensor],
    seeds: Vec<(Tensor, Tensor)>,
    create_graph: bool,
    keep: impl Fn(u64) -> bool,
) -> Result<Vec<Option<Tensor>>> {
    let _mode = NoGradGuard::set(create_graph);
    let mut position: HashMap<u64, usize> =
        HashMap::with_capacity_and_hasher(order.len(), Default::default());
    position.extend(order.iter().enumerate().map(|(k, t)| (t.0.id, k)));
    let mut grads: Vec<Option<Tensor>> = vec![None; order.len()];
    for (out, g) in seeds {
        if let Some(&k) = position.get(&out.0.id) {
            accumulate(&mut grads[k], g)?;
        }
    }
    for (k, t) in order.iter().enumerate() {
        let Some(Node::Op { inputs, backward }) = t.node() else {
            continue;
        };
        let g = if keep(t.0.id) {
            grads[k].clone()
        } else {
            grads[k].take()
        };
        let Some(g) = g else {
            continue;
        };
        let targets: Vec<Option<usize>> = inputs
            .iter()
            .map(|i| position.get(&i.0.id).copied())
            .collect();
        let needs: Vec<bool> = targets.iter().map(Option::is_some).collect();
        if !needs.contains(&true) {
            // Only an input of `grad` lies on the path with none of its own inputs on it:
            // its gradient is the answer, and its VJP (a custom op's may fail) is not run,
            // as torch's engine skips nodes that lead to no input.
            continue;
        }
        let ctx = VjpCtx {
            inputs,
            output: t,
            grad: &g,
            needs: &needs,
        };
        let input_grads = backward.vjp(&ctx).map_err(|e| match e {
            // An op of the VJP (recorded under create_graph, or not) was flagged.
            Error::NonFinite { what } => Error::NonFinite {
                what: format!(
                    "in the backward of {} (output {:?}): {what}",
                    backward.name(),
                    t.dims()
                ),
            },
            other => other,
        })?;
        if crate::tensor::anomaly::is_anomaly_enabled() {
            check_backward(backward.name(), inputs, t, &input_grads)?;
        }
        for (target, ig) in targets.into_iter().zip(input_grads) {
            if let (Some(p), Some(ig)) = (target, ig) {
                accumulate(&mut grads[p], ig)?;
            }
        }
    }
    Ok(grads)
}

/// With anomaly detection on: fails if the backward of `op` gave a non-finite gradient.
#[cold]
#[inline(never)]
fn check_backward(
    op: &str,
    inputs: &[Tensor],
    output: &Tensor,
    input_grads: &[Option<Tensor>],
) -> Result<()> {
    let shapes: Vec<&[usize]> = inputs.iter().map(Tensor::dims).collect();
    let phase = format!("backward (output {:?})", output.dims());
    for g in input_grads.iter().flatten() {
        crate::tensor::anomaly::check(&phase, op, &shapes, g.value())?;
    }
    Ok(())
}

/// Adds `g` to the gradient held in `slot`.
fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        Some(prev) => prev.add(&g)?,
        None => g,
    });
    Ok(())
}

/// The gradient of a scalar `output` with respect to one `input`, as one tensor (no
/// `Vec<Option<_>>` to unpack): `grad(&[output], &[input], options)`. An input the output
/// does not reach is an error even with `allow_unused` (there is no tensor to return);
/// `options.grad_outputs` weights a non-scalar output as in [`grad`].
///
/// ```
/// # use candle_higher_runtime::{grad_one, GradOptions, Tensor};
/// # fn main() -> candle_higher_runtime::Result<()> {
/// let x = Tensor::scalar(2.0f64).to_leaf();
/// let dy = grad_one(&x.mul(&x)?.mul(&x)?, &x, GradOptions::default())?;
/// assert_eq!(dy.to_scalar_f64()?, 12.0); // 3x^2
/// # Ok(()) }
/// ```
pub fn grad_one(output: &Tensor, input: &Tensor, options: GradOptions) -> Result<Tensor> {
    let options = options.allow_unused(false);
    let mut grads = grad(
        std::slice::from_ref(output),
        std::slice::from_ref(input),
        options,
    )?;
    match grads.pop().flatten() {
        Some(g) => Ok(g),
        // grad without allow_unused returns a gradient for every input or fails.
        None => Err(Error::UnusedInput {
            index: 0,
            shape: input.dims().to_vec(),
        }),
    }
}
