//! Compile-time behaviour of `#[differentiable_optimizer]`: every rejection has a case in
//! `tests/ui` with its expected diagnostic; `tests/run-pass` holds accepted corner cases.
//! Regenerate snapshots with `TRYBUILD=overwrite cargo test --test compiletest`.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/**/*.rs");
    t.pass("tests/run-pass/**/*.rs");
}
