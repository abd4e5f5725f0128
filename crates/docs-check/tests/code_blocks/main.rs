//! Every `sh`, `console`, `toml` and `sql` block of README.md and docs/ is checked against the
//! code, and every link to a test names a test that exists. Rust blocks are doc tests (see the
//! crate's `lib.rs`). The conventions are in docs/decisions.md.

mod shell;

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use oncely::testing::TestSchema;
use oncely_docs_check::markdown::{Block, blocks, doc_files};
use std::path::{Path, PathBuf};

/// A block with this tag is not checked. Only for what cannot be checked (say so next to it).
const SKIP_TAG: &str = "ignore-check";

/// Pages linked from README.md and docs/ that are written on other branches at the same time.
/// A link to one of them is accepted while it is missing; once merged, it is checked like any
/// other (remove it from here then).
const WRITTEN_ELSEWHERE: &[&str] = &[];

fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|e| panic!("repository root: {e}"))
}

fn all_blocks() -> Vec<Block> {
    let root = root();
    let mut all = Vec::new();
    for path in doc_files(&root) {
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let name = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        all.extend(blocks(&name, &text));
    }
    all
}

fn blocks_of(langs: &[&str]) -> Vec<Block> {
    all_blocks()
        .into_iter()
        .filter(|b| langs.contains(&b.lang.as_str()) && !b.has_tag(SKIP_TAG))
        .collect()
}

fn report(what: &str, problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "{} {what} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// toml blocks.

fn check_manifest_fragment(text: &str, root_manifest: &toml::Table) -> Result<(), String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let workspace_deps = root_manifest
        .get("workspace")
        .and_then(|w| w.get("dependencies"))
        .and_then(|d| d.as_table())
        .cloned()
        .unwrap_or_default();
    let Some(deps) = table.get("dependencies").and_then(|d| d.as_table()) else {
        return Err("a Cargo.toml fragment without [dependencies]".to_owned());
    };
    let version_of = |v: &toml::Value| match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Table(t) => t.get("version").and_then(|v| v.as_str()).map(str::to_owned),
        _ => None,
    };
    // "=0.9.2" and "0.9" agree on "0.9".
    let major_minor = |v: &str| {
        v.trim_start_matches(['=', '^', '~'])
            .split('.')
            .take(2)
            .collect::<Vec<_>>()
            .join(".")
    };
    for (name, value) in deps {
        let Some(known) = workspace_deps.get(name) else {
            return Err(format!(
                "dependency {name} is not in [workspace.dependencies]"
            ));
        };
        if let (Some(doc), Some(ours)) = (version_of(value), version_of(known))
            && major_minor(&doc) != major_minor(&ours)
        {
            return Err(format!(
                "dependency {name} = {doc:?}, the workspace uses {ours:?}"
            ));
        }
        if let toml::Value::Table(t) = value
            && let Some(features) = t.get("features").and_then(|f| f.as_array())
            && name == "oncely"
        {
            for f in features {
                if f.as_str() != Some("testing") {
                    return Err(format!("oncely has no feature {f}"));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn every_toml_block_is_a_valid_configuration_or_manifest_fragment() {
    let root_manifest: toml::Table = toml::from_str(
        &std::fs::read_to_string(root().join("Cargo.toml"))
            .unwrap_or_else(|e| panic!("Cargo.toml: {e}")),
    )
    .unwrap_or_else(|e| panic!("Cargo.toml: {e}"));
    let mut problems = Vec::new();
    let mut configs = 0;
    for block in blocks_of(&["toml"]) {
        let first = block.text.lines().next().unwrap_or_default().trim();
        let result = if first == "# Cargo.toml" {
            check_manifest_fragment(&block.text, &root_manifest)
        } else {
            configs += 1;
            // No environment: the file alone must be valid.
            oncely::config::Config::parse(&block.at(), &block.text, |_| None)
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        if let Err(e) = result {
            problems.push(format!("{}: {e}", block.at()));
        }
    }
    report("toml", problems);
    assert!(configs > 0, "no oncely.toml block found");
}

// ---------------------------------------------------------------------------------------------
// sql blocks.

#[tokio::test]
async fn every_sql_block_runs_against_the_real_tables_in_a_rolled_back_transaction() {
    // oncely's tables (message_inbox, outbox_message) and the examples' (invoices, orders).
    let full = TestSchema::create().await.expect("test schema");
    billing::migrate(full.url())
        .await
        .expect("billing migrations");
    order_service::migrate(full.url())
        .await
        .expect("order-service migrations");
    // oncely's tables only, for blocks that create a table of their own.
    let bare = TestSchema::create().await.expect("test schema");
    oncely::run_migrations(bare.url(), oncely::INBOX_MIGRATIONS)
        .await
        .expect("inbox migrations");
    oncely::run_migrations(bare.url(), oncely::outbox::OUTBOX_MIGRATIONS)
        .await
        .expect("outbox migrations");
    let mut full_conn = AsyncPgConnection::establish(full.url())
        .await
        .expect("connect");
    let mut bare_conn = AsyncPgConnection::establish(bare.url())
        .await
        .expect("connect");
    let mut problems = Vec::new();
    let mut checked = 0;
    for block in blocks_of(&["sql"]) {
        checked += 1;
        let sql = block.text.clone();
        let conn = if sql.to_ascii_uppercase().contains("CREATE TABLE") {
            &mut bare_conn
        } else {
            &mut full_conn
        };
        let result = conn
            .transaction::<(), diesel::result::Error, _>(async |conn| {
                conn.batch_execute(&sql).await?;
                Err(diesel::result::Error::RollbackTransaction)
            })
            .await;
        match result {
            Err(diesel::result::Error::RollbackTransaction) => {}
            Err(e) => problems.push(format!("{}: {e}", block.at())),
            Ok(()) => problems.push(format!("{}: committed?", block.at())),
        }
    }
    report("sql", problems);
    assert!(checked > 0, "no sql block found");
}

// ---------------------------------------------------------------------------------------------
// Links.

/// `[text](target)` links of a Markdown text, outside code blocks.
fn links(text: &str) -> Vec<(usize, String, String)> {
    let mut found = Vec::new();
    let mut in_fence = false;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let mut rest = line;
        while let Some(open) = rest.find("](") {
            let label_start = rest[..open].rfind('[').map(|i| i + 1).unwrap_or(0);
            let label = rest[label_start..open].to_owned();
            let after = &rest[open + 2..];
            let Some(close) = after.find(')') else {
                break;
            };
            found.push((index + 1, label, after[..close].to_owned()));
            rest = &after[close..];
        }
    }
    found
}

#[test]
fn every_relative_link_resolves_and_every_linked_test_exists() {
    let root = root();
    let mut problems = Vec::new();
    let mut tests_checked = 0;
    for path in doc_files(&root) {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let name = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        let dir = path.parent().unwrap_or(&root);
        for (line, label, target) in links(&text) {
            if target.contains("://") || target.starts_with('#') || target.starts_with("mailto:") {
                continue;
            }
            let file = target.split('#').next().unwrap_or(&target);
            let resolved = dir.join(file);
            let from_root = resolved
                .canonicalize()
                .ok()
                .and_then(|p| p.strip_prefix(&root).ok().map(Path::to_path_buf))
                .unwrap_or_else(|| {
                    // Missing: resolve `..` by hand to compare with WRITTEN_ELSEWHERE.
                    let mut parts: Vec<String> = Vec::new();
                    let base = dir.strip_prefix(&root).unwrap_or(Path::new(""));
                    for c in base.join(file).components() {
                        match c {
                            std::path::Component::ParentDir => {
                                parts.pop();
                            }
                            std::path::Component::Normal(n) => {
                                parts.push(n.to_string_lossy().into_owned())
                            }
                            _ => {}
                        }
                    }
                    PathBuf::from(parts.join("/"))
                });
            if !resolved.exists()
                && WRITTEN_ELSEWHERE.contains(&from_root.display().to_string().as_str())
            {
                continue;
            }
            if !resolved.exists() {
                problems.push(format!("{name}:{line}: link to {target}: no such file"));
                continue;
            }
            // Only Rust files are read (for the test names below); images and the like exist.
            let source = if file.ends_with(".rs") {
                std::fs::read_to_string(&resolved).unwrap_or_default()
            } else {
                String::new()
            };
            // [`a_test_name`](../tests/tests/x.rs): the test must be in that file.
            let test = label.trim_matches('`');
            if file.ends_with(".rs")
                && label.starts_with('`')
                && test
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                tests_checked += 1;
                if !source.contains(&format!("fn {test}(")) {
                    problems.push(format!("{name}:{line}: {file} has no test {test}"));
                }
            }
        }
    }
    report("link", problems);
    assert!(tests_checked > 20, "only {tests_checked} test links found");
}

/// Every `.rs` and `.sql` file and every script under `dir`, recursively (skipping `target`).
fn rust_sources(dir: &Path, into: &mut String) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                rust_sources(&path, into);
            }
        } else if path.extension().is_none_or(|e| e == "rs" || e == "sql") {
            into.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
}

#[test]
fn every_test_or_code_name_in_the_docs_exists_in_the_code() {
    let root = root();
    let mut sources = String::new();
    for dir in [
        "crates",
        "tests",
        "examples",
        "bench",
        "migrations",
        "scripts",
    ] {
        rust_sources(&root.join(dir), &mut sources);
    }
    let mut problems = Vec::new();
    let mut named = 0;
    for path in doc_files(&root) {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let name = path
            .strip_prefix(&root)
            .unwrap_or(&path)
            .display()
            .to_string();
        for (index, line) in text.lines().enumerate() {
            // `a_lowercase_name_with_five_or_more_underscores` in backticks reads as a test
            // name; it must be in the code (a metric or a column name is, as a string).
            for (i, span) in line.split('`').enumerate() {
                let looks_like_a_test = i % 2 == 1
                    && span.matches('_').count() >= 5
                    && span
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                if looks_like_a_test {
                    named += 1;
                    if !sources.contains(span) {
                        problems.push(format!("{name}:{}: no test named {span}", index + 1));
                    }
                }
            }
        }
    }
    report("test name", problems);
    assert!(named > 20, "only {named} test names found");
}

// ---------------------------------------------------------------------------------------------
// Rust blocks: what a reader copies is what is checked.

/// A line rustdoc would hide (`# use ...`, `#`): a reader copying the block would miss it.
fn is_hidden_line(line: &str) -> bool {
    let trimmed = line.trim_start();
    trimmed == "#" || trimmed.starts_with("# ")
}

#[test]
fn no_rust_block_hides_lines_from_the_reader() {
    let problems = blocks_of(&["rust"])
        .iter()
        .flat_map(|b| {
            b.text
                .lines()
                .enumerate()
                .filter(|(_, line)| is_hidden_line(line))
                .map(move |(i, line)| {
                    format!("{}:{}: hidden line {line:?}", b.file, b.line + 1 + i)
                })
        })
        .collect();
    report("hidden-line", problems);
}

#[test]
fn getting_started_is_a_whole_crate_of_pasteable_files() {
    let page: Vec<Block> = all_blocks()
        .into_iter()
        .filter(|b| b.file == "docs/getting-started.md")
        .collect();
    let files = oncely_docs_check::page_crate::files(&page)
        .unwrap_or_else(|problems| panic!("docs/getting-started.md:\n{}", problems.join("\n")));
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    for wanted in [
        "Cargo.toml",
        "src/lib.rs",
        "src/main.rs",
        "tests/invoices.rs",
    ] {
        assert!(paths.contains(&wanted), "no {wanted} block among {paths:?}");
    }
    // The tests are real tests: each test function is marked, so `cargo test` runs it.
    let tests = files
        .iter()
        .find(|f| f.path == "tests/invoices.rs")
        .map(|f| f.text.matches("#[tokio::test]").count())
        .unwrap_or(0);
    assert!(tests >= 2, "tests/invoices.rs has {tests} #[tokio::test]");
}

#[test]
fn hidden_lines_are_told_apart_from_attributes_and_comments() {
    assert!(is_hidden_line("# use oncely::prelude::*;"));
    assert!(is_hidden_line("    # fn main() {}"));
    assert!(is_hidden_line("#"));
    assert!(!is_hidden_line("#[tokio::test]"));
    assert!(!is_hidden_line("#![allow(dead_code)]"));
    assert!(!is_hidden_line("// # not hidden"));
}
