//! Keeps the documentation honest: every code block of `README.md` and `docs/**/*.md` is
//! compiled, run or checked against the code, in `cargo test` (so in CI).
//!
//! - `rust` blocks are doc tests: the build script includes each Markdown file as the doc of an
//!   item under `cfg(doctest)`. No block hides lines from the reader (`# `); blocks that need the
//!   broker are `no_run` (compiled, not run); `ignore` is not used. `docs/getting-started.md` is
//!   a crate instead, one file per block ([`page_crate`]), built and tested outside the workspace
//!   by `scripts/check-getting-started`.
//! - `sh` / `console` blocks: every command must exist (a workspace binary with that
//!   subcommand and those flags, checked through `--help`; a script; a `cargo` package or test
//!   target; or a tool on the allow-list), see `tests/code_blocks/shell.rs`.
//! - `toml` blocks parse as an oncely configuration (`oncely::config::Config`), or, when the
//!   first line is `# Cargo.toml`, as a manifest fragment whose dependencies exist in this
//!   workspace at the same versions.
//! - `sql` blocks run against the real tables in a fresh schema, inside a rolled-back
//!   transaction.
//! - Links to a test (`` [`name`](../tests/tests/x.rs) ``) must name a test of that file, and
//!   relative links must point at files that exist.
//!
//! The conventions are written down in `docs/decisions.md`.

pub mod markdown;
pub mod page_crate;

#[cfg(doctest)]
include!(concat!(env!("OUT_DIR"), "/docs.rs"));
