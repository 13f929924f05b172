//! The attribute's arguments: `crate = path` (serde style), for code inside the runtime.

use proc_macro2::TokenStream;
use syn::parse::Parser;
use syn::{parse_quote, LitStr, Path};

/// Parsed `#[differentiable_optimizer(..)]` arguments.
pub(crate) struct Args {
    /// Where generated code finds `__private`: `::candle_higher` unless overridden.
    pub(crate) krate: Path,
}

pub(crate) fn parse(args: TokenStream) -> syn::Result<Args> {
    let mut krate: Option<Path> = None;
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("crate") {
            if krate.is_some() {
                return Err(meta.error("duplicate `crate` argument"));
            }
            let value = meta.value()?;
            // `crate = crate` or `crate = "crate"`, as serde accepts both.
            krate = Some(if value.peek(LitStr) {
                value.parse::<LitStr>()?.parse()?
            } else {
                Path::parse_mod_style(value)?
            });
            Ok(())
        } else {
            Err(meta.error(
                "unknown argument; the only argument is `crate = path` (e.g. `crate = crate` inside the runtime)",
            ))
        }
    });
    parser.parse2(args)?;
    Ok(Args {
        krate: krate.unwrap_or_else(|| parse_quote!(::candle_higher)),
    })
}
