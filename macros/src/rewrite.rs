//! The body rewrites that make one step body compile and behave the same for the optimizer
//! (`f64` hyperparameters) and for its twin (`Scalar` hyperparameters). Both `VisitMut`
//! passes stop at nested items, and the write-back pass at closures.
//!
//! 1. **By value.** `f64` is `Copy` and `Scalar` is not, so `self.lr * self.weight_decay`
//!    would move out of `&self` in the twin. Every by-value use of a hyperparameter field,
//!    of a local computed from one, and of a state alias becomes
//!    `::core::clone::Clone::clone(&x)`: a copy for floats, an `Arc` clone for tensors.
//!    Method receivers, `&x`, and the left side of assignments are left alone.
//! 2. **Write-back.** `let buf = state.get_or_insert_with("k", ..)?;` is a new handle:
//!    in-place updates rebind `buf` and not the entry. When `buf` is updated in place,
//!    it becomes `let mut buf`, and `state.set("k", buf)` is inserted at the end of the
//!    block that declared it, before every `return` in its scope, and before a `let` that
//!    shadows it (higher's recipe `state['k'] = p = p.add(..)`).

use std::collections::BTreeSet;

use proc_macro2::{Ident, Span, TokenTree};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::visit::{self, Visit};
use syn::visit_mut::{self, VisitMut};
use syn::{parse_quote, Block, Expr, Pat, PatIdent, Stmt};

use crate::ast::{self, Step};
use crate::valid::bound_names;

/// The rewritten step body, the same for both forms.
pub(crate) fn body(step: &Step<'_>) -> Block {
    let mut block = step.func.block.clone();
    let names = by_value_names(&block, &step.state);
    ByValue { names }.visit_block_mut(&mut block);
    let mut mutated = Mutated(BTreeSet::new());
    mutated.visit_block(&block);
    WriteBack {
        state: &step.state,
        mutated: mutated.0,
        active: Vec::new(),
    }
    .visit_block_mut(&mut block);
    block
}

// ---------------------------------------------------------------- by value

/// Locals whose value may be a `Scalar` in the twin (computed from `self`, transitively)
/// and state aliases: the names whose by-value uses are cloned.
fn by_value_names(block: &Block, state: &Ident) -> BTreeSet<String> {
    struct Taint<'a> {
        state: &'a Ident,
        names: BTreeSet<String>,
    }
    impl<'ast> Visit<'ast> for Taint<'_> {
        fn visit_local(&mut self, local: &'ast syn::Local) {
            visit::visit_local(self, local);
            let tainted = ast::alias_binding(local, self.state).is_some()
                || local.init.as_ref().is_some_and(|init| {
                    let expr = &init.expr;
                    mentions(quote!(#expr).into_iter(), &|i| {
                        i == "self" || self.names.contains(&i.to_string())
                    })
                });
            if tainted {
                self.names.extend(bound_names(&local.pat));
            }
        }
        fn visit_item(&mut self, _: &'ast syn::Item) {}
    }
    let mut taint = Taint {
        state,
        names: BTreeSet::new(),
    };
    taint.visit_block(block);
    taint.names
}

/// Whether a token stream holds an identifier accepted by `hit`.
fn mentions(tokens: impl Iterator<Item = TokenTree>, hit: &dyn Fn(&Ident) -> bool) -> bool {
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

// ---------------------------------------------------------------- write-back

/// Names updated in place: receivers of in-place methods, assigned places, `&mut x`.
struct Mutated(BTreeSet<String>);

impl<'ast> Visit<'ast> for Mutated {
    fn visit_expr_method_call(&mut self, m: &'ast syn::ExprMethodCall) {
        if ast::is_in_place(&m.method) {
            self.0
                .extend(ast::root(&m.receiver).map(ToString::to_string));
        }
        visit::visit_expr_method_call(self, m);
    }
    fn visit_expr_assign(&mut self, a: &'ast syn::ExprAssign) {
        self.0.extend(ast::root(&a.left).map(ToString::to_string));
        visit::visit_expr_assign(self, a);
    }
    fn visit_expr_binary(&mut self, b: &'ast syn::ExprBinary) {
        if is_compound(&b.op) {
            self.0.extend(ast::root(&b.left).map(ToString::to_string));
        }
        visit::visit_expr_binary(self, b);
    }
    fn visit_expr_reference(&mut self, r: &'ast syn::ExprReference) {
        if r.mutability.is_some() {
            self.0.extend(ast::root(&r.expr).map(ToString::to_string));
        }
        visit::visit_expr_reference(self, r);
    }
    fn visit_item(&mut self, _: &'ast syn::Item) {}
}

/// A local bound to a state entry and updated in place.
#[derive(Clone)]
struct Alias {
    name: Ident,
    key: Expr,
}

struct WriteBack<'a> {
    state: &'a Ident,
    mutated: BTreeSet<String>,
    /// Aliases in scope, innermost last.
    active: Vec<Alias>,
}

impl WriteBack<'_> {
    /// `state.set(key, name);` (or `name.clone()` where `name` is still used after).
    fn set(&self, alias: &Alias, clone: bool) -> Stmt {
        let (state, key, name) = (self.state, &alias.key, &alias.name);
        let span = name.span();
        let value = if clone {
            quote_spanned!(span=> ::core::clone::Clone::clone(&#name))
        } else {
            quote!(#name)
        };
        parse_quote!(#state.set(#key, #value);)
    }

    fn sets(&self, aliases: &[Alias]) -> Vec<Stmt> {
        aliases.iter().map(|a| self.set(a, true)).collect()
    }
}

/// `x` of `let x = ..` / `let x: T = ..`, mutably.
fn pat_ident_mut(pat: &mut Pat) -> Option<&mut PatIdent> {
    match pat {
        Pat::Ident(p) => Some(p),
        Pat::Type(t) => pat_ident_mut(&mut t.pat),
        _ => None,
    }
}

fn is_return(stmt: &Stmt) -> bool {
    matches!(stmt, Stmt::Expr(Expr::Return(_), _))
}

/// Block-like expressions that have type `()` whatever their body: they can stand as a
/// statement in the middle of a block.
fn is_unit_statement(e: &Expr) -> bool {
    match e {
        Expr::If(i) => i.else_branch.is_none(),
        Expr::While(_) | Expr::ForLoop(_) => true,
        _ => false,
    }
}

impl VisitMut for WriteBack<'_> {
    fn visit_block_mut(&mut self, block: &mut Block) {
        let saved = self.active.clone();
        let mut own: Vec<Alias> = Vec::new();
        let mut out: Vec<Stmt> = Vec::with_capacity(block.stmts.len() + 2);
        let mut tail: Option<Expr> = None;
        let count = block.stmts.len();
        for (index, mut stmt) in std::mem::take(&mut block.stmts).into_iter().enumerate() {
            match &mut stmt {
                Stmt::Local(local) => {
                    if let Some(init) = &mut local.init {
                        self.visit_expr_mut(&mut init.expr);
                        if let Some((_, diverge)) = &mut init.diverge {
                            self.visit_expr_mut(diverge);
                        }
                    }
                    // A binding that shadows an alias: write the alias back first.
                    for name in bound_names(&local.pat) {
                        if let Some(at) = self.active.iter().rposition(|a| a.name == name) {
                            let alias = self.active.remove(at);
                            out.push(self.set(&alias, true));
                            own.retain(|a| a.name != name);
                        }
                    }
                    let alias = ast::alias_binding(local, self.state)
                        .filter(|(p, _)| self.mutated.contains(&p.ident.to_string()))
                        .map(|(p, key)| Alias {
                            name: p.ident.clone(),
                            key: key.clone(),
                        });
                    if let Some(alias) = alias {
                        if let Some(p) = pat_ident_mut(&mut local.pat) {
                            if p.mutability.is_none() {
                                p.mutability = Some(syn::Token![mut](p.ident.span()));
                                // `mutated` is by name: another binding of the name may be
                                // the one updated.
                                local.attrs.push(parse_quote!(#[allow(unused_mut)]));
                            }
                        }
                        self.active.push(alias.clone());
                        own.push(alias);
                    }
                    out.push(stmt);
                }
                Stmt::Expr(Expr::Return(r), _) => {
                    if let Some(value) = &mut r.expr {
                        self.visit_expr_mut(value);
                    }
                    out.extend(self.sets(&self.active));
                    out.push(stmt);
                }
                Stmt::Expr(e, None) if index + 1 == count => {
                    self.visit_expr_mut(e);
                    if let Stmt::Expr(e, None) = stmt {
                        tail = Some(e);
                    }
                }
                _ => {
                    self.visit_stmt_mut(&mut stmt);
                    out.push(stmt);
                }
            }
        }
        let diverges = tail.is_none() && out.last().is_some_and(is_return);
        let own_names = |e: &Expr| {
            mentions(quote!(#e).into_iter(), &|i| {
                own.iter().any(|a| a.name == *i)
            })
        };
        match tail {
            _ if own.is_empty() || diverges => out.extend(tail.map(|e| Stmt::Expr(e, None))),
            None => out.extend(own.iter().map(|a| self.set(a, false))),
            Some(e) if is_unit_statement(&e) => {
                out.push(Stmt::Expr(e, None));
                out.extend(own.iter().map(|a| self.set(a, false)));
            }
            Some(e) if own_names(&e) => {
                let value = Ident::new("__candle_higher_value", Span::mixed_site());
                out.push(parse_quote!(let #value = #e;));
                out.extend(own.iter().map(|a| self.set(a, false)));
                out.push(Stmt::Expr(parse_quote!(#value), None));
            }
            Some(e) => {
                out.extend(own.iter().map(|a| self.set(a, false)));
                out.push(Stmt::Expr(e, None));
            }
        }
        block.stmts = out;
        self.active = saved;
    }

    fn visit_expr_mut(&mut self, e: &mut Expr) {
        match e {
            // A `return` nested in an expression (a statement `return` is handled by the
            // block): write the aliases back first.
            Expr::Return(r) => {
                if let Some(value) = &mut r.expr {
                    self.visit_expr_mut(value);
                }
                if !self.active.is_empty() {
                    let sets = self.sets(&self.active);
                    *e = parse_quote!({ #(#sets)* #r });
                }
            }
            // A `return` in a closure leaves the closure, not the step.
            Expr::Closure(_) => {}
            _ => visit_mut::visit_expr_mut(self, e),
        }
    }

    fn visit_item_mut(&mut self, _: &mut syn::Item) {}
}
