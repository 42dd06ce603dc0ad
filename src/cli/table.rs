//! A table for people: aligned columns (the CLI's and the bench harness's output).

/// A table for people: columns as wide as their widest cell, numbers right-aligned, the last
/// column left unpadded.
pub(crate) struct Table {
    head: Vec<(&'static str, bool)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// Columns by name; `true` right-aligns one (numbers).
    pub(crate) fn new(head: &[(&'static str, bool)]) -> Table {
        Table {
            head: head.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        // One line per row: a newline in a cell (an error text) would break the table.
        let cells = cells
            .into_iter()
            .map(|c| c.replace(|ch: char| ch.is_control(), " "))
            .collect();
        self.rows.push(cells);
    }

    /// The header and the rows, one line each.
    pub(crate) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.head.iter().map(|(h, _)| h.chars().count()).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let last = cells.len().saturating_sub(1);
            let mut out = String::new();
            for (i, c) in cells.iter().enumerate().take(self.head.len()) {
                if i > 0 {
                    out.push_str("  ");
                }
                let pad = widths[i].saturating_sub(c.chars().count());
                if self.head[i].1 {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(c);
                } else if i == last {
                    out.push_str(c);
                } else {
                    out.push_str(c);
                    out.push_str(&" ".repeat(pad));
                }
            }
            out.trim_end().to_string()
        };
        let mut out = line(self.head.iter().map(|(h, _)| *h).collect());
        for r in &self.rows {
            out.push('\n');
            out.push_str(&line(r.iter().map(String::as_str).collect()));
        }
        out
    }
}
