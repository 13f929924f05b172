//! Every rule the macro enforces, one small function each, with the reason beside it.
//! Errors point at the user's tokens and say what to write instead; all errors of one
//! input are reported together.

use syn::visit::{self, Visit};
use syn::{
    Expr, ExprCall, ExprClosure, ExprMethodCall, FnArg, ImplItem, ItemImpl, ItemStruct, Pat,
    ReturnType, Type,
};

use std::collections::BTreeSet;

use crate::ast::{self, Field, FieldKind, Step};

/// The in-place methods that have a differentiable twin (they rebind the tensor handle).
pub(crate) const IN_PLACE: &[&str] = &[
    "add_",
    "sub_",
    "sub_scaled_",
    "mul_",
    "div_",
    "addcmul_",
    "addcdiv_",
    "lerp_",
    "clamp_",
    "sqrt_",
    "maximum_",
    "set_",
    "zero_",
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
        entries: BTreeSet::new(),
        hyper: crate::rewrite::derived_names(&step.func.block, None),
        scopes: Vec::new(),
    };
    walker.visit_block(&step.func.block);
    errors.extend(walker.errors.0);
}

/// `fn validate` is emitted unchanged for both forms; its `self.lr` is a `Scalar` in the
/// twin, which compares with floats but lacks `f64`'s other methods.
pub(crate) fn validate_body(func: &syn::ImplItemFn, errors: &mut Errors) {
    struct Methods<'e>(&'e mut Errors);
    impl<'ast> Visit<'ast> for Methods<'_> {
        fn visit_expr_method_call(&mut self, m: &'ast ExprMethodCall) {
            self.0.extend(f64_method_on_hyperparameter(m));
            visit::visit_expr_method_call(self, m);
        }
        fn visit_macro(&mut self, mac: &'ast syn::Macro) {
            for e in crate::rewrite::macro_exprs(mac).unwrap_or_default() {
                Visit::visit_expr(self, &e);
            }
        }
        fn visit_item(&mut self, _: &'ast syn::Item) {}
    }
    Methods(errors).visit_block(&func.block);
}

struct Body<'a> {
    step: &'a Step<'a>,
    errors: Errors,
    /// Locals bound to a state entry by `let x = state.get(..)?` (or
    /// `get_or_insert_with`), for a clearer message than rustc's on `x = ..`.
    entries: BTreeSet<String>,
    /// Locals computed from a hyperparameter: `Scalar`s in the twin.
    hyper: BTreeSet<String>,
    /// The names bound in each enclosing scope (blocks, match arms, `if let`, `for`), to
    /// tell the gradient from a local that shadows it (`let mut grad = grad.clone();`).
    scopes: Vec<Vec<String>>,
}

impl<'ast> Visit<'ast> for Body<'_> {
    fn visit_expr_method_call(&mut self, m: &'ast ExprMethodCall) {
        let grad = grad_in_place(m, self.step).filter(|_| !self.shadowed(&self.step.grad));
        let hyper = hyperparameter_in_place(m);
        if let Some(e) = grad.or(hyper) {
            self.errors.push(e);
        } else if let Some(e) = unsupported_in_place(m) {
            self.errors.push(e);
        }
        // `state.value("k")` reads an entry (its tensor stays in the graph); the graph
        // exits `Tensor::value()` and `Scalar::value()` take no argument.
        let reads_an_entry = m.method == "value" && !m.args.is_empty();
        if let Some(e) = leaves_graph(&m.method, m).filter(|_| !reads_an_entry) {
            self.errors.push(e);
        }
        if let Some(e) = recomputes_loss(&m.method, m) {
            self.errors.push(e);
        }
        if let Some(e) = float_only_method(m, &self.hyper) {
            self.errors.push(e);
        }
        let more = [
            depends_on_recording(&m.method, m),
            (m.method == "to_vec" && m.turbofish.is_some()).then(|| graph_exit(&m.method, m)),
            f64_method_on_hyperparameter(m),
            hyperparameter_as_float_argument(m, &self.hyper),
        ];
        self.errors.extend(more.into_iter().flatten());
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
                if let Some(e) = float_function(p, c, &self.hyper) {
                    self.errors.push(e);
                }
                if let Some(e) = depends_on_recording(&last.ident, c) {
                    self.errors.push(e);
                }
                if let Some(e) = tensor_from_hyperparameter(p, c, &self.hyper) {
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
        visit::visit_expr_assign(self, a);
    }

    fn visit_expr_binary(&mut self, b: &'ast syn::ExprBinary) {
        if is_compound_assignment(&b.op) {
            self.check_assignment(&b.left, b);
            let param = &self.step.param;
            if ast::root(&b.left).is_some_and(|r| r == param) && !self.shadowed(param) {
                self.errors
                    .push(compound_assignment_on_the_parameter(b, param));
            }
        }
        visit::visit_expr_binary(self, b);
    }

    fn visit_expr_try(&mut self, t: &'ast syn::ExprTry) {
        // `grad.to_vec()?` is `Tensor::to_vec` (a slice's `to_vec` is not fallible).
        if let Expr::MethodCall(m) = ast::strip(&t.expr) {
            if m.method == "to_vec" && m.turbofish.is_none() {
                self.errors.push(graph_exit(&m.method, m));
            }
        }
        visit::visit_expr_try(self, t);
    }

    fn visit_expr_match(&mut self, m: &'ast syn::ExprMatch) {
        if from_hyperparameter(&m.expr, &self.hyper) && !converts_flag(&m.expr) {
            for arm in &m.arms {
                self.errors.extend(float_pattern(&arm.pat));
            }
        }
        visit::visit_expr_match(self, m);
    }

    fn visit_expr_let(&mut self, l: &'ast syn::ExprLet) {
        if from_hyperparameter(&l.expr, &self.hyper) && !converts_flag(&l.expr) {
            self.errors.extend(float_pattern(&l.pat));
        }
        visit::visit_expr_let(self, l);
    }

    fn visit_block(&mut self, b: &'ast syn::Block) {
        self.scopes.push(Vec::new());
        visit::visit_block(self, b);
        self.scopes.pop();
    }

    fn visit_arm(&mut self, arm: &'ast syn::Arm) {
        self.scopes.push(bound_names(&arm.pat));
        visit::visit_arm(self, arm);
        self.scopes.pop();
    }

    fn visit_expr_if(&mut self, i: &'ast syn::ExprIf) {
        self.visit_expr(&i.cond);
        self.scopes.push(let_bound_names(&i.cond));
        self.visit_block(&i.then_branch);
        self.scopes.pop();
        if let Some((_, e)) = &i.else_branch {
            self.visit_expr(e);
        }
    }

    fn visit_expr_while(&mut self, w: &'ast syn::ExprWhile) {
        self.visit_expr(&w.cond);
        self.scopes.push(let_bound_names(&w.cond));
        self.visit_block(&w.body);
        self.scopes.pop();
    }

    fn visit_expr_for_loop(&mut self, f: &'ast syn::ExprForLoop) {
        self.visit_expr(&f.expr);
        self.scopes.push(bound_names(&f.pat));
        self.visit_block(&f.body);
        self.scopes.pop();
    }

    /// Macros whose input is a list of expressions (`vec![..]`, `assert!(..)`,
    /// `println!(..)`, ...) are checked as the expressions they hold.
    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        for e in crate::rewrite::macro_exprs(mac).unwrap_or_default() {
            Visit::visit_expr(self, &e);
        }
    }

    fn visit_local(&mut self, local: &'ast syn::Local) {
        if let Some(e) = float_annotation(local, &self.hyper) {
            self.errors.push(e);
        }
        visit::visit_local(self, local);
        let names = bound_names(&local.pat);
        for name in &names {
            self.entries.remove(name);
        }
        if let Some(scope) = self.scopes.last_mut() {
            scope.extend(names);
        }
        if let Some(name) = state_entry_binding(local, &self.step.state) {
            self.entries.insert(name.to_string());
        }
    }

    fn visit_item(&mut self, _: &'ast syn::Item) {
        // Nested items are ordinary code, not part of the step.
    }
}

impl Body<'_> {
    /// Whether a local named like this parameter of the step is in scope here.
    fn shadowed(&self, name: &syn::Ident) -> bool {
        let name = name.to_string();
        self.scopes.iter().flatten().any(|n| *n == name)
    }

    fn check_assignment(&mut self, left: &Expr, whole: &dyn quote::ToTokens) {
        match ast::root(left) {
            Some(r) if r == "self" => self.errors.push(assigns_hyperparameter(whole)),
            Some(r) if *r == self.step.grad && !self.shadowed(&self.step.grad) => self.errors.push(error(
                whole,
                format!(
                    "the gradient `{r}` is read-only in a step; compute a new tensor instead: `let g = {r}.add(..)?;`"
                ),
            )),
            Some(r) if ast::path_ident(left).is_some() && self.entries.contains(&r.to_string()) => {
                self.errors.push(error(
                    whole,
                    format!(
                        "assignment to `{r}`, a state entry's tensor; as in torch, a new value bound to the name would leave the entry unchanged: update the entry with `{r}.set_(&new)?` (or an in-place op such as `{r}.mul_(..)?`), or bind a new local with `let {r} = ..;`"
                    ),
                ));
            }
            _ => {}
        }
    }
}

/// Whether an expression is computed from a hyperparameter (`self`, or a local derived
/// from it).
fn from_hyperparameter(e: &Expr, hyper: &BTreeSet<String>) -> bool {
    crate::rewrite::flows_from_hyperparameter(e, hyper)
}

fn is_primitive_float(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none() && (p.path.is_ident("f64") || p.path.is_ident("f32")))
}

/// `let lr: f64 = self.lr;` holds in the ordinary form only: in the twin the value is a
/// `Scalar`, which may be a tensor the meta-gradient must reach.
fn float_annotation(local: &syn::Local, hyper: &BTreeSet<String>) -> Option<syn::Error> {
    let Pat::Type(t) = &local.pat else {
        return None;
    };
    let init = local.init.as_ref()?;
    (is_primitive_float(&t.ty) && !converts_flag(&init.expr) && from_hyperparameter(&init.expr, hyper)).then(|| {
        let (pat, ty) = (&t.pat, &t.ty);
        error(
            ty,
            format!(
                "a hyperparameter's value typed as `{}`; in the differentiable twin it is a `Scalar` (possibly a tensor the meta-gradient reaches): drop the annotation, `let {} = ..;`, and use `Scalar`'s arithmetic, comparisons and methods (abs, max, min, clamp, sqrt, powf, powi, exp, ln)",
                quote::quote!(#ty),
                quote::quote!(#pat)
            ),
        )
    })
}

/// `f64::from(self.n)`: an integer flag converted, an `f64` in both forms.
fn converts_flag(e: &Expr) -> bool {
    matches!(ast::strip(e), Expr::Call(c)
        if matches!(ast::strip(&c.func), Expr::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "from")))
}

/// A float literal in a pattern on a hyperparameter (`match self.momentum { 0.0 => .. }`):
/// the ordinary form compiles, the twin's `Scalar` has no literal patterns (and a tensor
/// equal to 0 would match no `Scalar::Float(0.0)` pattern).
fn float_pattern(pat: &Pat) -> Option<syn::Error> {
    fn has_float(tokens: proc_macro2::TokenStream) -> bool {
        tokens.into_iter().any(|t| match t {
            proc_macro2::TokenTree::Literal(l) => {
                matches!(syn::Lit::new(l), syn::Lit::Float(_))
            }
            proc_macro2::TokenTree::Group(g) => has_float(g.stream()),
            _ => false,
        })
    }
    has_float(quote::quote!(#pat)).then(|| {
        error(
            pat,
            "a float pattern on a hyperparameter, which is a `Scalar` in the differentiable twin (no literal patterns match it); compare instead: `if self.momentum == 0.0 { .. } else { .. }`",
        )
    })
}

/// The names `if let` / `while let` conditions bind (let chains included).
fn let_bound_names(cond: &Expr) -> Vec<String> {
    struct Lets(Vec<String>);
    impl<'ast> Visit<'ast> for Lets {
        fn visit_expr_let(&mut self, l: &'ast syn::ExprLet) {
            self.0.extend(bound_names(&l.pat));
            visit::visit_expr_let(self, l);
        }
        fn visit_expr_closure(&mut self, _: &'ast ExprClosure) {}
        fn visit_block(&mut self, _: &'ast syn::Block) {}
    }
    let mut lets = Lets(Vec::new());
    lets.visit_expr(cond);
    lets.0
}

/// Whether the step records a graph differs between the two forms: the ordinary optimizer
/// steps detached parameters under `no_grad`, the twin records (unless in test mode). A
/// branch on it would take different paths.
fn depends_on_recording(name: &syn::Ident, tokens: &dyn quote::ToTokens) -> Option<syn::Error> {
    ["requires_grad", "is_leaf", "is_grad_enabled"]
        .contains(&name.to_string().as_str())
        .then(|| {
            error(
                tokens,
                format!(
                    "`{name}` differs between the two forms: the ordinary optimizer steps detached parameters under `no_grad`, the differentiable twin records a graph; branch on flags or hyperparameters instead (parameters that are frozen or have no gradient never reach the step)"
                ),
            )
        })
}

/// `f64` methods that `Scalar` does not have (and integers do not either, so a receiver
/// `self.x` with one of them is a float hyperparameter).
const F64_ONLY_METHODS: &[&str] = &[
    "is_nan",
    "is_finite",
    "is_infinite",
    "is_normal",
    "is_subnormal",
    "is_sign_positive",
    "is_sign_negative",
    "floor",
    "ceil",
    "round",
    "trunc",
    "fract",
    "mul_add",
    "log2",
    "log10",
    "cbrt",
    "hypot",
    "sin",
    "cos",
    "tan",
    "asin",
    "acos",
    "atan",
    "atan2",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
    "exp2",
    "exp_m1",
    "ln_1p",
    "to_degrees",
    "to_radians",
    "copysign",
    "total_cmp",
    "to_bits",
    "log",
    "sin_cos",
    "classify",
    "next_up",
    "next_down",
    "round_ties_even",
    "abs_sub",
    "to_int_unchecked",
];

/// `self.lr.is_finite()` and friends: an `f64` method that the twin's `Scalar` lacks.
fn f64_method_on_hyperparameter(m: &ExprMethodCall) -> Option<syn::Error> {
    let on_field = matches!(ast::strip(&m.receiver), Expr::Field(_))
        && ast::root(&m.receiver).is_some_and(|r| r == "self");
    let name = m.method.to_string();
    (on_field && F64_ONLY_METHODS.contains(&name.as_str())).then(|| {
        error(
            &m.method,
            format!(
                "`{name}` is a method of `f64`, but a hyperparameter is a `Scalar` in the differentiable twin, which has arithmetic, comparisons with floats and `abs`, `max`, `min`, `clamp`, `sqrt`, `powf`, `powi`, `exp`, `ln`, `tanh`, `recip`: write a test as a comparison (`self.lr >= 0.0`) or the formula with these"
            ),
        )
    })
}

/// `1e-8_f64.max(self.eps)`: an `f64` method that takes the hyperparameter as a plain
/// float; `Scalar` has the method with the operands the other way round.
fn hyperparameter_as_float_argument(
    m: &ExprMethodCall,
    hyper: &BTreeSet<String>,
) -> Option<syn::Error> {
    let float_receiver = matches!(ast::strip(&m.receiver),
        Expr::Lit(l) if matches!(l.lit, syn::Lit::Float(_)));
    let swappable = ["max", "min"].iter().any(|n| m.method == n);
    let arg = m.args.iter().find(|a| from_hyperparameter(a, hyper))?;
    (float_receiver && swappable).then(|| {
        let (receiver, method) = (&m.receiver, &m.method);
        error(
            m,
            format!(
                "`f64::{method}` takes a plain float, but `{}` is a hyperparameter, a `Scalar` in the differentiable twin; put it first: `{}.{method}({})`",
                quote::quote!(#arg),
                quote::quote!(#arg),
                quote::quote!(#receiver)
            ),
        )
    })
}

/// `Tensor::full_scalar(self.lr, ..)`: a constructor that takes plain floats, given a
/// hyperparameter.
fn tensor_from_hyperparameter(
    p: &syn::ExprPath,
    c: &ExprCall,
    hyper: &BTreeSet<String>,
) -> Option<syn::Error> {
    let segments: Vec<&syn::Ident> = p.path.segments.iter().map(|s| &s.ident).collect();
    let [.., ty, name] = segments.as_slice() else {
        return None;
    };
    let constructor = ["full_scalar", "full", "scalar", "from_vec", "from_slice"]
        .iter()
        .any(|n| *name == n);
    let arg = c.args.iter().find(|a| from_hyperparameter(a, hyper))?;
    (*ty == "Tensor" && constructor).then(|| {
        error(
            arg,
            format!(
                "`Tensor::{name}` takes plain floats, but this is a hyperparameter, a `Scalar` in the differentiable twin (possibly a tensor the meta-gradient must reach); multiply instead: `p.ones_like()?.mul(self.lr)?` for the parameter's shape, `Tensor::full_scalar(1.0, dtype, device)?.mul(self.lr)?` for a scalar"
            ),
        )
    })
}

/// Tensor methods whose numeric arguments are plain `f64`s, with what to write for a
/// hyperparameter argument instead.
const FLOAT_ONLY_METHODS: &[(&str, &str)] = &[
    (
        "affine",
        "`x.mul(a)?.add(b)?` (`mul`, `add`, `sub`, `div` take a `Scalar`)",
    ),
    (
        "powf",
        "`x.log()?.mul(e)?.exp()?` for positive `x`, or a constant exponent",
    ),
    ("full_like", "`x.zeros_like()?.add(v)?`"),
    (
        "leaky_relu",
        "`x.maximum(&x.mul(slope)?)?` for a slope below 1",
    ),
    (
        "elu",
        "a constant `alpha`, or the formula written with `mul`, `exp` and `minimum`",
    ),
];

/// A hyperparameter handed to a tensor method that takes `f64`: the ordinary form
/// compiles, the twin cannot (and would lose the path to a tensor hyperparameter).
fn float_only_method(m: &ExprMethodCall, hyper: &BTreeSet<String>) -> Option<syn::Error> {
    let (name, instead) = FLOAT_ONLY_METHODS
        .iter()
        .find(|(name, _)| m.method == name)?;
    // `self.beta.powf(self.gamma)`: a `Scalar`'s `powf`, which takes a `Scalar` exponent
    // and has `f64::powf`'s bits.
    if *name == "powf" && from_hyperparameter(&m.receiver, hyper) {
        return None;
    }
    m.args
        .iter()
        .find(|a| from_hyperparameter(a, hyper))
        .map(|arg| {
            error(
                arg,
                format!(
                    "`{name}` takes a plain `f64`, but this is a hyperparameter, a `Scalar` in the differentiable twin; write {instead}"
                ),
            )
        })
}

/// `f64::max(self.lr, 1.0)` and friends: a function of `f64` applied to a hyperparameter.
fn float_function(p: &syn::ExprPath, c: &ExprCall, hyper: &BTreeSet<String>) -> Option<syn::Error> {
    let segments = &p.path.segments;
    let on_float = segments.len() == 2
        && (segments[0].ident == "f64" || segments[0].ident == "f32")
        && segments[1].ident != "from";
    if !on_float || !c.args.iter().any(|a| from_hyperparameter(a, hyper)) {
        return None;
    }
    let method = &segments[1].ident;
    Some(error(
        c,
        format!(
            "`{}::{method}` takes a plain float, but a hyperparameter is a `Scalar` in the differentiable twin; call the method on the value instead (`x.{method}(..)`), which `Scalar` has too",
            segments[0].ident
        ),
    ))
}

/// `x` of `let x = state.get("k")?;` or `let x = state.get_or_insert_with("k", ..)?;`.
fn state_entry_binding<'a>(local: &'a syn::Local, state: &syn::Ident) -> Option<&'a syn::Ident> {
    let name = match &local.pat {
        Pat::Ident(p) if p.subpat.is_none() => &p.ident,
        Pat::Type(t) => match &*t.pat {
            Pat::Ident(p) if p.subpat.is_none() => &p.ident,
            _ => return None,
        },
        _ => return None,
    };
    let init = local.init.as_ref()?;
    let Expr::Try(tried) = ast::strip(&init.expr) else {
        return None;
    };
    let Expr::MethodCall(call) = ast::strip(&tried.expr) else {
        return None;
    };
    let on_state = ast::path_ident(&call.receiver).is_some_and(|r| r == state);
    (on_state && (call.method == "get" || call.method == "get_or_insert_with")).then_some(name)
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

/// `*p -= self.lr * grad`: tensors have no compound assignment (it compiles in neither
/// form, and rustc reports it once per form); the parameter is updated by an in-place method.
fn compound_assignment_on_the_parameter(b: &syn::ExprBinary, param: &syn::Ident) -> syn::Error {
    use syn::BinOp::{AddAssign, DivAssign, MulAssign, SubAssign};
    let op = &b.op;
    let method = match b.op {
        AddAssign(_) => Some("add_"),
        SubAssign(_) => Some("sub_"),
        MulAssign(_) => Some("mul_"),
        DivAssign(_) => Some("div_"),
        _ => None,
    };
    let right = &b.right;
    let text = quote::quote!(#right).to_string();
    let operand = match ast::strip(right) {
        // `self.lr * grad` is a `Result<Tensor>`, as `f64 * &Tensor` is.
        Expr::Binary(_) => format!("&({text})?"),
        Expr::Reference(_) => text,
        _ => format!("&{text}"),
    };
    let instead = method.map_or_else(
        || "an in-place method (`add_`, `sub_`, `mul_`, `div_`, ...)".to_string(),
        |m| format!("`{param}.{m}({operand})?;`"),
    );
    error(
        b,
        format!(
            "compound assignment `{}` on the parameter `{param}`; tensors have no `{}`: update the parameter in place with {instead}",
            quote::quote!(#op),
            quote::quote!(#op)
        ),
    )
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
    // torch's names for supported methods.
    let torch = match name.as_str() {
        "copy_" => " (torch's `copy_` is `set_`)",
        "fill_" => " (torch's `fill_(v)` is `zero_()?.add_(v)`)",
        _ => "",
    };
    (ast::is_in_place(&m.method) && !IN_PLACE.contains(&name.as_str())).then(|| {
        error(
            &m.method,
            format!(
                "`{name}` has no differentiable twin; use one of the supported in-place methods ({}){torch}, or an out-of-place op bound back to the name: `x = x.op(..)?;`",
                IN_PLACE.join(", ")
            ),
        )
    })
}

/// Reading a value out of the graph (or cutting it) makes the twin's meta-gradient
/// silently miss that path, unlike the ordinary form, which has no graph to miss.
fn leaves_graph(name: &syn::Ident, tokens: &dyn quote::ToTokens) -> Option<syn::Error> {
    LEAVES_GRAPH
        .contains(&name.to_string().as_str())
        .then(|| graph_exit(name, tokens))
}

fn graph_exit(name: &syn::Ident, tokens: &dyn quote::ToTokens) -> syn::Error {
    error(
        tokens,
        format!(
            "`{name}` leaves the graph, so the differentiable twin would not see this path; keep the computation on tensors and `Scalar`s (branch on flags, the step counter or comparisons such as `self.momentum != 0.0`)"
        ),
    )
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
