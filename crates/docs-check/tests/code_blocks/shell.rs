//! `sh` / `console` blocks: every command names a workspace binary (with its subcommands and
//! flags, checked through `--help`), a script, a cargo package or test target, or a known tool.

use crate::{Block, blocks_of, report, root};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Commands a `sh` block may use that are not part of this repository. They are not run.
const EXTERNAL_TOOLS: &[&str] = &[
    "apt-get",
    "brew",
    "cat",
    "cd",
    "createdb",
    "curl",
    "diesel",
    "docker",
    "echo",
    "env",
    "export",
    "git",
    "grep",
    "head",
    "jq",
    "kill",
    "less",
    "ls",
    "nc",
    "pg_isready",
    "pgrep",
    "pkill",
    "printf",
    "ps",
    "psql",
    "rabbitmq-diagnostics",
    "rabbitmq-plugins",
    "rabbitmqadmin",
    "rabbitmqctl",
    "sleep",
    "source",
    "sudo",
    "systemctl",
    "tail",
    "tee",
    "timeout",
    "unset",
    "wait",
    "watch",
    "wc",
    "wget",
];

// ---------------------------------------------------------------------------------------------
// The workspace: packages, their binaries and test targets (`cargo metadata`).

#[derive(Debug, Default)]
struct Package {
    bins: Vec<String>,
    tests: Vec<String>,
}

#[derive(Debug)]
struct Workspace {
    packages: BTreeMap<String, Package>,
    /// Binary name -> package.
    bins: BTreeMap<String, String>,
    /// Where the binaries are built (`<target>/debug`).
    bin_dir: PathBuf,
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    c.current_dir(root());
    c
}

fn workspace() -> Workspace {
    let out = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .unwrap_or_else(|e| panic!("cargo metadata: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("cargo metadata: {e}"));
    let mut packages = BTreeMap::new();
    let mut bins = BTreeMap::new();
    for p in meta["packages"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default().to_owned();
        let mut package = Package::default();
        for t in p["targets"].as_array().into_iter().flatten() {
            let target = t["name"].as_str().unwrap_or_default().to_owned();
            let kinds: Vec<&str> = t["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str())
                .collect();
            if kinds.contains(&"bin") {
                bins.insert(target.clone(), name.clone());
                package.bins.push(target);
            } else if kinds.contains(&"test") {
                package.tests.push(target);
            }
        }
        packages.insert(name, package);
    }
    // This test runs from <target>/<profile>/deps/.
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current exe: {e}"));
    let bin_dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| panic!("no target directory above {}", exe.display()));
    Workspace {
        packages,
        bins,
        bin_dir,
    }
}

// ---------------------------------------------------------------------------------------------
// sh / console blocks.

/// The commands of a block: continuation lines joined, comments and console output dropped,
/// split on `&&`, `||`, `;` and `|`.
fn commands(block: &Block) -> Result<Vec<Vec<String>>, String> {
    let console = block.lang == "console";
    let mut lines = Vec::new();
    let mut pending = String::new();
    for raw in block.text.lines() {
        let line = if console {
            match raw.trim_start().strip_prefix("$ ") {
                Some(command) => command,
                None if !pending.is_empty() => raw,
                None => continue, // output
            }
        } else {
            raw
        };
        if let Some(head) = line.trim_end().strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        lines.push(std::mem::take(&mut pending));
    }
    let mut out = Vec::new();
    for line in lines {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words = shlex::split(line).ok_or_else(|| format!("cannot split {line:?}"))?;
        let mut current = Vec::new();
        for word in words {
            if word.starts_with('#') {
                break; // comment to the end of the line
            }
            let (word, ends) = match word.strip_suffix(';') {
                Some(w) => (w.to_owned(), true),
                None => (word, false),
            };
            if ["&&", "||", "|", ";", "&"].contains(&word.as_str()) {
                out.push(std::mem::take(&mut current));
                continue;
            }
            if !word.is_empty() {
                current.push(word);
            }
            if ends {
                out.push(std::mem::take(&mut current));
            }
        }
        out.push(current);
    }
    out.retain(|c| !c.is_empty());
    Ok(out)
}

/// One level of a program's `--help`: its subcommands and its options (with whether they take
/// a value).
#[derive(Debug, Default)]
struct Help {
    subcommands: BTreeSet<String>,
    options: BTreeMap<String, bool>,
}

fn parse_help(text: &str) -> Help {
    let mut help = Help::default();
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line.trim_end_matches(':');
            continue;
        }
        let item = line.trim();
        if item.is_empty() {
            continue;
        }
        match section {
            "Commands" => {
                if let Some(name) = item.split_whitespace().next() {
                    help.subcommands.insert(name.to_owned());
                }
            }
            "Options" if item.starts_with('-') => {
                // `-c, --count <COUNT>  How many`: every name, and whether a value follows.
                let words: Vec<&str> = item.split_whitespace().collect();
                let names: Vec<&str> = words
                    .iter()
                    .take_while(|w| w.starts_with('-') && w.trim_end_matches(',').len() > 1)
                    .map(|w| w.trim_end_matches(','))
                    .collect();
                let takes_value = words.get(names.len()).is_some_and(|w| w.starts_with('<'));
                for name in names {
                    help.options.insert(name.to_owned(), takes_value);
                }
            }
            _ => {}
        }
    }
    help
}

struct Binaries {
    workspace: Workspace,
    built: BTreeSet<String>,
    helps: BTreeMap<Vec<String>, Result<Help, String>>,
}

impl Binaries {
    fn new() -> Self {
        Binaries {
            workspace: workspace(),
            built: BTreeSet::new(),
            helps: BTreeMap::new(),
        }
    }

    /// The package whose binary `words` runs, if any.
    fn package_of(&self, words: &[String]) -> Option<String> {
        let words: Vec<&String> = words.iter().filter(|w| !w.contains('=')).collect();
        let program = words.first()?;
        if program.as_str() == "cargo" && words.get(1).is_some_and(|w| w.as_str() == "run") {
            let i = words.iter().position(|w| *w == "-p" || *w == "--package")?;
            return words.get(i + 1).map(|p| p.to_string());
        }
        let name = program.rsplit('/').next().unwrap_or(program);
        self.workspace.bins.get(name).cloned()
    }

    /// Builds the binaries of `packages` in one cargo run (a no-op when they are fresh).
    fn build(&mut self, packages: &BTreeSet<String>) -> Result<(), String> {
        let wanted: Vec<&String> = packages.difference(&self.built).collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let mut command = cargo();
        command.args(["build", "--quiet", "--bins"]);
        // The profile this test was built with (`target/<profile>/deps/`).
        let profile = self.workspace.bin_dir.file_name().and_then(|n| n.to_str());
        if let Some(profile) = profile.filter(|p| *p != "debug") {
            command.args(["--profile", profile]);
        }
        for p in &wanted {
            command.args(["-p", p.as_str()]);
        }
        let out = command.output().map_err(|e| format!("cargo build: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo build of {wanted:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        self.built.extend(packages.iter().cloned());
        Ok(())
    }

    /// Builds `package` if needed and returns the path of `bin`.
    fn binary(&mut self, package: &str, bin: &str) -> Result<PathBuf, String> {
        self.build(&BTreeSet::from([package.to_owned()]))?;
        Ok(self.workspace.bin_dir.join(bin))
    }

    /// `bin path... --help`, parsed; cached.
    fn help(&mut self, bin: &str, path: &[String]) -> Result<&Help, String> {
        let mut key = vec![bin.to_owned()];
        key.extend(path.iter().cloned());
        if !self.helps.contains_key(&key) {
            let result = self.run_help(bin, path);
            self.helps.insert(key.clone(), result);
        }
        match &self.helps[&key] {
            Ok(help) => Ok(help),
            Err(e) => Err(e.clone()),
        }
    }

    fn run_help(&mut self, bin: &str, path: &[String]) -> Result<Help, String> {
        let package = self.workspace.bins[bin].clone();
        let exe = self.binary(&package, bin)?;
        let out = Command::new(&exe)
            .args(path)
            .arg("--help")
            .env_remove("RUST_LOG")
            .output()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        if !out.status.success() {
            return Err(format!(
                "`{bin} {} --help` failed: {}",
                path.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(parse_help(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Checks `args` against the subcommands and options `bin --help` lists, level by level.
    fn check_args(&mut self, bin: &str, args: &[String]) -> Result<(), String> {
        let mut path: Vec<String> = Vec::new();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            let help = self.help(bin, &path)?;
            if arg == "--help" || arg == "-h" || arg == "--version" || arg == "-V" {
                return Ok(());
            }
            if arg.starts_with('-') && arg.len() > 1 {
                let name = arg.split('=').next().unwrap_or(arg);
                match help.options.get(name) {
                    Some(takes_value) => {
                        if *takes_value && !arg.contains('=') {
                            i += 1;
                        }
                    }
                    None => {
                        return Err(format!(
                            "`{bin} {}` has no option {name} (known: {})",
                            path.join(" "),
                            help.options.keys().cloned().collect::<Vec<_>>().join(" ")
                        ));
                    }
                }
            } else if help.subcommands.contains(arg.as_str()) {
                path.push(arg.clone());
            } else if !help.subcommands.is_empty() {
                return Err(format!(
                    "`{bin} {}` has no subcommand {arg:?} (known: {})",
                    path.join(" "),
                    help.subcommands
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
            // Otherwise a positional argument (a queue name, say).
            i += 1;
        }
        if !self.help(bin, &path)?.subcommands.is_empty() && !path.is_empty() {
            // `oncely dlq` alone prints usage; a documented command names a leaf.
            return Err(format!("`{bin} {}` needs a subcommand", path.join(" ")));
        }
        Ok(())
    }

    fn check_command(&mut self, words: &[String]) -> Result<(), String> {
        let mut words = words;
        // Leading VAR=value assignments.
        while let Some(first) = words.first() {
            let is_assignment = first.split_once('=').is_some_and(|(name, _)| {
                !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            });
            if !is_assignment {
                break;
            }
            words = &words[1..];
        }
        let Some(program) = words.first() else {
            return Ok(());
        };
        let args = &words[1..];
        let root = root();
        if program.starts_with("./scripts/") || program.starts_with("scripts/") {
            let path = root.join(program.trim_start_matches("./"));
            return match std::fs::metadata(&path) {
                Ok(m) if is_executable(&m) => Ok(()),
                Ok(_) => Err(format!("{program} is not executable")),
                Err(_) => Err(format!("{program} does not exist")),
            };
        }
        let bin_name = program.rsplit('/').next().unwrap_or(program);
        let is_built_path = program.contains("target/");
        if self.workspace.bins.contains_key(bin_name) && (is_built_path || bin_name == program) {
            return self.check_args(bin_name, args);
        }
        if program == "cargo" {
            return self.check_cargo(args);
        }
        if EXTERNAL_TOOLS.contains(&program.as_str()) {
            return Ok(());
        }
        Err(format!(
            "{program:?} is neither a binary of this workspace, a script, nor an allowed tool"
        ))
    }

    fn check_cargo(&mut self, args: &[String]) -> Result<(), String> {
        let Some(sub) = args.first() else {
            return Ok(());
        };
        let (cargo_args, program_args) = match args.iter().position(|a| a == "--") {
            Some(i) => (&args[1..i], &args[i + 1..]),
            None => (&args[1..], &[][..]),
        };
        let value_of = |flags: &[&str]| {
            cargo_args
                .iter()
                .position(|a| flags.contains(&a.as_str()))
                .and_then(|i| cargo_args.get(i + 1))
                .cloned()
        };
        let package = value_of(&["-p", "--package"]);
        if let Some(p) = &package
            && !self.workspace.packages.contains_key(p)
        {
            return Err(format!("cargo {sub}: no package {p} in the workspace"));
        }
        match sub.as_str() {
            "run" => {
                let bin = match (value_of(&["--bin"]), &package) {
                    (Some(bin), _) => bin,
                    (None, Some(p)) => match self.workspace.packages[p].bins.as_slice() {
                        [only] => only.clone(),
                        other => return Err(format!("cargo run -p {p}: binaries {other:?}")),
                    },
                    (None, None) => return Err("cargo run without -p".to_owned()),
                };
                if !self.workspace.bins.contains_key(&bin) {
                    return Err(format!("cargo run: no binary {bin}"));
                }
                self.check_args(&bin, program_args)
            }
            "test" => {
                if let Some(test) = value_of(&["--test"]) {
                    let known = package
                        .as_ref()
                        .map(|p| self.workspace.packages[p].tests.contains(&test))
                        .unwrap_or_else(|| {
                            self.workspace
                                .packages
                                .values()
                                .any(|p| p.tests.contains(&test))
                        });
                    if !known {
                        return Err(format!("cargo test: no test target {test}"));
                    }
                }
                Ok(())
            }
            "install" => match value_of(&["--path"]) {
                Some(path) if !root().join(&path).exists() => {
                    Err(format!("cargo install --path {path}: no such directory"))
                }
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }
}

#[cfg(unix)]
fn is_executable(m: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    m.is_file() && m.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(m: &std::fs::Metadata) -> bool {
    m.is_file()
}

#[test]
fn every_shell_command_in_the_docs_names_a_real_binary_subcommand_flag_or_script() {
    let mut binaries = Binaries::new();
    let mut problems = Vec::new();
    let mut all = Vec::new();
    for block in blocks_of(&["sh", "console", "bash", "shell"]) {
        match commands(&block) {
            Err(e) => problems.push(format!("{}: {e}", block.at())),
            Ok(commands) => all.extend(commands.into_iter().map(|c| (block.at(), c))),
        }
    }
    // One build for every binary the docs run.
    let packages: BTreeSet<String> = all
        .iter()
        .filter_map(|(_, c)| binaries.package_of(c))
        .filter(|p| binaries.workspace.packages.contains_key(p))
        .collect();
    if let Err(e) = binaries.build(&packages) {
        problems.push(e);
    }
    let checked = all.len();
    for (at, command) in all {
        if let Err(e) = binaries.check_command(&command) {
            problems.push(format!("{at}: `{}`: {e}", command.join(" ")));
        }
    }
    report("shell", problems);
    assert!(
        checked > 10,
        "only {checked} commands found: is the parser broken?"
    );
}

// ---------------------------------------------------------------------------------------------
// The checker itself.

#[test]
fn commands_are_split_on_operators_with_comments_prompts_and_continuations_handled() {
    let block = |lang: &str, text: &str| Block {
        file: "t.md".into(),
        line: 1,
        lang: lang.into(),
        tags: Vec::new(),
        text: text.into(),
    };
    let sh = block(
        "sh",
        "# a comment\nRUST_LOG=info oncely inbox stats   # trailing\ncargo run -p billing -- \\\n  run --concurrency 4 && ./scripts/test; echo done\n",
    );
    let got = commands(&sh).expect("splits");
    assert_eq!(
        got,
        vec![
            vec!["RUST_LOG=info", "oncely", "inbox", "stats"],
            vec![
                "cargo",
                "run",
                "-p",
                "billing",
                "--",
                "run",
                "--concurrency",
                "4"
            ],
            vec!["./scripts/test"],
            vec!["echo", "done"],
        ]
    );
    let console = block("console", "$ oncely outbox stats\nunpublished: 0\n");
    assert_eq!(
        commands(&console).expect("splits"),
        vec![vec!["oncely", "outbox", "stats"]]
    );
}

#[test]
fn clap_help_is_read_into_subcommands_and_options() {
    let help = parse_help(
        "Usage: oncely [OPTIONS] <COMMAND>\n\nCommands:\n  dlq   Inspect\n  help  Print\n\nOptions:\n      --database-url <DATABASE_URL>  PostgreSQL URL\n  -c, --count <COUNT>  How many\n      --dry-run  Show\n  -h, --help  Print help\n",
    );
    assert!(help.subcommands.contains("dlq"));
    assert_eq!(help.options.get("--database-url"), Some(&true));
    assert_eq!(help.options.get("--count"), Some(&true));
    assert_eq!(help.options.get("-c"), Some(&true));
    assert_eq!(help.options.get("--dry-run"), Some(&false));
}
