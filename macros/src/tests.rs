//! Snapshots of the real expansion, taken by calling the proc_macro2-level entry point.
//! The expected token strings live in `macros/snapshots/`; regenerate them with
//! `UPDATE_SNAPSHOTS=1 cargo test -p candle-higher-macros` and review the diff.

use proc_macro2::TokenStream;
use quote::quote;

fn expand(args: TokenStream, item: TokenStream) -> String {
    crate::expand::expand(args, item)
        .unwrap_or_else(syn::Error::into_compile_error)
        .to_string()
}

/// One token string per line break at `;`, `{` and `}` so that diffs stay readable.
fn lines(tokens: &str) -> String {
    let mut out = String::new();
    for c in tokens.chars() {
        out.push(c);
        if matches!(c, ';' | '{' | '}') {
            out.push('\n');
        }
    }
    out
}

fn snapshot(name: &str, actual: &str) {
    let path = format!("{}/snapshots/{name}.txt", env!("CARGO_MANIFEST_DIR"));
    let actual = lines(actual);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(format!("{}/snapshots", env!("CARGO_MANIFEST_DIR")))
            .expect("snapshot dir");
        std::fs::write(&path, &actual).expect("write snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("missing snapshot {path}; run with UPDATE_SNAPSHOTS=1"));
    assert_eq!(actual, expected, "expansion of {name} changed");
}

#[test]
fn lion_struct() {
    let out = expand(
        quote!(),
        quote! {
            pub struct Lion { pub lr: f64, pub betas: (f64, f64), pub weight_decay: f64 }
        },
    );
    snapshot("lion_struct", &out);
}

#[test]
fn lion_impl() {
    let out = expand(
        quote!(),
        quote! {
            impl Lion {
                fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
                    let exp_avg = state.get_or_insert_with("exp_avg", || p.zeros_like())?;
                    p.mul_(1.0 - self.lr * self.weight_decay)?;
                    let update = (exp_avg.mul(self.betas.0)? + grad.mul(1.0 - self.betas.0)?)?.sign()?;
                    p.sub_(&update.mul(self.lr)?)?;
                    exp_avg.mul_(self.betas.1)?.add_(&grad.mul(1.0 - self.betas.1)?)?;
                    Ok(())
                }
            }
        },
    );
    snapshot("lion_impl", &out);
}

#[test]
fn crate_argument_and_flags() {
    let out = expand(
        quote!(crate = crate),
        quote! {
            #[derive(Clone)]
            pub struct Sgd { pub lr: f64, pub nesterov: bool, pub warmup: u32 }
        },
    );
    snapshot("sgd_struct_in_runtime", &out);
}

/// Nothing is written back before the `return` or the shadowing `let`: the state local is
/// the entry.
#[test]
fn no_write_back_before_return_and_shadowing() {
    let out = expand(
        quote!(),
        quote! {
            impl Acc {
                fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
                    let total = state.get_or_insert_with("sum", || p.zeros_like())?;
                    total.add_(grad)?;
                    if self.skip {
                        return Ok(());
                    }
                    let total = total.mul(self.lr)?;
                    p.sub_(&total)?;
                    Ok(())
                }
            }
        },
    );
    snapshot("no_write_back", &out);
}

#[test]
fn errors_are_combined_and_items_still_emitted() {
    let out = expand(
        quote!(),
        quote! {
            pub struct Bad { pub lr: f32, pub names: Vec<String> }
        },
    );
    assert_eq!(out.matches("compile_error").count(), 2, "{out}");
    assert!(out.contains("pub struct Bad"), "{out}");
    assert!(out.contains("Hyperparameters for Bad"), "{out}");
}

#[test]
fn unparsable_arguments_are_an_error() {
    let out = expand(
        quote!(crate),
        quote!(
            pub struct S {
                pub lr: f64,
            }
        ),
    );
    assert!(out.contains("compile_error"), "{out}");
}

/// `f64::from` of a hyperparameter goes through the runtime's copy (which rejects a
/// `Scalar`), in the step and in `fn validate`; of anything else it is left alone.
#[test]
fn f64_from_of_a_hyperparameter_is_the_runtimes() {
    let out = expand(
        quote!(),
        quote! {
            impl Warm {
                fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
                    let n = self.n;
                    let k = 2u32;
                    p.sub_(&grad.mul(f64::from(n) * f64::from(k))?)?;
                    Ok(())
                }
                fn validate(&self) -> Result<()> {
                    let _ = f64::from(self.n);
                    Ok(())
                }
            }
        },
    );
    // Two forms, each with the step's call and validate's.
    assert_eq!(out.matches("__f64_from").count(), 4, "{out}");
    assert_eq!(out.matches("f64 :: from (k)").count(), 2, "{out}");
}

/// Tensors have no `-=`; the error names the in-place method with the user's operand.
#[test]
fn compound_assignment_on_the_parameter_is_an_error() {
    let out = expand(
        quote!(),
        quote! {
            impl Sgd {
                fn step(&self, p: &mut Tensor, grad: &Tensor, state: &mut State) -> Result<()> {
                    *p -= self.lr * grad;
                    {
                        // A local named like the parameter is another value.
                        let mut p = 1.0;
                        p += 1.0;
                    }
                    Ok(())
                }
            }
        },
    );
    assert_eq!(out.matches("compile_error").count(), 1, "{out}");
    assert!(out.contains("p.sub_("), "{out}");
}
