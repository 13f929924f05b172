//! Every rule the macro enforces, one small function each, with the reason beside it.
//! Errors point at the user's tokens and say what to write instead; all errors of one
//! input are reported together.

use std::collections::BTreeSet;

use syn::visit::{self, Visit};
use syn::{
    Expr, ExprCall, ExprClosure, ExprMethodCall, FnArg, ImplItem, ItemImpl, ItemStruct, Lit, Pat,
    ReturnType, Type,
};

use crate::ast::{self, Field, FieldKind, Step};

/// The in-place methods that have a differentiable twin (they rebind the tensor handle).
pub(crate) const IN_PLACE: &[&str] = &[
    "add_", "sub_", "mul_", "div_", "addcmul_", "addcdiv_", "lerp_", "clamp_", "sqrt_", "maximum_",
    "set_", "zero_",
];

/// Methods and functions that read a value out of the graph.
const LEAVES_GRAPH: &[&str] = &[
    "detach",
    "to_scalar_f64",
    "to_vec_f64",
    "value",
    "to_candle",
    "to_leaf",
    "to_scalar",
    "to_vec1",
    "to_vec2",
    "to_vec3",
    "no_grad",
];

const EXPECTED_SIGNATURE: &str =
    "fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()>";

/// Collects errors, to be combined into one.
#[derive(Default)]
pub(crate) struct Errors(Vec<syn::Error>);

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        self.0.push(error);
    }

    pub(crate) fn extend(&mut self, errors: impl IntoIterator<Item = syn::Error>) {
        self.0.extend(errors);
    }

    /// All errors as one (`syn::Error::combine`), if any.
    pub(crate) fn into_result(self) -> Result<(), syn::Error> {
        let mut iter = self.0.into_iter();
        match iter.next() {
            None => Ok(()),
            Some(mut first) => {
                for e in iter {
                    first.combine(e);
                }
                Err(first)
            }
        }
    }
}

fn error(tokens: impl quote::ToTokens, message: impl std::fmt::Display) -> syn::Error {
    syn::Error::new_spanned(tokens, message)
}

// ---------------------------------------------------------------- the struct

/// The twin mirrors the struct field by field and is named after it; generic parameters
/// would have to be mirrored too, for little use.
pub(crate) fn struct_shape(item: &ItemStruct, errors: &mut Errors) {
    if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
        errors.push(error(
            &item.generics,
            "a differentiable optimizer cannot be generic; write its hyperparameters as concrete `f64`, tuple-of-`f64`, `bool` or integer fields",
        ));
    }
    if !matches!(item.fields, syn::Fields::Named(_)) {
        errors.push(error(
            &item.ident,
            "hyperparameters are named fields: write `struct Name { lr: f64, .. }`",
        ));
    }
}

/// Only floats can be replaced by tensors in the twin and differentiated; flags are copied.
/// Any other type would have no twin counterpart, so it is rejected on its type.
pub(crate) fn field_type(field: &Field<'_>, errors: &mut Errors) {
    if field.kind == FieldKind::Unsupported {
        errors.push(error(
            &field.field.ty,
            format!(
                "unsupported hyperparameter type for `{}`: supported are `f64` and tuples of `f64` (differentiable, overridable by tensors), `bool` and integers (flags)",
                field.ident
            ),
        ));
    }
}

// ---------------------------------------------------------------- the impl block

/// The macro emits the step as a trait method for two types; a trait impl, generics or
/// other items would have to be duplicated for the twin, where `self` has other types.
pub(crate) fn impl_shape(item: &ItemImpl, errors: &mut Errors) {
    if let Some((_, path, _)) = &item.trait_ {
        errors.push(error(
            path,
            "put #[differentiable_optimizer] on an inherent `impl Name { fn step(..) }` block, not on a trait impl",
        ));
    }
    if !item.generics.params.is_empty() || item.generics.where_clause.is_some() {
        errors.push(error(
            &item.generics,
            "a differentiable optimizer's impl block cannot be generic",
        ));
    }
    if ast::self_ident(item).is_none() {
        errors.push(error(
            &item.self_ty,
            "expected the optimizer struct's name, as in `impl Lion { fn step(..) }`",
        ));
    }
    for other in item.items.iter().filter(|i| !is_step(i)) {
        errors.push(error(
            other,
            "the impl block holds only `fn step`; move helpers out to free functions, which both forms can call",
        ));
    }
    if ast::step_fn(item).is_none() {
        errors.push(error(
            &item.self_ty,
            format!("missing the step function: write `{EXPECTED_SIGNATURE}`"),
        ));
    }
}

fn is_step(item: &ImplItem) -> bool {
    matches!(item, ImplItem::Fn(f) if f.sig.ident == "step")
}

/// Both forms implement `OptimizerStep::step`, so the signature must be exactly that one;
/// the message shows it.
pub(crate) fn step_signature(func: &syn::ImplItemFn, errors: &mut Errors) {
    let sig = &func.sig;
    let inputs: Vec<&FnArg> = sig.inputs.iter().collect();
    let ok = sig.constness.is_none()
        && sig.asyncness.is_none()
        && sig.unsafety.is_none()
        && sig.abi.is_none()
        && sig.variadic.is_none()
        && sig.generics.params.is_empty()
        && sig.generics.where_clause.is_none()
        && inputs.len() == 4
        && matches!(inputs[0], FnArg::Receiver(r)
            if r.reference.is_some() && r.mutability.is_none() && r.colon_token.is_none())
        && typed(inputs[1], "Tensor", true)
        && typed(inputs[2], "Tensor", false)
        && typed(inputs[3], "State", true)
        && returns_unit_result(&sig.output);
    if !ok {
        errors.push(error(
            sig,
            format!("unsupported step signature; expected `{EXPECTED_SIGNATURE}`"),
        ));
    }
}

/// `name: &Ty` or `name: &mut Ty` with a plain name.
fn typed(arg: &FnArg, ty: &str, mutable: bool) -> bool {
    let FnArg::Typed(t) = arg else { return false };
    let plain_name = matches!(&*t.pat, Pat::Ident(p) if p.by_ref.is_none() && p.mutability.is_none() && p.subpat.is_none());
    let Type::Reference(r) = &*t.ty else {
        return false;
    };
    plain_name && r.mutability.is_some() == mutable && last_segment_is(&r.elem, ty)
}

fn last_segment_is(ty: &Type, name: &str) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none()
        && p.path.segments.last().is_some_and(|s| s.ident == name && s.arguments.is_none()))
}

fn returns_unit_result(output: &ReturnType) -> bool {
    let ReturnType::Type(_, ty) = output else {
        return false;
    };
    let Type::Path(p) = &**ty else { return false };
    let Some(last) = p.path.segments.last() else {
        return false;
    };
    let syn::PathArguments::AngleBracketed(args) = &last.arguments else {
        return false;
    };
    last.ident == "Result"
        && args.args.len() == 1
        && matches!(&args.args[0], syn::GenericArgument::Type(Type::Tuple(t)) if t.elems.is_empty())
}

// ---------------------------------------------------------------- the step body

/// Checks every rule on the step body.
pub(crate) fn body(step: &Step<'_>, errors: &mut Errors) {
    let mut walker = Body {
        step,
        errors: Errors::default(),
        aliases: BTreeSet::new(),
    };
    walker.visit_block(&step.func.block);
    errors.extend(walker.errors.0);
    let mut init = StateInit {
        state: &step.state,
        init: BTreeSet::new(),
        errors: Vec::new(),
    };
    init.visit_block(&step.func.block);
    errors.extend(init.errors);
}

struct Body<'a> {
    step: &'a Step<'a>,
    errors: Errors,
    /// Names currently bound to state entries.
    aliases: BTreeSet<String>,
}

impl<'ast> Visit<'ast> for Body<'_> {
    fn visit_expr_method_call(&mut self, m: &'ast ExprMethodCall) {
        let grad = grad_in_place(m, self.step);
        let hyper = hyperparameter_in_place(m);
        if let Some(e) = grad.or(hyper) {
            self.errors.push(e);
        } else if let Some(e) = unsupported_in_place(m) {
            self.errors.push(e);
        }
        if let Some(e) = leaves_graph(&m.method, m) {
            self.errors.push(e);
        }
        if let Some(e) = recomputes_loss(&m.method, m) {
            self.errors.push(e);
        }
        self.visit_expr(&m.receiver);
        let init_arg = (m.method == "get_or_insert_with" || m.method == "scalar_or_insert_with")
            .then(|| m.args.last())
            .flatten();
        for arg in &m.args {
            match arg {
                // The lazy initializer of a state entry: the one closure a step may hold.
                Expr::Closure(c) if Some(arg) == init_arg => self.visit_expr(&c.body),
                _ => self.visit_expr(arg),
            }
        }
    }

    fn visit_expr_call(&mut self, c: &'ast ExprCall) {
        if let Expr::Path(p) = ast::strip(&c.func) {
            if let Some(last) = p.path.segments.last() {
                if let Some(e) = leaves_graph(&last.ident, c) {
                    self.errors.push(e);
                }
                if let Some(e) = recomputes_loss(&last.ident, c) {
                    self.errors.push(e);
                }
            }
        }
        visit::visit_expr_call(self, c);
    }

    fn visit_expr_closure(&mut self, c: &'ast ExprClosure) {
        self.errors.push(closure(c));
        visit::visit_expr_closure(self, c);
    }

    fn visit_expr_assign(&mut self, a: &'ast syn::ExprAssign) {
        self.check_assignment(&a.left, a);
        if let Some(e) = alias_escapes(&a.right, &self.aliases) {
            self.errors.push(e);
        }
        visit::visit_expr_assign(self, a);
    }

    fn visit_expr_binary(&mut self, b: &'ast syn::ExprBinary) {
        if is_compound_assignment(&b.op) {
            self.check_assignment(&b.left, b);
        }
        visit::visit_expr_binary(self, b);
    }

    fn visit_local(&mut self, local: &'ast syn::Local) {
        if let Some(init) = &local.init {
            if let Some(e) = alias_escapes(&init.expr, &self.aliases) {
                self.errors.push(e);
            }
        }
        visit::visit_local(self, local);
        // A new binding of the same name ends the alias.
        for name in bound_names(&local.pat) {
            self.aliases.remove(&name);
        }
        if let Some((name, _)) = ast::alias_binding(local, &self.step.state) {
            self.aliases.insert(name.ident.to_string());
        }
    }

    fn visit_item(&mut self, _: &'ast syn::Item) {
        // Nested items are ordinary code, not part of the step.
    }
}

impl Body<'_> {
    fn check_assignment(&mut self, left: &Expr, whole: &dyn quote::ToTokens) {
        match ast::root(left) {
            Some(r) if r == "self" => self.errors.push(assigns_hyperparameter(whole)),
            Some(r) if *r == self.step.grad => self.errors.push(error(
                whole,
                format!(
                    "the gradient `{r}` is read-only in a step; compute a new tensor instead: `let g = {r}.add(..)?;`"
                ),
            )),
            _ => {}
        }
    }
}

/// The gradient is the caller's (and, in the twin, part of the graph of the inner loss);
/// updating it in place would be lost after the step or corrupt the caller's copy.
fn grad_in_place(m: &ExprMethodCall, step: &Step<'_>) -> Option<syn::Error> {
    let root = ast::root(&m.receiver)?;
    (ast::is_in_place(&m.method) && *root == step.grad).then(|| {
        error(
            m,
            format!(
                "in-place update of the gradient `{root}`; the gradient is read-only in a step: compute a new tensor instead, e.g. `let g = {root}.{}(..)?;`",
                m.method.to_string().trim_end_matches('_')
            ),
        )
    })
}

/// Hyperparameters are constants in the ordinary form and possibly tensors in the twin;
/// a step that changes them would differ between the two and between parameters.
fn hyperparameter_in_place(m: &ExprMethodCall) -> Option<syn::Error> {
    let root = ast::root(&m.receiver)?;
    (ast::is_in_place(&m.method) && root == "self").then(|| assigns_hyperparameter(m))
}

fn assigns_hyperparameter(tokens: &dyn quote::ToTokens) -> syn::Error {
    error(
        tokens,
        "assignment to a hyperparameter inside the step; hyperparameters are read-only here: keep values that change between steps in `state` (e.g. `state.set_scalar(\"k\", ..)`)",
    )
}

/// Only methods that rebind the tensor handle have a differentiable twin; any other
/// in-place method would mutate storage the graph has recorded.
fn unsupported_in_place(m: &ExprMethodCall) -> Option<syn::Error> {
    let name = m.method.to_string();
    (ast::is_in_place(&m.method) && !IN_PLACE.contains(&name.as_str())).then(|| {
        error(
            &m.method,
            format!(
                "`{name}` has no differentiable twin; use one of the supported in-place methods ({}), or an out-of-place op bound back to the name: `x = x.op(..)?;`",
                IN_PLACE.join(", ")
            ),
        )
    })
}

/// Reading a value out of the graph (or cutting it) makes the twin's meta-gradient
/// silently miss that path, unlike the ordinary form, which has no graph to miss.
fn leaves_graph(name: &syn::Ident, tokens: &dyn quote::ToTokens) -> Option<syn::Error> {
    LEAVES_GRAPH.contains(&name.to_string().as_str()).then(|| {
        error(
            tokens,
            format!(
                "`{name}` leaves the graph, so the differentiable twin would not see this path; keep the computation on tensors and `Scalar`s (branch on flags, the step counter or comparisons such as `self.momentum != 0.0`)"
            ),
        )
    })
}

/// The step receives the gradient; recomputing a loss or a gradient inside it would run
/// once per parameter and nest a second graph into the twin.
fn recomputes_loss(name: &syn::Ident, tokens: &dyn quote::ToTokens) -> Option<syn::Error> {
    ["grad", "backward", "forward"]
        .contains(&name.to_string().as_str())
        .then(|| {
            error(
                tokens,
                "loss recomputation inside the step; the step receives the gradient as its `grad` argument: compute losses and gradients outside the optimizer",
            )
        })
}

/// A closure would capture the step's tensors and run later or repeatedly, out of the
/// order the twin records; only a state entry's lazy initializer is allowed.
fn closure(c: &ExprClosure) -> syn::Error {
    error(
        c,
        "closure inside the step; write the computation inline (the only closure allowed is the initializer of `state.get_or_insert_with(\"k\", || ..)`)",
    )
}

/// `let y = exp_avg;` moves a state alias to a new name: in-place updates through `y`
/// would not be written back to the state.
fn alias_escapes(value: &Expr, aliases: &BTreeSet<String>) -> Option<syn::Error> {
    let name = ast::path_ident(value)?;
    aliases.contains(&name.to_string()).then(|| {
        error(
            value,
            format!(
                "a tensor escaping the step by an alias: `{name}` is bound to a state entry, and updates through another name would not reach the state; update `{name}` itself, or compute a new tensor with `{name}.clone()` or an out-of-place op"
            ),
        )
    })
}

fn is_compound_assignment(op: &syn::BinOp) -> bool {
    use syn::BinOp::*;
    matches!(
        op,
        AddAssign(_)
            | SubAssign(_)
            | MulAssign(_)
            | DivAssign(_)
            | RemAssign(_)
            | BitXorAssign(_)
            | BitAndAssign(_)
            | BitOrAssign(_)
            | ShlAssign(_)
            | ShrAssign(_)
    )
}

/// The names a pattern binds.
pub(crate) fn bound_names(pat: &Pat) -> Vec<String> {
    struct Names(Vec<String>);
    impl<'ast> Visit<'ast> for Names {
        fn visit_pat_ident(&mut self, p: &'ast syn::PatIdent) {
            self.0.push(p.ident.to_string());
            visit::visit_pat_ident(self, p);
        }
    }
    let mut names = Names(Vec::new());
    names.visit_pat(pat);
    names.0
}

// ---------------------------------------------------------------- state initialization

/// Tracks which state keys are initialized on every path to the current point: by
/// `get_or_insert_with`, `set` and friends in dominating statements of the same or an
/// enclosing block, or inside `if state.contains("k") { .. }`.
struct StateInit<'a> {
    state: &'a syn::Ident,
    init: BTreeSet<String>,
    errors: Vec<syn::Error>,
}

const STATE_WRITES: &[&str] = &[
    "get_or_insert_with",
    "scalar_or_insert_with",
    "set",
    "set_scalar",
    "set_int",
    "insert",
    "increment",
];
const STATE_READS: &[&str] = &["get", "scalar"];

impl StateInit<'_> {
    /// Visits a branch that may not run: what it initializes does not count after it.
    fn branch(&mut self, guard: Option<String>, f: impl FnOnce(&mut Self)) -> BTreeSet<String> {
        let saved = self.init.clone();
        self.init.extend(guard);
        f(self);
        std::mem::replace(&mut self.init, saved)
    }

    /// `state.contains("k")`: the key that a true condition guarantees.
    fn guard(&self, cond: &Expr) -> Option<String> {
        match ast::strip(cond) {
            Expr::MethodCall(m) if m.method == "contains" => self.key_of(m),
            _ => None,
        }
    }

    /// The literal key of a method call on the state.
    fn key_of(&self, m: &ExprMethodCall) -> Option<String> {
        let receiver = ast::path_ident(&m.receiver)?;
        if receiver != self.state {
            return None;
        }
        match m.args.first().map(ast::strip) {
            Some(Expr::Lit(l)) => match &l.lit {
                Lit::Str(s) => Some(s.value()),
                _ => None,
            },
            _ => None,
        }
    }
}

/// Reading an entry that an earlier step may not have created fails at run time on the
/// first step; creating it lazily with `get_or_insert_with` makes the step total.
fn uninitialized_read(m: &ExprMethodCall, key: &str) -> syn::Error {
    error(
        m,
        format!(
            "state entry \"{key}\" may not be initialized here; create it on every path before reading it, e.g. `state.get_or_insert_with(\"{key}\", || p.zeros_like())?`, or guard the read with `if state.contains(\"{key}\")`"
        ),
    )
}

impl<'ast> Visit<'ast> for StateInit<'_> {
    fn visit_expr_method_call(&mut self, m: &'ast ExprMethodCall) {
        visit::visit_expr_method_call(self, m);
        let Some(key) = self.key_of(m) else { return };
        let method = m.method.to_string();
        if STATE_READS.contains(&method.as_str()) && !self.init.contains(&key) {
            self.errors.push(uninitialized_read(m, &key));
        } else if STATE_WRITES.contains(&method.as_str()) {
            self.init.insert(key);
        }
    }

    fn visit_expr_if(&mut self, e: &'ast syn::ExprIf) {
        self.visit_expr(&e.cond);
        let guard = self.guard(&e.cond);
        let then = self.branch(guard, |s| s.visit_block(&e.then_branch));
        if let Some((_, otherwise)) = &e.else_branch {
            let other = self.branch(None, |s| s.visit_expr(otherwise));
            // Initialized on both branches: initialized after the `if`.
            self.init.extend(then.intersection(&other).cloned());
        }
    }

    fn visit_expr_match(&mut self, e: &'ast syn::ExprMatch) {
        self.visit_expr(&e.expr);
        for arm in &e.arms {
            self.branch(None, |s| visit::visit_arm(s, arm));
        }
    }

    fn visit_expr_while(&mut self, e: &'ast syn::ExprWhile) {
        self.visit_expr(&e.cond);
        let guard = self.guard(&e.cond);
        self.branch(guard, |s| s.visit_block(&e.body));
    }

    fn visit_expr_for_loop(&mut self, e: &'ast syn::ExprForLoop) {
        self.visit_expr(&e.expr);
        self.branch(None, |s| s.visit_block(&e.body));
    }

    fn visit_expr_loop(&mut self, e: &'ast syn::ExprLoop) {
        self.branch(None, |s| s.visit_block(&e.body));
    }

    fn visit_expr_closure(&mut self, c: &'ast ExprClosure) {
        self.branch(None, |s| s.visit_expr(&c.body));
    }

    fn visit_expr_binary(&mut self, b: &'ast syn::ExprBinary) {
        self.visit_expr(&b.left);
        let guard = match b.op {
            syn::BinOp::And(_) => self.guard(&b.left),
            _ => None,
        };
        if matches!(b.op, syn::BinOp::And(_) | syn::BinOp::Or(_)) {
            self.branch(guard, |s| s.visit_expr(&b.right));
        } else {
            self.visit_expr(&b.right);
        }
    }

    fn visit_item(&mut self, _: &'ast syn::Item) {}
}
