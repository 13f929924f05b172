//! The one body rewrite that makes one step body compile and behave the same for the
//! optimizer (`f64` hyperparameters) and for its twin (`Scalar` hyperparameters). It stops
//! at nested items.
//!
//! **By value.** `f64` is `Copy` and `Scalar` is not, so `self.lr * self.weight_decay`
//! would move out of `&self` in the twin. Every by-value use of a hyperparameter field, and
//! of a local computed from one or read from the state, becomes
//! `::core::clone::Clone::clone(&x)`: a copy for floats, an `Arc` clone for tensors, and
//! for a `StateTensor` another handle to the same entry (Python's `m2 = m`). Method
//! receivers, `&x`, and the left side of assignments are left alone.
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
pub(crate) fn body(step: &Step<'_>) -> Block {
    let mut block = step.func.block.clone();
    let names = by_value_names(&block, &step.state);
    ByValue { names }.visit_block_mut(&mut block);
    block
}

// ---------------------------------------------------------------- by value

/// Locals whose value may be a `Scalar` in the twin (computed from `self`, transitively)
/// or that were read from the state: the names whose by-value uses are cloned.
fn by_value_names(block: &Block, state: &Ident) -> BTreeSet<String> {
    derived_names(block, &|i| i == "self" || i == state)
}

/// Locals computed, transitively, from an identifier accepted by `root`. A reborrow
/// (`let st = &mut *state;`) is left out: it is not `Clone`, and only used as a receiver
/// or passed on.
pub(crate) fn derived_names(block: &Block, root: &dyn Fn(&Ident) -> bool) -> BTreeSet<String> {
    struct Taint<'a> {
        root: &'a dyn Fn(&Ident) -> bool,
        names: BTreeSet<String>,
    }
    impl<'ast> Visit<'ast> for Taint<'_> {
        fn visit_local(&mut self, local: &'ast syn::Local) {
            visit::visit_local(self, local);
            let tainted = local.init.as_ref().is_some_and(|init| {
                let expr = &init.expr;
                !matches!(ast::strip(expr), Expr::Reference(_))
                    && mentions(quote!(#expr).into_iter(), &|i| {
                        (self.root)(i) || self.names.contains(&i.to_string())
                    })
            });
            if tainted {
                self.names.extend(bound_names(&local.pat));
            }
        }
        fn visit_item(&mut self, _: &'ast syn::Item) {}
    }
    let mut taint = Taint {
        root,
        names: BTreeSet::new(),
    };
    taint.visit_block(block);
    taint.names
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

struct ByValue {
    names: BTreeSet<String>,
}

impl ByValue {
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

impl VisitMut for ByValue {
    fn visit_expr_mut(&mut self, e: &mut Expr) {
        if self.is_target(e) {
            *e = clone_of(e);
            return;
        }
        match e {
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
            Expr::Macro(_) => {}
            _ => visit_mut::visit_expr_mut(self, e),
        }
    }

    fn visit_item_mut(&mut self, _: &mut syn::Item) {}
}

/// `::core::clone::Clone::clone(&e)`, spanned at `e`.
fn clone_of(e: &Expr) -> Expr {
    let span = e.span();
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
