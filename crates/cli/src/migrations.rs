//! `oncely migrations generate`: the crates' own SQL, as Diesel migration folders.

use crate::Refused;
use anyhow::Context;
use std::path::Path;

/// (folder suffix, up, down) of each table.
fn tables(inbox: bool, outbox: bool) -> Vec<(&'static str, &'static str, &'static str)> {
    let mut out = Vec::new();
    if inbox {
        out.push((
            "oncely_inbox",
            oncely::inbox::INBOX_SQL.0,
            oncely::inbox::INBOX_SQL.1,
        ));
    }
    if outbox {
        out.push((
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
    for (suffix, _, _) in &wanted {
        if let Some(found) = existing
            .iter()
            .find(|name| name.ends_with(&format!("_{suffix}")))
        {
            return Err(Refused(format!(
                "{}/{found} already holds the {suffix} migration",
                dir.display()
            ))
            .into());
        }
    }
    // Diesel orders migrations by the version before the first `_`; one second apart keeps
    // the inbox before the outbox.
    let now = chrono::Utc::now();
    for (i, (suffix, up, down)) in wanted.iter().enumerate() {
        let stamp = (now + chrono::Duration::seconds(i as i64)).format("%Y-%m-%d-%H%M%S");
        let folder = dir.join(format!("{stamp}_{suffix}"));
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("creating {}", folder.display()))?;
        std::fs::write(folder.join("up.sql"), up)?;
        std::fs::write(folder.join("down.sql"), down)?;
        println!("wrote {}", folder.display());
    }
    Ok(())
}
