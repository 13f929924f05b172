//! The `Module` trait, parameter visiting (`Parameters`, `Visitor`), and `Buffer`.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorId};

/// Something that maps a tensor to a tensor (candle's minimal `Module`).
///
/// Closures `Fn(&Tensor) -> Result<Tensor>` are modules too.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a module: it does not implement `candle_higher::nn::Module`",
    label = "a model (a `Module` with `Parameters`, and `Clone`) is needed here",
    note = "implement `Module` (`fn forward(&self, x: &Tensor) -> Result<Tensor>`) and `Parameters` (a `visit` that shows every `Tensor` field) on a `#[derive(Clone)]` struct: see \"Your own model\" in the README"
)]
pub trait Module {
    /// Applies the module.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
}

impl<F: Fn(&Tensor) -> Result<Tensor>> Module for F {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self(x)
    }
}

/// A non-parameter tensor that a module keeps and updates as it runs, such as batch-norm
/// running statistics. Listed by [`Parameters::named_buffers`], saved to safetensors, and
/// copied (not shared) when the module is cloned: a cloned model has its own statistics.
///
/// A buffer never carries a graph: [`Buffer::set`] stores a detached value. Inside
/// [`restore_buffers_on_error`] (every `Sequential` and `FunctionalModel` forward pass runs
/// there), a failing pass puts back the values it replaced.
pub struct Buffer(Arc<RwLock<Tensor>>);

impl Buffer {
    /// A buffer holding `value` (detached).
    pub fn new(value: Tensor) -> Self {
        Buffer(Arc::new(RwLock::new(value.detach())))
    }

    /// The current value.
    pub fn get(&self) -> Tensor {
        read_slot(&self.0)
    }

    /// Replaces the value (detached).
    pub fn set(&self, value: &Tensor) {
        journal_undo(|| {
            let (slot, old) = (self.0.clone(), self.get());
            move || write_slot(&slot, old)
        });
        write_slot(&self.0, value.detach());
    }
}

fn read_slot(slot: &RwLock<Tensor>) -> Tensor {
    match slot.read() {
        Ok(t) => t.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn write_slot(slot: &RwLock<Tensor>, value: Tensor) {
    match slot.write() {
        Ok(mut t) => *t = value,
        Err(poisoned) => *poisoned.into_inner() = value,
    }
}

/// What puts one write of a pass back: a buffer's old value, a dropout generator's old
/// state.
type UndoFn = Box<dyn FnOnce()>;

thread_local! {
    /// How many [`restore_buffers_on_error`] calls are running on this thread.
    static JOURNAL_DEPTH: Cell<usize> = const { Cell::new(0) };
    /// The writes made inside them, oldest first, each with what undoes it.
    static JOURNAL: RefCell<Vec<UndoFn>> = const { RefCell::new(Vec::new()) };
}

/// Records `undo` for the innermost running [`restore_buffers_on_error`], which runs it if
/// its pass fails; outside one, nothing is recorded (and `undo` is not built).
pub(crate) fn journal_undo<U: FnOnce() + 'static>(undo: impl FnOnce() -> U) {
    if JOURNAL_DEPTH.get() > 0 {
        let undo: UndoFn = Box::new(undo());
        JOURNAL.with_borrow_mut(|j| j.push(undo));
    }
}

/// Runs `f` (a forward pass) so that, if it fails or panics, every [`Buffer`] it wrote
/// holds its value from before the call again, and every dropout generator it drew from
/// (`Dropout`, `WeightDropout`) is back in its state from before the call: a batch norm's
/// running statistics are not left updated by a pass whose later layer failed, and a
/// retried pass draws the masks the failed one drew. Calls nest: each undoes only its own
/// writes, and the writes of a call that succeeded stand unless an enclosing call fails.
/// `Sequential`, `Dropout`, `WeightDropout` and `FunctionalModel` forward passes run inside
/// it; call it around a hand-written model's forward to give it the same guarantee.
pub fn restore_buffers_on_error<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    /// Undoes the writes after `start` unless the pass succeeded, also on a panic.
    struct Undo {
        start: usize,
        succeeded: bool,
    }
    impl Drop for Undo {
        fn drop(&mut self) {
            JOURNAL_DEPTH.set(JOURNAL_DEPTH.get() - 1);
            let outermost = JOURNAL_DEPTH.get() == 0;
            let undo = JOURNAL.with_borrow_mut(|j| {
                if self.succeeded {
                    if outermost {
                        j.clear();
                    }
                    Vec::new()
                } else {
                    j.split_off(self.start)
                }
            });
            for undo in undo.into_iter().rev() {
                undo();
            }
        }
    }
    let mut undo = Undo {
        start: JOURNAL.with_borrow(Vec::len),
        succeeded: false,
    };
    JOURNAL_DEPTH.set(JOURNAL_DEPTH.get() + 1);
    let out = f();
    undo.succeeded = out.is_ok();
    out
}

impl Clone for Buffer {
    /// A new buffer with the same value: the clone's updates do not reach the original
    /// (except in the copy of a layer that weight norm or weight dropout runs).
    fn clone(&self) -> Self {
        if SHARE_ON_CLONE.get() {
            Buffer(self.0.clone())
        } else {
            Buffer::new(self.get())
        }
    }
}

thread_local! {
    /// Set while [`clone_sharing_buffers`] clones.
    static SHARE_ON_CLONE: Cell<bool> = const { Cell::new(false) };
}

/// Whether the clone being made is [`clone_sharing_buffers`]'s: then a layer's dropout
/// generator is shared too, not copied.
pub(crate) fn sharing_on_clone() -> bool {
    SHARE_ON_CLONE.get()
}

/// A clone of `module` whose buffers (and dropout generators) are `module`'s own, not
/// copies: for a wrapper that runs a re-weighted copy of its layer (weight norm, weight
/// dropout), so that the copy's batch norms update the layer's statistics and the copy's
/// dropouts advance the layer's generators.
pub(crate) fn clone_sharing_buffers<L: Clone>(module: &L) -> L {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            SHARE_ON_CLONE.set(self.0);
        }
    }
    let _reset = Reset(SHARE_ON_CLONE.replace(true));
    module.clone()
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({:?})", self.get())
    }
}

/// One thing a [`Visitor`] is shown.
#[derive(Debug)]
pub enum Entry<'b> {
    /// A parameter slot; replacing the tensor replaces the parameter.
    Param(&'b mut Tensor),
    /// A buffer's value; replacing it replaces the buffer's value.
    Buffer(&'b mut Tensor),
    /// A layer's train/eval flag (true in training mode).
    Training(&'b mut bool),
}

/// The callback behind a [`Visitor`]: the full dotted name and the entry.
pub type VisitFn<'a> = dyn FnMut(&str, Entry<'_>) -> Result<()> + 'a;

/// Walks a model's parameters, buffers and train/eval flags, with dotted names.
///
/// A model's [`Parameters::visit`] hands each field to the visitor: `v.param("weight",
/// &mut self.weight)`, `v.buffer("running_mean", &mut self.running_mean)`, and
/// `v.module("encoder", &mut self.encoder)` for a child, which prefixes its names with
/// `encoder.`.
pub struct Visitor<'a> {
    prefix: String,
    f: &'a mut VisitFn<'a>,
    /// Whether `f` reads the names; a walk that only reads or writes slots in order
    /// (most of them, once per inner step) builds none.
    named: bool,
}

impl std::fmt::Debug for Visitor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Visitor({:?})", self.prefix)
    }
}

impl<'a> Visitor<'a> {
    /// A visitor at the root (empty prefix) that calls `f` for every entry.
    pub fn new(f: &'a mut VisitFn<'a>) -> Self {
        Visitor {
            prefix: String::new(),
            f,
            named: true,
        }
    }

    fn full(&self, name: &str) -> String {
        if !self.named {
            String::new()
        } else if self.prefix.is_empty() {
            name.to_string()
        } else if name.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// A visitor whose names are prefixed with `name.` (candle-nn's `pp`).
    pub fn pp(&mut self, name: &str) -> Visitor<'_> {
        Visitor {
            prefix: self.full(name),
            f: &mut *self.f,
            named: self.named,
        }
    }

    /// Shows a parameter.
    pub fn param(&mut self, name: &str, tensor: &mut Tensor) -> Result<()> {
        let full = self.full(name);
        (self.f)(&full, Entry::Param(tensor))
    }

    /// Shows an optional parameter (e.g. a bias that may be absent); `None` is skipped.
    pub fn opt_param(&mut self, name: &str, tensor: &mut Option<Tensor>) -> Result<()> {
        match tensor {
            Some(t) => self.param(name, t),
            None => Ok(()),
        }
    }

    /// Shows a buffer. A value the callback puts in its place is stored as by
    /// [`Buffer::set`] (detached).
    pub fn buffer(&mut self, name: &str, buffer: &mut Buffer) -> Result<()> {
        let full = self.full(name);
        let mut value = buffer.get();
        let id = value.id();
        let out = (self.f)(&full, Entry::Buffer(&mut value));
        if value.id() != id {
            buffer.set(&value);
        }
        out
    }

    /// Shows a train/eval flag (layers that behave differently in training).
    pub fn training(&mut self, flag: &mut bool) -> Result<()> {
        let full = self.prefix.clone();
        (self.f)(&full, Entry::Training(flag))
    }

    /// Visits `child` under `name` (empty: no extra prefix), hiding the parameters whose
    /// names relative to the child are in `hide` (used by reparametrizations, which list
    /// their raw parameters instead).
    pub(crate) fn module_hiding<P: Parameters + ?Sized>(
        &mut self,
        name: &str,
        child: &mut P,
        hide: &[String],
    ) -> Result<()> {
        let prefix = self.full(name);
        let skip = if prefix.is_empty() {
            0
        } else {
            prefix.len() + 1
        };
        let f = &mut *self.f;
        let mut filtered = |full: &str, e: Entry<'_>| -> Result<()> {
            let local = full.get(skip..).unwrap_or("");
            if matches!(e, Entry::Param(_)) && hide.iter().any(|h| h == local) {
                return Ok(());
            }
            f(full, e)
        };
        // Hiding compares names relative to the child, so the child's walk is named even
        // inside an unnamed one (whose prefix is then empty: the names are relative).
        child.visit(&mut Visitor {
            prefix,
            f: &mut filtered,
            named: true,
        })
    }

    /// Visits a child module under `name`.
    pub fn module<P: Parameters + ?Sized>(&mut self, name: &str, child: &mut P) -> Result<()> {
        child.visit(&mut self.pp(name))
    }
}

/// The short description of a parameter returned by [`Parameters::param_infos`].
#[derive(Clone, Debug)]
pub struct ParamInfo {
    /// Dotted name (`encoder.conv1.bias`); for a tied parameter, its first name.
    pub name: String,
    /// The tensor.
    pub tensor: Tensor,
    /// Frozen: the tensor does not require grad, so no optimizer updates it.
    pub frozen: bool,
}

/// A model whose parameters, buffers and train/eval flags can be listed and replaced.
///
/// Implement [`Parameters::visit`] by showing every field to the visitor, in a fixed order;
/// everything else is provided. The order of `visit` is the model's flat parameter order.
///
/// - A parameter is **frozen** when its tensor does not require grad (PyTorch's
///   `requires_grad = False`): it is listed, marked frozen, and left alone by optimizers
///   and by [`crate::FunctionalModel::update_params`]. Layers built with a
///   [`super::VarBuilder`] make leaves (trainable); [`Parameters::set_frozen`] toggles.
/// - A tensor that appears in two slots (tied weights: the same handle, by
///   [`TensorId`]) is listed once, under its first name, and a replacement list holds it
///   once; both slots receive the replacement.
///
/// The listing methods take `&self` and work on a clone, which is cheap: tensors are
/// handles.
///
/// ```
/// use candle_higher_runtime::nn::{self, Module, Parameters, VarBuilder, Visitor};
/// use candle_higher_runtime::{DType, Device, Result, Tensor};
///
/// #[derive(Clone)]
/// struct Mlp {
///     hidden: nn::Linear,
///     out: nn::Linear,
/// }
///
/// impl Parameters for Mlp {
///     fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
///         v.module("hidden", &mut self.hidden)?;
///         v.module("out", &mut self.out)
///     }
/// }
///
/// impl Module for Mlp {
///     fn forward(&self, x: &Tensor) -> Result<Tensor> {
///         self.out.forward(&self.hidden.forward(x)?.relu()?)
///     }
/// }
///
/// # fn main() -> Result<()> {
/// let vb = VarBuilder::new(0, DType::F64, &Device::Cpu);
/// let mlp = Mlp { hidden: nn::linear(2, 8, vb.pp("hidden"))?, out: nn::linear(8, 1, vb.pp("out"))? };
/// let names: Vec<String> = mlp.named_parameters()?.into_iter().map(|(n, _)| n).collect();
/// assert_eq!(names, ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]);
/// # Ok(()) }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a model: it does not implement `candle_higher::nn::Parameters`",
    label = "a model (a `Module` with `Parameters`, and `Clone`) is needed here",
    note = "implement `Parameters` (`fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()>`, with `v.param`, `v.buffer` and `v.module` for each field) and `Module` on a `#[derive(Clone)]` struct: see \"Your own model\" in the README"
)]
pub trait Parameters {
    /// Shows every parameter, buffer, child module and train/eval flag to `v`, always in
    /// the same order.
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()>;

    /// Parameters in flat order with dotted names, tied ones once.
    fn named_parameters(&self) -> Result<Vec<(String, Tensor)>>
    where
        Self: Clone + Sized,
    {
        Ok(self
            .param_infos()?
            .into_iter()
            .map(|p| (p.name, p.tensor))
            .collect())
    }

    /// Parameters in flat order, tied ones once.
    fn parameters(&self) -> Result<Vec<Tensor>>
    where
        Self: Clone + Sized,
    {
        let unique = unique_params(&mut self.clone(), false)?;
        Ok(unique.into_iter().map(|(_, t)| t).collect())
    }

    /// Parameters with names and frozen flags, in flat order, tied ones once.
    fn param_infos(&self) -> Result<Vec<ParamInfo>>
    where
        Self: Clone + Sized,
    {
        let unique = unique_params(&mut self.clone(), true)?;
        Ok(unique
            .into_iter()
            .map(|(name, tensor)| ParamInfo {
                name,
                frozen: !tensor.requires_grad(),
                tensor,
            })
            .collect())
    }

    /// Buffers in flat order with dotted names, shared ones once.
    fn named_buffers(&self) -> Result<Vec<(String, Tensor)>>
    where
        Self: Clone + Sized,
    {
        let mut copy = self.clone();
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        walk(&mut copy, &mut |name, entry| {
            if let Entry::Buffer(t) = entry {
                if seen.insert(t.id()) {
                    out.push((name.to_string(), t.clone()));
                }
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Replaces the parameters with `params`, given in the flat order of
    /// [`Parameters::parameters`] (tied parameters once). Checks the length and every
    /// shape, dtype and device first ([`Error::ParamCount`], [`Error::ParamShape`],
    /// [`Error::ParamDType`], [`Error::ParamDevice`], naming the parameter); on error
    /// nothing is replaced, also when the model's `visit` shows other slots than when the
    /// list was made.
    ///
    /// The tensors are used as they are, frozen flags included: a constant given for a
    /// trainable parameter freezes it (it no longer requires grad), so pass `t.to_leaf()`
    /// (or a tensor computed on the tape) to keep a parameter trainable. This is the rule
    /// of the functional libraries (higher's `update_params`, `torch.func.functional_call`),
    /// not of torch's `load_state_dict`, which copies values and keeps `requires_grad`.
    ///
    /// ```
    /// use candle_higher_runtime::nn::{self, Parameters, VarBuilder};
    /// use candle_higher_runtime::{DType, Device, Result};
    ///
    /// # fn main() -> Result<()> {
    /// let mut layer = nn::linear(2, 1, VarBuilder::new(0, DType::F64, &Device::Cpu))?;
    /// let values: Vec<_> = layer.parameters()?.iter().map(|p| p.detach()).collect();
    /// layer.set_parameters(&values)?;
    /// assert!(layer.param_infos()?.iter().all(|p| p.frozen));
    /// let leaves: Vec<_> = values.iter().map(|v| v.to_leaf()).collect();
    /// layer.set_parameters(&leaves)?;
    /// assert!(layer.param_infos()?.iter().all(|p| !p.frozen));
    /// # Ok(()) }
    /// ```
    fn set_parameters(&mut self, params: &[Tensor]) -> Result<()>
    where
        Self: Sized,
    {
        let layout = ParamLayout::of(self)?;
        layout.check("set_parameters", params)?;
        layout.write(self, params)
    }

    /// Replaces the buffers, in the flat order of [`Parameters::named_buffers`]. Checks
    /// the length and every shape, dtype and device first; on error nothing is replaced,
    /// as for [`Parameters::set_parameters`].
    fn set_buffers(&mut self, buffers: &[Tensor]) -> Result<()>
    where
        Self: Sized,
    {
        let layout = ParamLayout::of(self)?;
        layout.check_buffers("set_buffers", buffers)?;
        layout.write_buffers(self, buffers)
    }

    /// Sets every train/eval flag: `true` for training (batch statistics, dropout on),
    /// `false` for evaluation. If `visit` fails part-way, the flags it set are put back.
    fn train(&mut self, training: bool) -> Result<()>
    where
        Self: Sized,
    {
        let mut old = Vec::new();
        let out = walk_unnamed(self, &mut |_, entry| {
            if let Entry::Training(flag) = entry {
                old.push(std::mem::replace(flag, training));
            }
            Ok(())
        });
        if out.is_err() {
            // In the order they were set: a `visit` that failed once may show them again.
            let mut k = 0;
            let _ = walk_unnamed(self, &mut |_, entry| {
                if let Entry::Training(flag) = entry {
                    if let Some(&was) = old.get(k) {
                        *flag = was;
                    }
                    k += 1;
                }
                Ok(())
            });
        }
        out
    }

    /// Evaluation mode: `train(false)`.
    fn eval(&mut self) -> Result<()>
    where
        Self: Sized,
    {
        self.train(false)
    }

    /// Freezes (`true`) or unfreezes the parameter `name`: a frozen parameter becomes a
    /// constant, an unfrozen one a fresh leaf. Unknown names are an error listing the
    /// known ones. If `visit` fails part-way, the slots already replaced are put back.
    fn set_frozen(&mut self, name: &str, frozen: bool) -> Result<()>
    where
        Self: Sized,
    {
        let mut target: Option<Tensor> = None;
        let mut known = Vec::new();
        walk(self, &mut |n, entry| {
            if let Entry::Param(t) = entry {
                if n == name {
                    target = Some(t.clone());
                }
                known.push(n.to_string());
            }
            Ok(())
        })?;
        let Some(original) = target else {
            return Err(Error::InvalidArgument {
                op: "set_frozen",
                message: format!("no parameter named \"{name}\"; known: {}", known.join(", ")),
            });
        };
        let id = original.id();
        let mut replacement: Option<Tensor> = None;
        let out = walk_unnamed(self, &mut |_, entry| {
            if let Entry::Param(t) = entry {
                if t.id() == id {
                    let new = replacement.get_or_insert_with(|| {
                        if frozen {
                            t.detach()
                        } else {
                            t.to_leaf()
                        }
                    });
                    *t = new.clone();
                }
            }
            Ok(())
        });
        if let (Err(_), Some(new)) = (&out, replacement) {
            // The replacement is a tensor of its own: every slot holding it was replaced.
            let _ = walk_unnamed(self, &mut |_, entry| {
                if let Entry::Param(t) = entry {
                    if t.id() == new.id() {
                        *t = original.clone();
                    }
                }
                Ok(())
            });
        }
        out
    }
}

/// Calls `f` for every entry of `model`, with full dotted names.
pub fn walk<P: Parameters + ?Sized>(model: &mut P, f: &mut VisitFn<'_>) -> Result<()> {
    model.visit(&mut Visitor::new(f))
}

/// Each parameter of `model` once (tied slots share one), in flat order, with its dotted
/// name when `named` (else an empty one, and no name is built).
fn unique_params<P: Parameters + ?Sized>(
    model: &mut P,
    named: bool,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut keep = |name: &str, entry: Entry<'_>| {
        if let Entry::Param(t) = entry {
            if seen.insert(t.id()) {
                out.push((name.to_string(), t.clone()));
            }
        }
        Ok(())
    };
    if named {
        walk(model, &mut keep)?;
    } else {
        walk_unnamed(model, &mut keep)?;
    }
    Ok(out)
}

/// [`walk`] for callbacks that ignore the names: `f` gets empty ones, and none is built.
pub(crate) fn walk_unnamed<P: Parameters + ?Sized>(
    model: &mut P,
    f: &mut VisitFn<'_>,
) -> Result<()> {
    model.visit(&mut Visitor {
        prefix: String::new(),
        f,
        named: false,
    })
}

/// Where each visited parameter slot of a model goes in its flat (deduplicated) list, and
/// the same for buffers. Computed once, reused to write replacement lists.
#[derive(Clone, Debug)]
pub(crate) struct ParamLayout {
    /// Flat list: name, shape, dtype, device of each unique parameter.
    pub(crate) names: Vec<String>,
    pub(crate) shapes: Vec<Vec<usize>>,
    pub(crate) tensors: Vec<Tensor>,
    /// Slot k (in visit order) takes flat entry `slots[k]`.
    slots: Vec<usize>,
    pub(crate) buffer_names: Vec<String>,
    pub(crate) buffer_tensors: Vec<Tensor>,
    buffer_slots: Vec<usize>,
    /// Whether the model's slots still hold `tensors` (and `buffer_tensors`) as listed.
    listed: Listed,
}

/// Whether a model's parameter slots (`[0]`) and buffer slots (`[1]`) still hold the
/// tensors its [`ParamLayout`] listed: true when the layout is made, false once a write
/// replaced them (a `FunctionalModel` keeps its layout and writes fast weights at every
/// step). While true, a write checks that each slot it writes holds the tensor listed for
/// it, so that a `visit` that shows other slots than when it was listed is caught before
/// a tensor goes into the wrong slot.
#[derive(Debug)]
struct Listed([AtomicBool; 2]);

impl Listed {
    fn new() -> Self {
        Listed([AtomicBool::new(true), AtomicBool::new(true)])
    }

    fn get(&self, kind: SlotKind) -> bool {
        self.0[kind as usize].load(Ordering::Relaxed)
    }

    fn clear(&self, kind: SlotKind) {
        self.0[kind as usize].store(false, Ordering::Relaxed);
    }
}

impl Clone for Listed {
    fn clone(&self) -> Self {
        Listed([SlotKind::Param, SlotKind::Buffer].map(|kind| AtomicBool::new(self.get(kind))))
    }
}

impl ParamLayout {
    pub(crate) fn of<P: Parameters + ?Sized>(model: &mut P) -> Result<Self> {
        let mut layout = ParamLayout {
            names: Vec::new(),
            shapes: Vec::new(),
            tensors: Vec::new(),
            slots: Vec::new(),
            buffer_names: Vec::new(),
            buffer_tensors: Vec::new(),
            buffer_slots: Vec::new(),
            listed: Listed::new(),
        };
        let mut index: HashMap<TensorId, usize> = HashMap::new();
        let mut buffer_index: HashMap<TensorId, usize> = HashMap::new();
        walk(model, &mut |name, entry| {
            match entry {
                Entry::Param(t) => {
                    let i = *index.entry(t.id()).or_insert_with(|| {
                        layout.names.push(name.to_string());
                        layout.shapes.push(t.dims().to_vec());
                        layout.tensors.push(t.clone());
                        layout.tensors.len() - 1
                    });
                    layout.slots.push(i);
                }
                Entry::Buffer(t) => {
                    let i = *buffer_index.entry(t.id()).or_insert_with(|| {
                        layout.buffer_names.push(name.to_string());
                        layout.buffer_tensors.push(t.clone());
                        layout.buffer_tensors.len() - 1
                    });
                    layout.buffer_slots.push(i);
                }
                Entry::Training(_) => {}
            }
            Ok(())
        })?;
        Ok(layout)
    }

    /// Checks a replacement list: length, then each shape, dtype and device.
    pub(crate) fn check(&self, op: &'static str, params: &[Tensor]) -> Result<()> {
        check_list(op, &self.names, &self.tensors, params, SlotKind::Param)
    }

    pub(crate) fn check_buffers(&self, op: &'static str, buffers: &[Tensor]) -> Result<()> {
        check_list(
            op,
            &self.buffer_names,
            &self.buffer_tensors,
            buffers,
            SlotKind::Buffer,
        )
    }

    /// Writes a checked list into the model's parameter slots, all or nothing: if the
    /// model's `visit` fails, shows another number of slots than when the layout was made,
    /// or (while the slots hold what the layout listed) shows another tensor in a slot,
    /// the slots written are put back (see [`put_back`]).
    pub(crate) fn write<P: Parameters + ?Sized>(
        &self,
        model: &mut P,
        params: &[Tensor],
    ) -> Result<()> {
        self.write_slots(model, SlotKind::Param, params)
    }

    /// [`ParamLayout::write`] for the buffers (stored detached).
    pub(crate) fn write_buffers<P: Parameters + ?Sized>(
        &self,
        model: &mut P,
        buffers: &[Tensor],
    ) -> Result<()> {
        self.write_slots(model, SlotKind::Buffer, buffers)
    }

    fn write_slots<P: Parameters + ?Sized>(
        &self,
        model: &mut P,
        kind: SlotKind,
        values: &[Tensor],
    ) -> Result<()> {
        let (names, listed, slots) = match kind {
            SlotKind::Param => (&self.names, &self.tensors, &self.slots),
            SlotKind::Buffer => (&self.buffer_names, &self.buffer_tensors, &self.buffer_slots),
        };
        // The callers check the list; an unchecked one must not index past its end.
        if values.len() != listed.len() {
            return Err(Error::ParamCount {
                op: "ParamLayout::write",
                what: kind.plural(),
                expected: listed.len(),
                got: values.len(),
            });
        }
        let verify = self.listed.get(kind);
        // Each slot written, in visit order: the id of its new tensor and its old one.
        let mut written: Vec<(TensorId, Tensor)> = Vec::new();
        let mut k = 0;
        // The first slot that held another tensor than the one listed for it.
        let mut stray: Option<usize> = None;
        let walked = walk_unnamed(model, &mut |_, entry| {
            let Some(t) = kind.slot(entry) else {
                return Ok(());
            };
            let slot = k;
            k += 1;
            match slots.get(slot) {
                Some(&i) if stray.is_none() => {
                    if verify && t.id() != listed[i].id() {
                        stray = Some(slot);
                        // Stops the walk (unless `visit` ignores it; nothing more is
                        // written then either).
                        return Err(stray_slot(kind, slot, &names[i]));
                    }
                    let new = match kind {
                        SlotKind::Param => values[i].clone(),
                        SlotKind::Buffer => values[i].detach(),
                    };
                    if new.id() != t.id() {
                        written.push((new.id(), std::mem::replace(t, new)));
                    }
                }
                _ => {}
            }
            Ok(())
        });
        let out = match stray {
            Some(slot) => Err(stray_slot(kind, slot, &names[slots[slot]])),
            None => walked.and_then(|()| self.check_slot_count(k, slots.len())),
        };
        match out {
            Ok(()) => {
                if !written.is_empty() {
                    self.listed.clear(kind);
                }
                Ok(())
            }
            Err(e) if put_back(model, kind, written) => Err(e),
            Err(e) => {
                self.listed.clear(kind);
                Err(not_put_back(e))
            }
        }
    }

    /// Reads the current buffers of `model` in this layout's flat order.
    pub(crate) fn read_buffers<P: Parameters + ?Sized>(
        &self,
        model: &mut P,
    ) -> Result<Vec<Tensor>> {
        let mut out: Vec<Option<Tensor>> = vec![None; self.buffer_names.len()];
        let mut k = 0;
        walk_unnamed(model, &mut |_, entry| {
            if let Entry::Buffer(t) = entry {
                if let Some(&i) = self.buffer_slots.get(k) {
                    out[i].get_or_insert_with(|| t.clone());
                }
                k += 1;
            }
            Ok(())
        })?;
        self.check_slot_count(k, self.buffer_slots.len())?;
        Ok(out
            .into_iter()
            .zip(&self.buffer_tensors)
            .map(|(t, old)| t.unwrap_or_else(|| old.clone()))
            .collect())
    }

    /// A walk of the model saw `got` slots of a kind, the layout `expected`.
    fn check_slot_count(&self, got: usize, expected: usize) -> Result<()> {
        if got != expected {
            return Err(Error::InvalidArgument {
                op: "Parameters::visit",
                message: format!(
                    "the model showed {got} slots, but {expected} when it was first listed; \
                     visit must show the same fields in the same order every time"
                ),
            });
        }
        Ok(())
    }
}

/// The kind of slot a [`ParamLayout`] writes.
#[derive(Clone, Copy, Debug)]
enum SlotKind {
    Param = 0,
    Buffer = 1,
}

impl SlotKind {
    /// The entry's tensor, if the entry is of this kind.
    fn slot(self, entry: Entry<'_>) -> Option<&mut Tensor> {
        match (self, entry) {
            (SlotKind::Param, Entry::Param(t)) | (SlotKind::Buffer, Entry::Buffer(t)) => Some(t),
            _ => None,
        }
    }

    fn singular(self) -> &'static str {
        match self {
            SlotKind::Param => "parameter",
            SlotKind::Buffer => "buffer",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            SlotKind::Param => "parameters",
            SlotKind::Buffer => "buffers",
        }
    }
}

/// How many walks [`put_back`] makes at most: a `visit` that just failed may fail again.
const PUT_BACK_WALKS: usize = 3;

/// Puts the old tensors of a failed write back (`written`: for each slot written, in visit
/// order, the id of the tensor it got and the one it had). Whatever `visit` shows now, a
/// slot is put back when it holds a tensor that the write put there, matched in order: the
/// k-th slot holding id `x` gets the old tensor of the next entry with id `x` after the
/// last one matched, so that slots `visit` adds or leaves out on this walk, and tied slots
/// (the same new tensor in several slots), each get their own old tensor back. False when
/// some slot could not be put back.
fn put_back<P: Parameters + ?Sized>(
    model: &mut P,
    kind: SlotKind,
    written: Vec<(TensorId, Tensor)>,
) -> bool {
    let mut pending: Vec<Option<(TensorId, Tensor)>> = written.into_iter().map(Some).collect();
    for _ in 0..PUT_BACK_WALKS {
        if pending.iter().all(Option::is_none) {
            return true;
        }
        let mut next = 0;
        let _ = walk_unnamed(model, &mut |_, entry| {
            if let Some(t) = kind.slot(entry) {
                let id = t.id();
                let found = pending[next..]
                    .iter()
                    .position(|w| matches!(w, Some((new, _)) if *new == id));
                if let Some(j) = found {
                    if let Some((_, old)) = pending[next + j].take() {
                        *t = old;
                    }
                    next += j + 1;
                }
            }
            Ok(())
        });
    }
    pending.iter().all(Option::is_none)
}

/// Slot `slot` (in visit order) of a write held another tensor than the one listed there.
fn stray_slot(kind: SlotKind, slot: usize, name: &str) -> Error {
    Error::InvalidArgument {
        op: "Parameters::visit",
        message: format!(
            "{} slot {slot} no longer holds {name}, the tensor it held when the model was \
             listed; visit must show the same fields, themselves (not copies or computed \
             tensors), in the same order every time",
            kind.singular()
        ),
    }
}

/// `e`, saying that the model could not be put back as it was.
fn not_put_back(e: Error) -> Error {
    match e {
        Error::InvalidArgument { op, message } => Error::InvalidArgument {
            op,
            message: format!("{message}; some slots could not be put back as they were"),
        },
        other => other,
    }
}

/// Checks a replacement list against the model's tensors: its length, then the shape,
/// dtype and device of each tensor, the first mismatch reported with its position and
/// dotted name.
fn check_list(
    op: &'static str,
    names: &[String],
    current: &[Tensor],
    new: &[Tensor],
    kind: SlotKind,
) -> Result<()> {
    if new.len() != current.len() {
        return Err(Error::ParamCount {
            op,
            what: kind.plural(),
            expected: current.len(),
            got: new.len(),
        });
    }
    for (position, ((name, old), t)) in names.iter().zip(current).zip(new).enumerate() {
        if old.dims() != t.dims() {
            return Err(Error::ParamShape {
                op,
                position,
                name: name.clone(),
                expected: old.dims().to_vec(),
                got: t.dims().to_vec(),
            });
        }
        if old.dtype() != t.dtype() {
            return Err(Error::ParamDType {
                op,
                what: kind.singular(),
                position,
                name: name.clone(),
                expected: old.dtype(),
                got: t.dtype(),
            });
        }
        if !old.device().same_device(t.device()) {
            return Err(Error::ParamDevice {
                op,
                what: kind.singular(),
                position,
                name: name.clone(),
                expected: format!("{:?}", old.device().location()),
                got: format!("{:?}", t.device().location()),
            });
        }
    }
    Ok(())
}

/// A list of modules, named by position: `layers.0.weight`, `layers.1.weight`, ...
impl<T: Parameters> Parameters for Vec<T> {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        for (i, m) in self.iter_mut().enumerate() {
            v.module(&i.to_string(), m)?;
        }
        Ok(())
    }
}

/// An optional module: nothing when absent.
impl<T: Parameters> Parameters for Option<T> {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        match self {
            Some(m) => m.visit(v),
            None => Ok(()),
        }
    }
}

/// A boxed module, named as the module itself.
impl<T: Parameters + ?Sized> Parameters for Box<T> {
    fn visit(&mut self, v: &mut Visitor<'_>) -> Result<()> {
        (**self).visit(v)
    }
}
