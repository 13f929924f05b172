//! What the macro understands of its input: a hyperparameter struct, or the `impl` block
//! that defines the step. The nodes borrow the user's syntax, so errors keep its spans.

use proc_macro2::TokenStream;
use syn::{FnArg, Ident, ImplItem, ImplItemFn, Item, ItemImpl, ItemStruct, Pat, Type};

/// The annotated item.
pub(crate) enum Input {
    Struct(ItemStruct),
    Impl(ItemImpl),
}

pub(crate) fn parse(item: TokenStream) -> syn::Result<Input> {
    match syn::parse2::<Item>(item)? {
        Item::Struct(s) => Ok(Input::Struct(s)),
        Item::Impl(i) => Ok(Input::Impl(i)),
        other => Err(syn::Error::new_spanned(
            other,
            "#[differentiable_optimizer] goes on the hyperparameter struct and on the `impl` block that defines `fn step`",
        )),
    }
}

/// How a hyperparameter field becomes a twin field.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldKind {
    /// `f64`: a `Scalar` in the twin, overridable by a tensor.
    Float,
    /// `(f64, .., f64)` of this many components: a tuple of `Scalar`s.
    FloatTuple(usize),
    /// `bool` or an integer: copied as is, not overridable.
    Flag,
    /// Anything else: rejected.
    Unsupported,
}

/// One field of the hyperparameter struct.
pub(crate) struct Field<'a> {
    pub(crate) field: &'a syn::Field,
    pub(crate) ident: &'a Ident,
    pub(crate) kind: FieldKind,
}

/// The named fields of the struct, classified; `None` when it has no named fields.
pub(crate) fn fields(item: &ItemStruct) -> Option<Vec<Field<'_>>> {
    let syn::Fields::Named(named) = &item.fields else {
        return None;
    };
    Some(
        named
            .named
            .iter()
            .filter_map(|field| {
                field.ident.as_ref().map(|ident| Field {
                    field,
                    ident,
                    kind: kind(&field.ty),
                })
            })
            .collect(),
    )
}

fn is_float(ty: &Type) -> bool {
    matches!(ty, Type::Path(p) if p.qself.is_none() && p.path.is_ident("f64"))
}

fn kind(ty: &Type) -> FieldKind {
    const FLAGS: &[&str] = &[
        "bool", "u8", "u16", "u32", "u64", "usize", "i8", "i16", "i32", "i64", "isize",
    ];
    match ty {
        _ if is_float(ty) => FieldKind::Float,
        Type::Tuple(t) if !t.elems.is_empty() && t.elems.iter().all(is_float) => {
            FieldKind::FloatTuple(t.elems.len())
        }
        Type::Path(p) if p.qself.is_none() && FLAGS.iter().any(|f| p.path.is_ident(f)) => {
            FieldKind::Flag
        }
        Type::Group(g) => kind(&g.elem),
        Type::Paren(p) => kind(&p.elem),
        _ => FieldKind::Unsupported,
    }
}

/// The step function of an `impl` block and the names the user gave its parameters.
pub(crate) struct Step<'a> {
    pub(crate) func: &'a ImplItemFn,
    pub(crate) param: Ident,
    pub(crate) grad: Ident,
    pub(crate) state: Ident,
}

/// The `fn step` item of the block, if any.
pub(crate) fn step_fn(item: &ItemImpl) -> Option<&ImplItemFn> {
    item.items.iter().find_map(|i| match i {
        ImplItem::Fn(f) if f.sig.ident == "step" => Some(f),
        _ => None,
    })
}

/// The parameter names of `fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State)`,
/// when the signature has that shape (checked in full by `valid::step_signature`).
pub(crate) fn step<'a>(func: &'a ImplItemFn) -> Option<Step<'a>> {
    let mut names = func.sig.inputs.iter().skip(1).map(|arg| match arg {
        FnArg::Typed(t) => match &*t.pat {
            Pat::Ident(p) => Some(p.ident.clone()),
            _ => None,
        },
        FnArg::Receiver(_) => None,
    });
    let (param, grad, state) = (names.next()??, names.next()??, names.next()??);
    Some(Step {
        func,
        param,
        grad,
        state,
    })
}

/// The optional `fn validate(&self) -> Result<()>` beside the step: the hyperparameter
/// check, emitted unchanged for both forms.
pub(crate) fn validate_fn(item: &ItemImpl) -> Option<&ImplItemFn> {
    item.items.iter().find_map(|i| match i {
        ImplItem::Fn(f) if f.sig.ident == "validate" => Some(f),
        _ => None,
    })
}

/// The block without its first `fn validate`, for the rules about what else it may hold.
pub(crate) fn without_validate(item: &ItemImpl) -> ItemImpl {
    let mut copy = item.clone();
    if let Some(at) = copy
        .items
        .iter()
        .position(|i| matches!(i, ImplItem::Fn(f) if f.sig.ident == "validate"))
    {
        copy.items.remove(at);
    }
    copy
}

/// `fn validate` implements `OptimizerStep::validate` for both forms, so it must have
/// exactly that signature; the error shows it.
pub(crate) fn validate_signature(func: &ImplItemFn) -> syn::Result<()> {
    let sig = &func.sig;
    let receiver_only = sig.inputs.len() == 1
        && matches!(sig.inputs.first(), Some(FnArg::Receiver(r))
            if r.reference.is_some() && r.mutability.is_none() && r.colon_token.is_none());
    let returns_result = matches!(&sig.output, syn::ReturnType::Type(_, ty)
        if matches!(&**ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Result")));
    let ok = matches!(func.vis, syn::Visibility::Inherited)
        && sig.constness.is_none()
        && sig.asyncness.is_none()
        && sig.unsafety.is_none()
        && sig.abi.is_none()
        && sig.variadic.is_none()
        && sig.generics.params.is_empty()
        && sig.generics.where_clause.is_none()
        && receiver_only
        && returns_result;
    if ok {
        Ok(())
    } else {
        Err(syn::Error::new_spanned(
            sig,
            "unsupported validate signature; expected `fn validate(&self) -> Result<()>`",
        ))
    }
}

/// The twin's name: `Lion` -> `LionTwin`, with the user's span.
pub(crate) fn twin_ident(ident: &Ident) -> Ident {
    Ident::new(&format!("{ident}Twin"), ident.span())
}

/// The optimizer's name in `impl Lion { .. }`.
pub(crate) fn self_ident(item: &ItemImpl) -> Option<&Ident> {
    match &*item.self_ty {
        Type::Path(p) if p.qself.is_none() && p.path.segments.len() == 1 => {
            Some(&p.path.segments[0].ident)
        }
        _ => None,
    }
}

/// `x` for the expression `x` (a local or parameter name).
pub(crate) fn path_ident(expr: &syn::Expr) -> Option<&Ident> {
    match strip(expr) {
        syn::Expr::Path(p) if p.qself.is_none() => p.path.get_ident(),
        _ => None,
    }
}

/// The expression inside parentheses and invisible groups.
pub(crate) fn strip(mut expr: &syn::Expr) -> &syn::Expr {
    loop {
        match expr {
            syn::Expr::Paren(p) => expr = &p.expr,
            syn::Expr::Group(g) => expr = &g.expr,
            _ => return expr,
        }
    }
}

/// The variable a place expression updates: `self` for `self.betas.0`, `exp_avg` for
/// `exp_avg.mul_(..)?` (through in-place calls, which return their receiver).
pub(crate) fn root(expr: &syn::Expr) -> Option<&Ident> {
    match strip(expr) {
        syn::Expr::Path(p) if p.qself.is_none() => p.path.get_ident(),
        syn::Expr::Field(f) => root(&f.base),
        syn::Expr::Index(i) => root(&i.expr),
        syn::Expr::Unary(u) if matches!(u.op, syn::UnOp::Deref(_)) => root(&u.expr),
        syn::Expr::Reference(r) => root(&r.expr),
        syn::Expr::Try(t) => root(&t.expr),
        syn::Expr::MethodCall(m) if is_in_place(&m.method) => root(&m.receiver),
        _ => None,
    }
}

/// Whether a method name is in-place by torch's convention (a trailing underscore).
pub(crate) fn is_in_place(method: &Ident) -> bool {
    let name = method.to_string();
    name.len() > 1 && name.ends_with('_')
}
