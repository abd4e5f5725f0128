//! `page-crate PAGE DIR`: writes the crate whose files are the code blocks of `PAGE` (see
//! `oncely_docs_check::page_crate`) into `DIR`, with its `oncely` dependency pointing at this
//! checkout and this workspace's `Cargo.lock`, so that it builds with the versions oncely is
//! tested with. `scripts/check-getting-started` builds and tests what it writes.

use oncely_docs_check::markdown::blocks;
use oncely_docs_check::page_crate::{files, point_at_oncely};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn write(root: &Path, page: &Path, dir: &Path) -> Result<usize, String> {
    let text = std::fs::read_to_string(page)
        .map_err(|e| format!("cannot read {}: {e}", page.display()))?;
    let files = files(&blocks(&page.display().to_string(), &text)).map_err(|p| p.join("\n"))?;
    let oncely = root.join("crates/oncely");
    for file in &files {
        let target = dir.join(&file.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let contents = if file.path == "Cargo.toml" {
            point_at_oncely(&file.text, &oncely.display().to_string())
                .map_err(|e| format!("{}: {e}", file.at))?
        } else {
            file.text.clone()
        };
        std::fs::write(&target, contents)
            .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
    }
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock"))
        .map_err(|e| format!("cannot copy Cargo.lock: {e}"))?;
    Ok(files.len())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [page, dir] = args.as_slice() else {
        eprintln!("usage: page-crate PAGE DIR");
        return ExitCode::from(2);
    };
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root.canonicalize().unwrap_or(root);
    match write(&root, Path::new(page), Path::new(dir)) {
        Ok(n) => {
            println!("{n} files from {page} written to {dir}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("page-crate: {e}");
            ExitCode::FAILURE
        }
    }
}
