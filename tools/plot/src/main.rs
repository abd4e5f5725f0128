//! Draws a drill run's counters over time into a PNG.
//!
//! Run with:
//!   cargo run -p oncely-plot --bin drill-plot -- --input drill.csv --output docs/drill-counters.png
//!
//! The CSV has a header `elapsed_s,orders,published,invoices,reservations,audit,duplicates,
//! retries,dead_letters` (any subset after `elapsed_s`; unknown columns are drawn too), one row per
//! sample. The upper panel shows the flow of messages (orders, published, invoices, reservations,
//! audit), the lower one the exceptions (duplicates, retries, dead letters), which are orders of
//! magnitude smaller. The font is embedded (DejaVu Sans): no system font is needed.

use clap::Parser;
use plotters::prelude::*;
use std::path::PathBuf;

/// Columns drawn in the lower panel; every other column goes to the upper one.
const EXCEPTIONS: [&str; 3] = ["duplicates", "retries", "dead_letters"];

#[derive(Parser, Debug)]
#[command(
    name = "drill-plot",
    about = "Draws drill counters (CSV) over time into a PNG"
)]
struct Cli {
    /// CSV with an `elapsed_s` column and one column per counter.
    #[arg(long)]
    input: PathBuf,
    /// PNG to write.
    #[arg(long)]
    output: PathBuf,
    /// Title above the chart.
    #[arg(long, default_value = "oncely drill: counters over time")]
    title: String,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1200)]
    width: u32,
    /// Image height in pixels.
    #[arg(long, default_value_t = 900)]
    height: u32,
}

/// Reading or drawing failed.
#[derive(Debug, thiserror::Error)]
enum PlotError {
    #[error("cannot read {path}: {source}")]
    Csv { path: String, source: csv::Error },
    #[error("{0}")]
    Data(String),
    #[error("cannot draw: {0}")]
    Draw(String),
}

/// One counter over time.
#[derive(Debug, Clone, PartialEq)]
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// Reads the samples: one series per column after `elapsed_s`.
fn read_series(reader: impl std::io::Read, path: &str) -> Result<Vec<Series>, PlotError> {
    let csv_error = |source| PlotError::Csv {
        path: path.to_owned(),
        source,
    };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(reader);
    let headers = reader.headers().map_err(csv_error)?.clone();
    let elapsed = headers
        .iter()
        .position(|h| h == "elapsed_s")
        .ok_or_else(|| PlotError::Data(format!("{path}: no elapsed_s column")))?;
    let mut series: Vec<(usize, Series)> = headers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != elapsed)
        .map(|(i, name)| {
            (
                i,
                Series {
                    name: name.to_owned(),
                    points: Vec::new(),
                },
            )
        })
        .collect();
    for (line, record) in reader.records().enumerate() {
        let record = record.map_err(csv_error)?;
        let number = |i: usize| -> Result<f64, PlotError> {
            let text = record.get(i).unwrap_or_default();
            text.parse().map_err(|_| {
                PlotError::Data(format!(
                    "{path}: row {}: {:?} is not a number in column {}",
                    line + 2,
                    text,
                    &headers[i]
                ))
            })
        };
        let t = number(elapsed)?;
        for (i, s) in &mut series {
            s.points.push((t, number(*i)?));
        }
    }
    if series.iter().all(|(_, s)| s.points.is_empty()) {
        return Err(PlotError::Data(format!("{path}: no samples")));
    }
    Ok(series.into_iter().map(|(_, s)| s).collect())
}

fn draw_err(e: impl std::fmt::Display) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// Draws `series` into a PNG at `output`.
fn draw(
    series: &[Series],
    output: &std::path::Path,
    title: &str,
    size: (u32, u32),
) -> Result<(), PlotError> {
    // Registering twice (tests) is harmless: the second registration replaces the first.
    plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
        .map_err(|_| PlotError::Draw("embedded font is invalid".into()))?;
    let root = BitMapBackend::new(output, size).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let root = root.titled(title, ("sans-serif", 26)).map_err(draw_err)?;
    let (upper, lower) = root.split_vertically(size.1 * 6 / 10);
    let x_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let (flow, exceptions): (Vec<&Series>, Vec<&Series>) = series
        .iter()
        .partition(|s| !EXCEPTIONS.contains(&s.name.as_str()));
    panel(&upper, &flow, x_max, "messages", 0)?;
    panel(&lower, &exceptions, x_max, "exceptions", flow.len())?;
    root.present().map_err(draw_err)?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    series: &[&Series],
    x_max: f64,
    y_desc: &str,
    first_color: usize,
) -> Result<(), PlotError> {
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(area)
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("elapsed (s)")
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(draw_err)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(first_color + i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(draw_err)?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    if !series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(draw_err)?;
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let run = || -> Result<(), PlotError> {
        let path = cli.input.display().to_string();
        let file = std::fs::File::open(&cli.input).map_err(|e| PlotError::Csv {
            path: path.clone(),
            source: e.into(),
        })?;
        let series = read_series(file, &path)?;
        draw(&series, &cli.output, &cli.title, (cli.width, cli.height))
    };
    match run() {
        Ok(()) => {
            println!("wrote {}", cli.output.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("drill-plot: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str =
        "elapsed_s,orders,published,invoices,reservations,audit,duplicates,retries,dead_letters
0,0,0,0,0,0,0,0,0
1.5,100,90,80,80,85,3,1,0
3,200,200,200,199,200,9,2,1
";

    #[test]
    fn columns_become_series_over_elapsed_time() {
        let series = read_series(CSV.as_bytes(), "test.csv").expect("parses");
        assert_eq!(series.len(), 8);
        assert_eq!(series[0].name, "orders");
        assert_eq!(
            series[0].points,
            vec![(0.0, 0.0), (1.5, 100.0), (3.0, 200.0)]
        );
        assert_eq!(series[7].name, "dead_letters");
    }

    #[test]
    fn a_bad_number_names_its_row_and_column() {
        let bad = "elapsed_s,orders\n0,1\n1,x\n";
        let err = read_series(bad.as_bytes(), "bad.csv").expect_err("fails");
        assert!(err.to_string().contains("row 3"), "{err}");
        assert!(err.to_string().contains("orders"), "{err}");
    }

    #[test]
    fn a_missing_elapsed_column_is_an_error() {
        let err = read_series("orders\n1\n".as_bytes(), "x.csv").expect_err("fails");
        assert!(err.to_string().contains("elapsed_s"), "{err}");
    }

    #[test]
    fn draws_a_png() {
        let series = read_series(CSV.as_bytes(), "test.csv").expect("parses");
        let out = std::env::temp_dir().join(format!("drill-plot-{}.png", std::process::id()));
        draw(&series, &out, "test", (600, 450)).expect("draws");
        let bytes = std::fs::read(&out).expect("written");
        assert_eq!(&bytes[1..4], b"PNG");
        let _ = std::fs::remove_file(&out);
    }
}
