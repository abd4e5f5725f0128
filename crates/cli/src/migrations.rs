//! `oncely migrations generate`: the crates' own SQL, as Diesel migration folders.

use crate::Refused;
use anyhow::Context;
use std::path::Path;

/// (folder name, name an older oncely gave the folder, up, down) of each table. The folder
/// names are the embedded migrations' own, so the versions agree with `run_migrations`.
type Table = (&'static str, &'static str, &'static str, &'static str);

fn tables(inbox: bool, outbox: bool) -> Vec<Table> {
    let mut out = Vec::new();
    if inbox {
        out.push((
            oncely::inbox::INBOX_MIGRATION,
            "oncely_inbox",
            oncely::inbox::INBOX_SQL.0,
            oncely::inbox::INBOX_SQL.1,
        ));
    }
    if outbox {
        out.push((
            oncely::outbox::OUTBOX_MIGRATION,
            "oncely_outbox",
            oncely::outbox::OUTBOX_SQL.0,
            oncely::outbox::OUTBOX_SQL.1,
        ));
    }
    out
}

pub(crate) fn generate(dir: &Path, inbox: bool, outbox: bool) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let existing: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let wanted = tables(inbox, outbox);
    for (name, legacy, _, _) in &wanted {
        if let Some(found) = existing
            .iter()
            .find(|f| f.as_str() == *name || f.ends_with(&format!("_{legacy}")))
        {
            return Err(Refused(format!(
                "{}/{found} already holds the {legacy} migration",
                dir.display()
            ))
            .into());
        }
    }
    // The embedded migrations' versions, not today's date: a service that applies these files
    // (diesel_cli) and also calls `oncely::run_migrations` at start-up applies each once.
    for (name, _, up, down) in &wanted {
        let folder = dir.join(name);
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("creating {}", folder.display()))?;
        std::fs::write(folder.join("up.sql"), up)?;
        std::fs::write(folder.join("down.sql"), down)?;
        println!("wrote {}", folder.display());
    }
    Ok(())
}

/// Applies the pending migrations of `dir` to `database_url`, printing each one applied; one
/// process at a time per database (see `oncely::inbox::apply_migrations`).
pub(crate) async fn run(database_url: &str, dir: &Path) -> anyhow::Result<()> {
    let source = diesel_migrations::FileBasedMigrations::from_path(dir)
        .map_err(|e| anyhow::anyhow!("{} is not a migrations directory: {e}", dir.display()))?;
    // Under the same advisory lock as the services' own start-up migrations.
    let applied = oncely::inbox::apply_migrations(database_url, source)
        .await
        .context("applying migrations (--database-url or DATABASE_URL)")?;
    if applied.is_empty() {
        println!(
            "nothing to apply: every migration of {} is applied",
            dir.display()
        );
    }
    for version in applied {
        println!("applied {version}");
    }
    Ok(())
}
