//! The table and the JSON summary: every figure with the ceiling it is compared to.

use serde_json::{Value, json};
use std::path::Path;

/// One measured figure.
#[derive(Debug, Clone)]
pub struct Row {
    /// Stable key in the JSON summary, e.g. `oncely_single_c16`.
    pub key: String,
    /// Group in the table.
    pub section: &'static str,
    /// What was measured.
    pub label: String,
    /// The figure; `None` when it was not measured (see `note`).
    pub value: Option<f64>,
    /// Unit of `value`.
    pub unit: &'static str,
    /// Key of the row this one is compared to, when it has a ceiling.
    pub ceiling: Option<String>,
    /// Key of a second reference, shown in the note.
    pub also: Option<String>,
    /// Free text: conditions, or why there is no figure.
    pub note: String,
}

impl Row {
    /// A measured figure.
    pub fn new(
        key: impl Into<String>,
        section: &'static str,
        label: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Self {
        Row {
            key: key.into(),
            section,
            label: label.into(),
            value: Some(value),
            unit,
            ceiling: None,
            also: None,
            note: String::new(),
        }
    }

    /// Compared to the row with key `ceiling`.
    pub fn against(mut self, ceiling: impl Into<String>) -> Self {
        self.ceiling = Some(ceiling.into());
        self
    }

    /// Also compared to the row with key `reference` (shown in the note).
    pub fn also_against(mut self, reference: impl Into<String>) -> Self {
        self.also = Some(reference.into());
        self
    }

    /// Adds a note.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

/// Every row of one run, in the order measured.
#[derive(Debug, Default)]
pub struct Report {
    rows: Vec<Row>,
    extra: serde_json::Map<String, Value>,
}

impl Report {
    /// Adds a row and prints it at once, so a long run shows progress.
    pub fn push(&mut self, row: Row) {
        let ratio = self.ratio(&row);
        let also = row.also.as_deref().and_then(|k| self.ratio_to(&row, k));
        eprintln!(
            "  {:<58} {:>14}{}{}",
            row.label,
            figure(&row),
            ratio
                .map(|r| format!("   ratio {r:.2}"))
                .unwrap_or_default(),
            also.map(|r| format!(" ({r:.2} of {})", row.also.as_deref().unwrap_or_default()))
                .unwrap_or_default()
        );
        self.rows.push(row);
    }

    /// Extra structured data for the JSON summary (samples, settings).
    pub fn set(&mut self, key: &str, value: Value) {
        self.extra.insert(key.to_owned(), value);
    }

    /// The value of the row with key `key`, if measured.
    pub fn value(&self, key: &str) -> Option<f64> {
        self.find(key)?.value
    }

    fn find(&self, key: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.key == key)
    }

    /// `value / ceiling value` when both exist.
    pub fn ratio(&self, row: &Row) -> Option<f64> {
        self.ratio_to(row, row.ceiling.as_deref()?)
    }

    fn ratio_to(&self, row: &Row, key: &str) -> Option<f64> {
        let ceiling = self.find(key)?.value?;
        let value = row.value?;
        (ceiling > 0.0).then(|| value / ceiling)
    }

    /// The note, with the ratio to the second reference when there is one.
    fn note(&self, row: &Row) -> String {
        let also = row.also.as_deref().and_then(|key| {
            let ratio = self.ratio_to(row, key)?;
            Some(format!("{ratio:.2} of {}", self.find(key)?.label))
        });
        match (also, row.note.is_empty()) {
            (Some(also), true) => also,
            (Some(also), false) => format!("{}; {also}", row.note),
            (None, _) => row.note.clone(),
        }
    }

    /// The markdown table.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| section | measurement | figure | ceiling | ratio | note |\n|---|---|---|---|---|---|\n",
        );
        for row in &self.rows {
            let ceiling = row
                .ceiling
                .as_deref()
                .and_then(|k| self.find(k))
                .map(|c| format!("{} ({})", figure(c), c.label))
                .unwrap_or_default();
            let ratio = self
                .ratio(row)
                .map(|r| format!("{r:.2}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                row.section,
                row.label,
                figure(row),
                ceiling,
                ratio,
                self.note(row)
            ));
        }
        out
    }

    /// The JSON summary.
    pub fn json(&self) -> Value {
        let results: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                json!({
                    "key": row.key,
                    "section": row.section,
                    "label": row.label,
                    "value": row.value,
                    "unit": row.unit,
                    "ceiling": row.ceiling,
                    "ratio": self.ratio(row),
                    "also": row.also,
                    "also_ratio": row.also.as_deref().and_then(|k| self.ratio_to(row, k)),
                    "note": self.note(row),
                })
            })
            .collect();
        let mut summary = serde_json::Map::new();
        summary.insert("results".into(), Value::Array(results));
        for (k, v) in &self.extra {
            summary.insert(k.clone(), v.clone());
        }
        Value::Object(summary)
    }

    /// Writes the JSON summary to `path`, creating its folder.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, serde_json::to_string_pretty(&self.json())?)?;
        Ok(())
    }
}

fn figure(row: &Row) -> String {
    match row.value {
        None => "n/a".to_owned(),
        Some(v) if row.unit == "msgs/s" || row.unit == "rows/s" => {
            format!("{} {}", thousands(v), row.unit)
        }
        Some(v) => format!("{v:.1} {}", row.unit),
    }
}

/// `12345.6` as `12,346`.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_refer_to_their_ceiling_row() {
        let mut report = Report::default();
        report.push(Row::new("pg", "s", "ceiling", 1000.0, "msgs/s"));
        report.push(Row::new("x", "s", "oncely", 900.0, "msgs/s").against("pg"));
        let json = report.json();
        assert_eq!(json["results"][1]["ratio"], json!(0.9));
        assert_eq!(report.value("x"), Some(900.0));
        assert!(report.table().contains("| 1,000 msgs/s (ceiling) | 0.90 |"));
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}
