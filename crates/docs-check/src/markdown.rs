//! Fenced code blocks of a Markdown file.

use std::path::{Path, PathBuf};

/// One fenced code block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The file, relative to the repository root.
    pub file: String,
    /// 1-based line of the opening fence.
    pub line: usize,
    /// First word of the info string (`rust`, `sh`, `toml`, ...), empty when there is none.
    pub lang: String,
    /// The other words of the info string (`no_run`, `ignore-check`, ...).
    pub tags: Vec<String>,
    /// The lines between the fences.
    pub text: String,
}

impl Block {
    /// `file:line`, for messages.
    pub fn at(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }

    /// Whether the info string carries `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// The fenced blocks (```` ``` ```` or `~~~`) of `text`, a file named `file`.
pub fn blocks(file: &str, text: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut open: Option<(String, Block)> = None;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut open {
            None => {
                let fence: String = trimmed
                    .chars()
                    .take_while(|c| *c == '`' || *c == '~')
                    .collect();
                if fence.len() >= 3 && fence.chars().all(|c| c == fence.as_bytes()[0] as char) {
                    let info = trimmed[fence.len()..].trim();
                    let mut words = info
                        .split(|c: char| c == ',' || c.is_whitespace())
                        .filter(|w| !w.is_empty())
                        .map(str::to_owned);
                    let lang = words.next().unwrap_or_default();
                    open = Some((
                        fence,
                        Block {
                            file: file.to_owned(),
                            line: index + 1,
                            lang,
                            tags: words.collect(),
                            text: String::new(),
                        },
                    ));
                }
            }
            Some((fence, block)) => {
                if trimmed.starts_with(fence.as_str()) && trimmed.trim_end() == fence.as_str() {
                    if let Some((_, block)) = open.take() {
                        found.push(block);
                    }
                } else {
                    block.text.push_str(line);
                    block.text.push('\n');
                }
            }
        }
    }
    found
}

/// `README.md` and every `docs/**/*.md` under `root`, sorted.
pub fn doc_files(root: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, into: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, into);
            } else if path.extension().is_some_and(|e| e == "md") {
                into.push(path);
            }
        }
    }
    let mut files = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut files);
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_with_info_strings_are_found_with_their_lines() {
        let text = "# T\n\n```rust,no_run\nlet a = 1;\n```\n\ntext\n\n```sh ignore-check\n./x\n```\n````text\n```\n````\n";
        let b = blocks("d.md", text);
        assert_eq!(b.len(), 3);
        assert_eq!((b[0].line, b[0].lang.as_str()), (3, "rust"));
        assert!(b[0].has_tag("no_run"));
        assert_eq!(b[0].text, "let a = 1;\n");
        assert_eq!((b[1].line, b[1].lang.as_str()), (9, "sh"));
        assert!(b[1].has_tag("ignore-check"));
        assert_eq!(b[2].text, "```\n");
    }
}
