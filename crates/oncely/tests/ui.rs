//! Compile-pass and compile-fail tests for `#[oncely::handler]`.
//!
//! Re-bless the `.stderr` snapshots with `TRYBUILD=overwrite cargo test -p oncely --test ui`,
//! then read every changed snapshot.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("tests/ui/pass/*.rs");
    t.compile_fail("tests/ui/fail/*.rs");
}
