//! The body rewrite that makes one step body (and `fn validate`) compile and behave the
//! same for the optimizer (`f64` hyperparameters) and for its twin (`Scalar`
//! hyperparameters). It stops at nested items.
//!
//! **By value.** `f64` is `Copy` and `Scalar` is not, so `self.lr * self.weight_decay`
//! would move out of `&self` in the twin. Every by-value use of a hyperparameter field
//! becomes `self.lr.clone()`, and of a local whose value flows from one or that holds a
//! state entry (`state.get(..)?`, ...) `::core::clone::Clone::clone(&x)`: a copy for
//! floats, an `Arc` clone for tensors, and for a `StateTensor` another handle to the same
//! entry (Python's `m2 = m`). That includes `*x` for `let x = &self.lr;`, the receiver of
//! `self.lr.into()`, and the arguments of `vec![..]` and `dbg!(..)`. Other method
//! receivers, `&x`, and the left side of assignments are left alone, and so are locals
//! whose clone would not be the value moved (`&mut` borrows, the state itself).
//!
//! **`f64::from`.** `f64::from(x)` with `x` from a hyperparameter calls the runtime's
//! `Scalar::__f64_from`, which converts what `f64::from` converts (the ordinary form's
//! `f64`, integer and `bool` flags) and fails for the twin's `Scalar` with a message at the
//! user's call. Only the types tell `f64::from(self.n)` (a flag) from `f64::from(self.lr)`.
//! `x as f64` and `x as f32` call `Scalar::__as_f64` and `__as_f32` in the same way, which
//! also cast the integer flags `f64::from` does not take (`u64`, `usize`, ..).
//!
//! Nothing is written back to the state: state tensors alias their entries (see
//! `StateTensor` in the runtime), so an in-place update through any name is the update.

use std::collections::BTreeSet;

use proc_macro2::{Ident, TokenTree};
use quote::quote;
use syn::spanned::Spanned;
use syn::visit::{self, Visit};
use syn::visit_mut::{self, VisitMut};
use syn::{Block, Expr};

use crate::ast::{self, Step};
use crate::valid::bound_names;

/// The rewritten step body, the same for both forms.
pub(crate) fn body(step: &Step<'_>, krate: &syn::Path) -> Block {
    rewritten(&step.func.block, Some(&step.state), krate)
}

/// `fn validate` with the same rewrites as the step (it has no state), so arithmetic on
/// hyperparameters and `f64::from` mean there what they mean in the step.
pub(crate) fn validate(func: &syn::ImplItemFn, krate: &syn::Path) -> syn::ImplItemFn {
    let mut func = func.clone();
    func.block = rewritten(&func.block, None, krate);
    func
}

fn rewritten(block: &Block, state: Option<&Ident>, krate: &syn::Path) -> Block {
    let mut block = block.clone();
    let names = derived_names(&block, state);
    let hyper = derived_names(&block, None);
    ByValue {
        names,
        hyper,
        krate,
    }
    .visit_block_mut(&mut block);
    block
}

// ---------------------------------------------------------------- by value

/// The state methods whose value (after `?`, `unwrap`, `expect` or `ok`) is an entry: a
/// `StateTensor` handle or a `Scalar`, both `Clone` with a clone that behaves as the
/// value moved (another handle to the same entry, the same number).
const STATE_GETTERS: &[&str] = &[
    "get",
    "get_or_insert_with",
    "scalar",
    "scalar_or_insert_with",
    "tensor",
];

/// Locals whose value flows, transitively, from a hyperparameter (`self`) or, with
/// `state`, from a state entry read by one of [`STATE_GETTERS`]. Only the value counts: a
/// name used in a condition (`if self.flag { Some(p) } else { None }`) does not make the
/// local a hyperparameter. Left out, because they are not `Clone` or their clone is not
/// the value moved: `&mut` borrows (`let st = &mut *state;`), the state itself and what
/// its other methods return (`std::mem::take(state)` is a `State`, whose clone is a
/// snapshot; `state.get(..)` without `?` is a `Result`; `state.entries()` an iterator).
pub(crate) fn derived_names(block: &Block, state: Option<&Ident>) -> BTreeSet<String> {
    struct Taint<'a> {
        state: Option<&'a Ident>,
        names: BTreeSet<String>,
    }
    impl<'ast> Visit<'ast> for Taint<'_> {
        fn visit_local(&mut self, local: &'ast syn::Local) {
            visit::visit_local(self, local);
            let tainted = local.init.as_ref().is_some_and(|init| {
                Flow {
                    state: self.state,
                    names: &self.names,
                }
                .value(&init.expr)
            });
            if tainted {
                self.names.extend(bound_names(&local.pat));
            }
        }
        // `for lr in [self.lr, ..]`, `match self.betas { (b1, _) => .. }`, `if let`: the
        // pattern's names hold parts of the value.
        fn visit_expr_for_loop(&mut self, f: &'ast syn::ExprForLoop) {
            self.bind(&f.pat, &f.expr);
            visit::visit_expr_for_loop(self, f);
        }
        fn visit_expr_match(&mut self, m: &'ast syn::ExprMatch) {
            for arm in &m.arms {
                self.bind(&arm.pat, &m.expr);
            }
            visit::visit_expr_match(self, m);
        }
        fn visit_expr_let(&mut self, l: &'ast syn::ExprLet) {
            self.bind(&l.pat, &l.expr);
            visit::visit_expr_let(self, l);
        }
        fn visit_item(&mut self, _: &'ast syn::Item) {}
    }
    impl Taint<'_> {
        fn bind(&mut self, pat: &syn::Pat, value: &Expr) {
            let flow = Flow {
                state: self.state,
                names: &self.names,
            };
            if flow.value(value) {
                self.names.extend(bound_names(pat));
            }
        }
    }
    let mut taint = Taint {
        state,
        names: BTreeSet::new(),
    };
    taint.visit_block(block);
    taint.names
}

/// Whether the value of `e` flows from a hyperparameter (`self`, or a local in `hyper`);
/// a hyperparameter only in a condition does not count.
pub(crate) fn flows_from_hyperparameter(e: &Expr, hyper: &BTreeSet<String>) -> bool {
    Flow {
        state: None,
        names: hyper,
    }
    .value(e)
}

/// Whether an expression's value flows from `self`, a tainted name or a state entry.
struct Flow<'a> {
    state: Option<&'a Ident>,
    names: &'a BTreeSet<String>,
}

impl Flow<'_> {
    fn value(&self, e: &Expr) -> bool {
        use syn::BinOp::{And, Eq, Ge, Gt, Le, Lt, Ne, Or};
        match ast::strip(e) {
            Expr::Path(p) => p.path.get_ident().is_some_and(|i| {
                p.qself.is_none() && (i == "self" || self.names.contains(&i.to_string()))
            }),
            Expr::Field(f) => self.value(&f.base),
            Expr::Index(i) => self.value(&i.expr),
            Expr::Unary(u) => self.value(&u.expr),
            // `self.n as f64`: a primitive in both forms (a `Scalar` casts to none).
            Expr::Cast(c) if is_primitive(&c.ty, PRIMITIVES) => false,
            Expr::Cast(c) => self.value(&c.expr),
            Expr::Try(t) => self.entry(&t.expr) || self.value(&t.expr),
            Expr::Reference(r) => r.mutability.is_none() && self.value(&r.expr),
            // Comparisons and logic give a `bool` in both forms.
            Expr::Binary(b)
                if matches!(
                    b.op,
                    Eq(_) | Ne(_) | Lt(_) | Le(_) | Gt(_) | Ge(_) | And(_) | Or(_)
                ) =>
            {
                false
            }
            Expr::Binary(b) => self.value(&b.left) || self.value(&b.right),
            Expr::MethodCall(m) => {
                let unwraps = ["unwrap", "expect", "ok"].iter().any(|u| m.method == u);
                if unwraps && self.entry(&m.receiver) {
                    return true;
                }
                // A getter's `Result` is the entry only after `?` or `unwrap`; `iter_mut()`
                // and friends give `&mut` borrows.
                if self.getter(m) || m.method.to_string().ends_with("_mut") {
                    return false;
                }
                self.value(&m.receiver) || m.args.iter().any(|a| self.value(a))
            }
            // `f64::from(self.n)`: a primitive in both forms (`Scalar` converts to none).
            Expr::Call(c) if primitive_conversion(&c.func) => false,
            Expr::Call(c) => c.args.iter().any(|a| self.value(a)),
            Expr::If(i) => {
                self.tail(&i.then_branch)
                    || i.else_branch.as_ref().is_some_and(|(_, e)| self.value(e))
            }
            Expr::Match(m) => m.arms.iter().any(|a| self.value(&a.body)),
            Expr::Block(b) if b.label.is_none() => self.tail(&b.block),
            Expr::Unsafe(b) => self.tail(&b.block),
            Expr::Tuple(t) => t.elems.iter().any(|e| self.value(e)),
            Expr::Array(a) => a.elems.iter().any(|e| self.value(e)),
            Expr::Repeat(r) => self.value(&r.expr),
            Expr::Struct(s) => s.fields.iter().any(|f| self.value(&f.expr)),
            Expr::Range(r) => [&r.start, &r.end]
                .into_iter()
                .flatten()
                .any(|e| self.value(e)),
            Expr::Macro(m) => macro_exprs(&m.mac).map_or_else(
                || self.mentions(&m.mac.tokens),
                |es| es.iter().any(|e| self.value(e)),
            ),
            Expr::Lit(_)
            | Expr::Let(_)
            | Expr::Assign(_)
            | Expr::Closure(_)
            | Expr::ForLoop(_)
            | Expr::While(_) => false,
            // `loop { break x }`, labeled blocks and anything else: by the names it mentions.
            other => self.mentions(&quote!(#other)),
        }
    }

    /// The value of a block: its tail expression.
    fn tail(&self, block: &Block) -> bool {
        matches!(block.stmts.last(), Some(syn::Stmt::Expr(e, None)) if self.value(e))
    }

    fn mentions(&self, tokens: &proc_macro2::TokenStream) -> bool {
        mentions(tokens.clone().into_iter(), &|i| {
            i == "self" || self.names.contains(&i.to_string())
        })
    }

    /// `state.get(..)` and the other getters, on the state.
    fn getter(&self, m: &syn::ExprMethodCall) -> bool {
        let on_state = self
            .state
            .is_some_and(|s| ast::path_ident(&m.receiver).is_some_and(|r| r == s));
        on_state && STATE_GETTERS.iter().any(|g| m.method == g)
    }

    /// A getter call, whose `?` or `unwrap` is an entry.
    fn entry(&self, e: &Expr) -> bool {
        matches!(ast::strip(e), Expr::MethodCall(m) if self.getter(m))
    }
}

/// The primitive numeric types.
const PRIMITIVES: &[&str] = &[
    "f32", "f64", "i8", "i16", "i32", "i64", "i128", "isize", "u8", "u16", "u32", "u64", "u128",
    "usize",
];

/// Whether `ty` is one of the primitive types `names`.
fn is_primitive(ty: &syn::Type, names: &[&str]) -> bool {
    matches!(ty, syn::Type::Path(p)
        if p.qself.is_none() && names.iter().any(|n| p.path.is_ident(n)))
}

/// `f64::from`, `i32::try_from` and the like.
fn primitive_conversion(func: &Expr) -> bool {
    let Expr::Path(p) = ast::strip(func) else {
        return false;
    };
    let segments: Vec<&Ident> = p.path.segments.iter().map(|s| &s.ident).collect();
    matches!(segments.as_slice(), [ty, f]
        if PRIMITIVES.iter().any(|t| *ty == t) && (*f == "from" || *f == "try_from"))
}

/// The expressions of `vec![a, b]`, `vec![x; n]`, `dbg!(a, b)` and other macros whose
/// input is a comma-separated list of expressions (`assert!`, `println!`, ...); `None`
/// when the input is something else.
pub(crate) fn macro_exprs(mac: &syn::Macro) -> Option<Vec<Expr>> {
    use syn::parse::Parser;
    let list = syn::punctuated::Punctuated::<Expr, syn::Token![,]>::parse_terminated;
    if let Ok(list) = list.parse2(mac.tokens.clone()) {
        return Some(list.into_iter().collect());
    }
    let repeat = |input: syn::parse::ParseStream<'_>| -> syn::Result<(Expr, Expr)> {
        let value = input.parse()?;
        input.parse::<syn::Token![;]>()?;
        Ok((value, input.parse()?))
    };
    repeat
        .parse2(mac.tokens.clone())
        .ok()
        .map(|(v, n)| vec![v, n])
}

/// Whether a token stream holds an identifier accepted by `hit`.
pub(crate) fn mentions(
    tokens: impl Iterator<Item = TokenTree>,
    hit: &dyn Fn(&Ident) -> bool,
) -> bool {
    let mut tokens = tokens;
    tokens.any(|t| match t {
        TokenTree::Ident(i) => hit(&i),
        TokenTree::Group(g) => mentions(g.stream().into_iter(), hit),
        _ => false,
    })
}

struct ByValue<'a> {
    /// Locals whose value may be a `Scalar` in the twin (computed from `self`,
    /// transitively) or that hold a state entry: the names whose by-value uses are cloned.
    names: BTreeSet<String>,
    /// Locals computed from a hyperparameter only.
    hyper: BTreeSet<String>,
    krate: &'a syn::Path,
}

impl ByValue<'_> {
    /// `x` for a listed name, or a field path rooted at `self` or at a listed name.
    fn is_target(&self, e: &Expr) -> bool {
        match e {
            Expr::Path(p) if p.qself.is_none() => p
                .path
                .get_ident()
                .is_some_and(|i| self.names.contains(&i.to_string())),
            Expr::Field(f) => {
                let mut base = &*f.base;
                while let Expr::Field(inner) = base {
                    base = &inner.base;
                }
                match base {
                    Expr::Path(p) if p.qself.is_none() => p
                        .path
                        .get_ident()
                        .is_some_and(|i| i == "self" || self.names.contains(&i.to_string())),
                    _ => false,
                }
            }
            _ => false,
        }
    }

    /// `x as f64` or `x as f32` with `x` from a hyperparameter.
    fn casts_hyperparameter_to_float(&self, c: &syn::ExprCast) -> bool {
        is_primitive(&c.ty, &["f32", "f64"]) && flows_from_hyperparameter(&c.expr, &self.hyper)
    }

    fn any_from_hyperparameter(
        &self,
        args: &syn::punctuated::Punctuated<Expr, syn::Token![,]>,
    ) -> bool {
        args.iter()
            .any(|a| flows_from_hyperparameter(a, &self.hyper))
    }

    /// A place (receiver, borrowed, assigned): not cloned itself, its sub-expressions are
    /// visited.
    fn place(&mut self, e: &mut Expr) {
        match e {
            Expr::Path(_) => {}
            Expr::Field(f) => self.place(&mut f.base),
            Expr::Index(i) => {
                self.place(&mut i.expr);
                self.visit_expr_mut(&mut i.index);
            }
            Expr::Paren(p) => self.place(&mut p.expr),
            Expr::Unary(u) if matches!(u.op, syn::UnOp::Deref(_)) => self.place(&mut u.expr),
            _ => self.visit_expr_mut(e),
        }
    }
}

impl VisitMut for ByValue<'_> {
    fn visit_expr_mut(&mut self, e: &mut Expr) {
        if self.is_target(e) {
            *e = clone_of(e);
            return;
        }
        match e {
            // `*lr` for `let lr = &self.lr;` (or `let Self { lr, .. } = self;`): a copy of
            // an `f64`, a clone of a `Scalar`.
            Expr::Unary(u) if matches!(u.op, syn::UnOp::Deref(_)) && self.is_target(&u.expr) => {
                *e = clone_of(e);
            }
            // `self.lr.into()` takes its receiver by value.
            Expr::MethodCall(m)
                if (m.method == "into" || m.method == "try_into")
                    && self.is_target(&m.receiver) =>
            {
                *m.receiver = clone_of(&m.receiver);
            }
            Expr::MethodCall(m) => {
                self.place(&mut m.receiver);
                for arg in &mut m.args {
                    self.visit_expr_mut(arg);
                }
            }
            Expr::Reference(r) => self.place(&mut r.expr),
            Expr::Assign(a) => {
                self.place(&mut a.left);
                self.visit_expr_mut(&mut a.right);
            }
            Expr::Binary(b) if is_compound(&b.op) => {
                self.place(&mut b.left);
                self.visit_expr_mut(&mut b.right);
            }
            Expr::Field(_) | Expr::Index(_) => self.place(e),
            // `f64::from(self.lr)`: an identity on the ordinary form's `f64`, but no
            // conversion exists for the twin's `Scalar` (it would cut a tensor out of the
            // graph). The runtime's copy of `f64::from` converts what `f64::from`
            // converts and says, at the user's call, what to write for a `Scalar`.
            Expr::Call(c) if is_f64_from(&c.func) && self.any_from_hyperparameter(&c.args) => {
                // Every token at the user's `f64::from`, so rustc's "required by a bound
                // introduced by this call" points there and not at the attribute.
                let span = c.func.span();
                let krate = self.krate;
                let krate = respanned(quote!(#krate), span);
                *c.func = syn::parse_quote_spanned!(span=> #krate::__private::Scalar::__f64_from);
                visit_mut::visit_expr_call_mut(self, c);
            }
            // `self.n as f64`: the same trick as `f64::from`, so that integer flags of any
            // width cast in both forms and a float hyperparameter fails in the twin.
            Expr::Cast(c) if self.casts_hyperparameter_to_float(c) => {
                self.visit_expr_mut(&mut c.expr);
                let span = c.span();
                let krate = self.krate;
                let krate = respanned(quote!(#krate), span);
                let cast = if is_primitive(&c.ty, &["f32"]) {
                    quote::format_ident!("__as_f32", span = span)
                } else {
                    quote::format_ident!("__as_f64", span = span)
                };
                let operand = &c.expr;
                *e = syn::parse_quote_spanned!(span=> #krate::__private::Scalar::#cast(#operand));
            }
            _ => visit_mut::visit_expr_mut(self, e),
        }
    }

    /// `vec![self.lr, ..]` and `dbg!(..)` move their arguments: their expressions are
    /// rewritten too. Other macros are left alone (the formatting ones borrow).
    fn visit_macro_mut(&mut self, mac: &mut syn::Macro) {
        let moves = mac
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "vec" || s.ident == "dbg");
        if !moves {
            return;
        }
        let repeat = mac
            .tokens
            .clone()
            .into_iter()
            .any(|t| matches!(&t, TokenTree::Punct(p) if p.as_char() == ';'));
        let Some(mut exprs) = macro_exprs(mac) else {
            return;
        };
        for e in &mut exprs {
            self.visit_expr_mut(e);
        }
        mac.tokens = if repeat && exprs.len() == 2 {
            let (value, n) = (&exprs[0], &exprs[1]);
            quote!(#value; #n)
        } else {
            quote!(#(#exprs),*)
        };
    }

    fn visit_item_mut(&mut self, _: &mut syn::Item) {}
}

/// `::core::clone::Clone::clone(&e)`, spanned at `e`; `self.lr.clone()` for a field of
/// `self` (an `f64` or a `Scalar`, neither with an inherent `clone`), so that a type error
/// on it (a helper that takes `f64`) names the types and not `Clone::clone`'s reference.
fn clone_of(e: &Expr) -> Expr {
    let span = e.span();
    if let Expr::Field(f) = e {
        if ast::root(e).is_some_and(|r| r == "self") {
            // Spanned at the field name, so the call covers `self.lr` in messages.
            let span = f.member.span();
            return syn::parse_quote_spanned!(span=> #e.clone());
        }
    }
    let func: Expr = syn::parse_quote_spanned!(span=> ::core::clone::Clone::clone);
    let arg = Expr::Reference(syn::ExprReference {
        attrs: Vec::new(),
        and_token: syn::Token![&](span),
        mutability: None,
        expr: Box::new(e.clone()),
    });
    Expr::Call(syn::ExprCall {
        attrs: Vec::new(),
        func: Box::new(func),
        paren_token: syn::token::Paren(span),
        args: std::iter::once(arg).collect(),
    })
}

/// The tokens with every span set to `span`.
fn respanned(
    tokens: proc_macro2::TokenStream,
    span: proc_macro2::Span,
) -> proc_macro2::TokenStream {
    tokens
        .into_iter()
        .map(|mut t| {
            if let TokenTree::Group(g) = &t {
                let mut group = proc_macro2::Group::new(g.delimiter(), respanned(g.stream(), span));
                group.set_span(span);
                t = TokenTree::Group(group);
            } else {
                t.set_span(span);
            }
            t
        })
        .collect()
}

/// `f64::from` (also as `core::primitive::f64::from` or `std::primitive::f64::from`).
fn is_f64_from(func: &Expr) -> bool {
    let Expr::Path(p) = ast::strip(func) else {
        return false;
    };
    let segments: Vec<&Ident> = p.path.segments.iter().map(|s| &s.ident).collect();
    p.qself.is_none()
        && matches!(segments.as_slice(), [.., ty, f] if *ty == "f64" && *f == "from")
        && p.path.segments.iter().all(|s| s.arguments.is_none())
}

fn is_compound(op: &syn::BinOp) -> bool {
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
