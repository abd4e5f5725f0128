//! Writes `$OUT_DIR/docs.rs`: one item per Markdown file (README.md, docs/**/*.md) whose doc is
//! that file, so that rustdoc tests every Rust block in it. New files are picked up by themselves.
//! A page whose blocks are the files of a crate ([`PAGE_CRATES`]) is left out: its blocks are
//! not snippets but a crate, which `scripts/check-getting-started` builds and tests.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Pages whose code blocks are the files of one crate, checked as that crate.
const PAGE_CRATES: &[&str] = &["docs/getting-started.md"];

fn markdown_files(dir: &Path, into: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            markdown_files(&path, into);
        } else if path.extension().is_some_and(|e| e == "md") {
            into.push(path);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let root = manifest.join("../..");
    let root = root.canonicalize().unwrap_or(root);
    let docs = root.join("docs");
    println!("cargo:rerun-if-changed={}", docs.display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("README.md").display()
    );
    let mut files = vec![root.join("README.md")];
    markdown_files(&docs, &mut files);
    files.sort();
    let mut out = String::new();
    for file in &files {
        let relative = file.strip_prefix(&root).unwrap_or(file);
        if PAGE_CRATES.iter().any(|p| relative == Path::new(p)) {
            continue;
        }
        let ident: String = relative
            .display()
            .to_string()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let _ = writeln!(
            out,
            "#[doc = include_str!({:?})]\n#[allow(non_camel_case_types)]\npub struct {ident};",
            file.display().to_string()
        );
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default());
    if let Err(e) = std::fs::write(out_dir.join("docs.rs"), out) {
        panic!("cannot write docs.rs: {e}");
    }
}
