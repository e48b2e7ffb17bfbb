//! Tables printed to the terminal and written to BENCHMARKS.md.

use std::fmt::Write;

/// One table.
pub struct Table {
    /// Heading.
    pub title: String,
    /// What the workload does on each side.
    pub note: String,
    /// Column names.
    pub columns: Vec<String>,
    /// Rows of cells.
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns.
    pub fn new(title: &str, note: &str, columns: &[&str]) -> Self {
        Table {
            title: title.into(),
            note: note.into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Markdown rendering.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "### {}\n", self.title);
        if !self.note.is_empty() {
            let _ = writeln!(out, "{}\n", self.note);
        }
        let _ = writeln!(out, "| {} |", self.columns.join(" | "));
        let _ = writeln!(
            out,
            "|{}|",
            self.columns.iter().map(|_| "---").collect::<Vec<_>>().join("|")
        );
        for r in &self.rows {
            let _ = writeln!(out, "| {} |", r.join(" | "));
        }
        out
    }
}

/// Formats a number with a sensible precision.
pub fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Muster / etcd, or "-" when either is missing.
pub fn ratio(muster: Option<f64>, etcd: Option<f64>) -> String {
    match (muster, etcd) {
        (Some(m), Some(e)) if e > 0.0 => format!("{:.2}x", m / e),
        _ => "-".into(),
    }
}
