//! A crate assembled from the code blocks of a page: each block whose first line is a comment
//! naming a file (`# Cargo.toml`, `// src/lib.rs`, `-- migrations/.../up.sql`) is that whole
//! file. `docs/getting-started.md` is written this way, and CI builds and tests the crate it
//! makes outside the workspace (`scripts/check-getting-started`), so the page is the test.

use crate::markdown::Block;
use std::path::{Component, Path};

/// One file of the crate, from one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageFile {
    /// Relative path inside the crate.
    pub path: String,
    /// The whole block, the naming comment included (it is a comment in that language).
    pub text: String,
    /// Where the block is, `file:line`.
    pub at: String,
}

/// The comment that opens a file block in `lang`, or `None` for a language that is never a file.
fn comment_of(lang: &str) -> Option<&'static str> {
    match lang {
        "rust" => Some("//"),
        "toml" => Some("#"),
        "sql" => Some("--"),
        _ => None,
    }
}

/// Whether `path` is a plain relative path with the extension `lang` calls for.
fn path_fits(path: &str, lang: &str) -> bool {
    let p = Path::new(path);
    let relative = !path.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && !path.contains(char::is_whitespace);
    let extension = p.extension().and_then(|e| e.to_str());
    relative
        && match lang {
            "rust" => extension == Some("rs"),
            "toml" => extension == Some("toml"),
            "sql" => extension == Some("sql"),
            _ => false,
        }
}

/// The file a block names on its first line, if it names one.
pub fn named_file(block: &Block) -> Option<String> {
    let comment = comment_of(&block.lang)?;
    let first = block.text.lines().next()?.trim();
    let path = first.strip_prefix(comment)?.trim();
    path_fits(path, &block.lang).then(|| path.to_owned())
}

/// The files of the crate `blocks` make. Every `rust` block must name a file (a page written
/// this way has no fragments), and no file may be named twice; `Err` lists each problem.
pub fn files(blocks: &[Block]) -> Result<Vec<PageFile>, Vec<String>> {
    let mut files: Vec<PageFile> = Vec::new();
    let mut problems = Vec::new();
    for block in blocks {
        match named_file(block) {
            Some(path) => {
                if let Some(earlier) = files.iter().find(|f| f.path == path) {
                    problems.push(format!(
                        "{}: {path} is already the block at {}",
                        block.at(),
                        earlier.at
                    ));
                } else {
                    files.push(PageFile {
                        path,
                        text: block.text.clone(),
                        at: block.at(),
                    });
                }
            }
            None if block.lang == "rust" => problems.push(format!(
                "{}: a rust block that does not start with `// path/of/the/file.rs`",
                block.at()
            )),
            None => {}
        }
    }
    if !files.iter().any(|f| f.path == "Cargo.toml") {
        problems.push("no `# Cargo.toml` block".to_owned());
    }
    if problems.is_empty() {
        Ok(files)
    } else {
        Err(problems)
    }
}

/// `manifest` with every `path = "..."` that ends in `crates/oncely` pointing at `oncely`
/// instead (the reader's checkout becomes this one). `Err` when there is none to point.
pub fn point_at_oncely(manifest: &str, oncely: &str) -> Result<String, String> {
    let mut pointed = 0;
    let mut out = String::with_capacity(manifest.len());
    let mut rest = manifest;
    while let Some(start) = rest.find("path = \"") {
        let value_start = start + "path = \"".len();
        let Some(len) = rest[value_start..].find('"') else {
            break;
        };
        let value = &rest[value_start..value_start + len];
        out.push_str(&rest[..value_start]);
        if value.trim_end_matches('/').ends_with("crates/oncely") {
            out.push_str(oncely);
            pointed += 1;
        } else {
            out.push_str(value);
        }
        rest = &rest[value_start + len..];
    }
    out.push_str(rest);
    if pointed == 0 {
        return Err("the manifest has no `path = \".../crates/oncely\"` dependency".to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::markdown::blocks;

    const PAGE: &str = "# P\n\n```toml\n# Cargo.toml\n[package]\nname = \"x\"\n```\n\n```rust\n// src/lib.rs\npub fn f() {}\n```\n\n```sql\n-- migrations/1_t/up.sql\nCREATE TABLE t (id INT);\n```\n\n```sh\ncargo test\n```\n\n```toml\n[consumers.x]\nprefetch = 1\n```\n";

    #[test]
    fn each_block_naming_a_file_is_that_file() {
        let found = files(&blocks("p.md", PAGE)).expect("files");
        let paths: Vec<&str> = found.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["Cargo.toml", "src/lib.rs", "migrations/1_t/up.sql"]);
        assert_eq!(found[1].text, "// src/lib.rs\npub fn f() {}\n");
        assert_eq!(found[1].at, "p.md:9");
    }

    #[test]
    fn a_rust_fragment_a_repeated_file_and_a_missing_manifest_are_refused() {
        let page =
            "```rust\nlet a = 1;\n```\n```rust\n// src/a.rs\n```\n```rust\n// src/a.rs\n```\n";
        let problems = files(&blocks("p.md", page)).expect_err("refused");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("p.md:1"), "{problems:?}");
        assert!(
            problems[1].contains("already the block at p.md:4"),
            "{problems:?}"
        );
        assert!(problems[2].contains("Cargo.toml"), "{problems:?}");
    }

    #[test]
    fn paths_outside_the_crate_or_with_the_wrong_extension_name_no_file() {
        for (lang, first) in [
            ("rust", "// ../evil.rs"),
            ("rust", "// /etc/x.rs"),
            ("rust", "// src/lib.toml"),
            ("rust", "// the handler"),
            ("sql", "-- a comment"),
            ("toml", "# Cargo.lock"),
            ("sh", "# run.sh"),
        ] {
            let block = Block {
                file: "p.md".into(),
                line: 1,
                lang: lang.into(),
                tags: vec![],
                text: format!("{first}\n"),
            };
            assert_eq!(named_file(&block), None, "{lang} {first}");
        }
    }

    #[test]
    fn the_oncely_path_dependency_points_at_this_checkout() {
        let manifest = "[dependencies]\noncely = { path = \"../oncely/crates/oncely\" } # yours\nother = { path = \"../other\" }\n[dev-dependencies]\noncely = { path = \"../oncely/crates/oncely\", features = [\"testing\"] }\n";
        let pointed = point_at_oncely(manifest, "/src/oncely/crates/oncely").expect("pointed");
        assert_eq!(
            pointed,
            "[dependencies]\noncely = { path = \"/src/oncely/crates/oncely\" } # yours\nother = { path = \"../other\" }\n[dev-dependencies]\noncely = { path = \"/src/oncely/crates/oncely\", features = [\"testing\"] }\n"
        );
        assert!(point_at_oncely("[dependencies]\nserde = \"1\"\n", "/x").is_err());
    }
}
