//! Output of the command-line tools: aligned tables and relative times for people, JSON for
//! scripts, and colour only where a person sees it.
//!
//! Data goes to stdout, messages to stderr. Colour (ANSI escapes) is used only when stdout is a
//! terminal, `NO_COLOR` is unset or empty and `TERM` is not `dumb`; so a pipe or a file never
//! receives escapes. Text that comes from outside (commit messages, activity errors) is
//! rendered with its control characters escaped, so it cannot move the cursor or forge colours.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;

pub use orchestrator::describe::short_duration;
use serde::Serialize;
use workflows::{State, StepStatus, Timestamp};

/// How results are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned tables with relative times, for people.
    #[default]
    Table,
    /// JSON with stable snake_case field names, for scripts.
    Json,
}

/// Whether colour may be used on stdout: it is a terminal, `NO_COLOR` is unset or empty, and
/// `TERM` is not `dumb`.
pub fn color_enabled() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let dumb = std::env::var_os("TERM").is_some_and(|v| v == "dumb");
    !no_color && !dumb && std::io::stdout().is_terminal()
}

/// How a cell is drawn when colour is enabled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Style {
    /// As it is.
    #[default]
    Plain,
    /// Bad news: failed, corrupt, refused.
    Red,
    /// Good news: live, done.
    Green,
    /// In progress or waiting.
    Yellow,
    /// Not important: skipped, decommissioned.
    Dim,
    /// Headings.
    Bold,
}

impl Style {
    fn code(self) -> Option<&'static str> {
        match self {
            Style::Plain => None,
            Style::Red => Some("31"),
            Style::Green => Some("32"),
            Style::Yellow => Some("33"),
            Style::Dim => Some("2"),
            Style::Bold => Some("1"),
        }
    }

    /// `text` in this style, with escapes only when `color` is on.
    pub fn paint(self, text: &str, color: bool) -> String {
        match self.code() {
            Some(code) if color => format!("\u{1b}[{code}m{text}\u{1b}[0m"),
            _ => text.to_owned(),
        }
    }
}

/// The style of a workflow state.
pub fn state_style(state: State) -> Style {
    match state {
        State::Live => Style::Green,
        State::Failed => Style::Red,
        State::Preparing | State::AwaitingApproval | State::RollingOut | State::Decommissioning => {
            Style::Yellow
        }
        State::Unprovisioned | State::Decommissioned => Style::Dim,
    }
}

/// The style of a step status.
pub fn step_style(status: StepStatus) -> Style {
    match status {
        StepStatus::Done => Style::Green,
        StepStatus::Failed => Style::Red,
        StepStatus::Running | StepStatus::RetryWait => Style::Yellow,
        StepStatus::Pending | StepStatus::Skipped => Style::Dim,
    }
}

/// `text` with control characters (newlines, escapes) written as escapes, so that text from
/// outside stays on its line and cannot drive the terminal.
pub fn sanitize(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// `text` with each line [`sanitize`]d: its line breaks stay, every other control character
/// is escaped.
fn sanitize_lines(text: &str) -> String {
    text.split('\n')
        .map(sanitize)
        .collect::<Vec<_>>()
        .join("\n")
}

/// One cell of a table: sanitized text and its style.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cell {
    text: String,
    style: Style,
}

impl Cell {
    /// A cell showing `text` (sanitized) in `style`.
    pub fn styled(text: impl AsRef<str>, style: Style) -> Self {
        Self {
            text: sanitize(text.as_ref()),
            style,
        }
    }

    /// The cell's text, without styling.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn width(&self) -> usize {
        self.text.chars().count()
    }
}

impl From<&str> for Cell {
    fn from(text: &str) -> Self {
        Cell::styled(text, Style::Plain)
    }
}

impl From<String> for Cell {
    fn from(text: String) -> Self {
        Cell::styled(text, Style::Plain)
    }
}

impl From<&String> for Cell {
    fn from(text: &String) -> Self {
        Cell::styled(text, Style::Plain)
    }
}

/// A table whose columns are aligned on the widest cell; the last column is not padded, so
/// lines carry no trailing blanks.
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<Cell>>,
    indent: usize,
}

impl Table {
    /// A table with a header line.
    pub fn new<I, H>(headers: I) -> Self
    where
        I: IntoIterator<Item = H>,
        H: Into<String>,
    {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
            indent: 0,
        }
    }

    /// A table without a header line (a block of `label  value` lines, for example).
    pub fn headless() -> Self {
        Self::default()
    }

    /// Indents every line by `n` spaces.
    pub fn indent(mut self, n: usize) -> Self {
        self.indent = n;
        self
    }

    /// Adds a row.
    pub fn row<I, C>(&mut self, cells: I)
    where
        I: IntoIterator<Item = C>,
        C: Into<Cell>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, one line per row (and the header), each ending in a newline.
    pub fn render(&self, color: bool) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for (i, h) in self.headers.iter().enumerate() {
            widths[i] = widths[i].max(h.chars().count());
        }
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.width());
            }
        }
        let mut out = String::new();
        if !self.headers.is_empty() {
            let cells: Vec<Cell> = self
                .headers
                .iter()
                .map(|h| Cell::styled(h, Style::Bold))
                .collect();
            self.line(&mut out, &cells, &widths, color);
        }
        for row in &self.rows {
            self.line(&mut out, row, &widths, color);
        }
        out
    }

    fn line(&self, out: &mut String, cells: &[Cell], widths: &[usize], color: bool) {
        let mut line = " ".repeat(self.indent);
        // Trailing empty cells would only add blanks.
        let used = cells
            .iter()
            .rposition(|c| !c.text.is_empty())
            .map_or(0, |i| i + 1);
        for (i, cell) in cells[..used].iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(&cell.style.paint(&cell.text, color));
            if i + 1 < used {
                line.push_str(&" ".repeat(widths[i].saturating_sub(cell.width())));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// `at` relative to `now`: `3m ago`, `in 20s`, `just now`.
pub fn relative(at: Timestamp, now: Timestamp) -> String {
    if at <= now {
        let d = now.since(at);
        if d < Duration::from_secs(1) {
            "just now".to_owned()
        } else {
            format!("{} ago", short_duration(d))
        }
    } else {
        format!("in {}", short_duration(at.since(now)))
    }
}

/// `at` as an absolute UTC time to the second: `2027-01-15 08:00:01`.
pub fn absolute(at: Timestamp) -> String {
    jiff::Timestamp::from(at)
        .strftime("%Y-%m-%d %H:%M:%S")
        .to_string()
}

/// Where a command writes: the format, whether colour is on, the time relative times are
/// relative to, and the two streams.
pub struct Printer<'a> {
    /// Table or JSON.
    pub format: Format,
    /// Whether cells may be coloured (never in JSON).
    pub color: bool,
    /// "Now", for relative times.
    pub now: Timestamp,
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
}

impl std::fmt::Debug for Printer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Printer")
            .field("format", &self.format)
            .field("color", &self.color)
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

impl<'a> Printer<'a> {
    /// A printer writing data to `out` and messages to `err`.
    pub fn new(
        format: Format,
        color: bool,
        now: Timestamp,
        out: &'a mut dyn Write,
        err: &'a mut dyn Write,
    ) -> Self {
        Self {
            format,
            color: color && format == Format::Table,
            now,
            out,
            err,
        }
    }

    /// Whether the output is JSON.
    pub fn is_json(&self) -> bool {
        self.format == Format::Json
    }

    /// Writes `value` as pretty-printed JSON and a newline.
    pub fn json<T: Serialize + ?Sized>(&mut self, value: &T) -> std::io::Result<()> {
        serde_json::to_writer_pretty(&mut *self.out, value)?;
        self.out.write_all(b"\n")
    }

    /// Writes `value` as one line of compact JSON (JSON Lines, for streams).
    pub fn json_line<T: Serialize + ?Sized>(&mut self, value: &T) -> std::io::Result<()> {
        serde_json::to_writer(&mut *self.out, value)?;
        self.out.write_all(b"\n")
    }

    /// Writes `table`.
    pub fn table(&mut self, table: &Table) -> std::io::Result<()> {
        self.out.write_all(table.render(self.color).as_bytes())
    }

    /// Writes `text` and a newline as data; control characters other than its line breaks are
    /// escaped (see [`sanitize`]).
    pub fn line(&mut self, text: &str) -> std::io::Result<()> {
        writeln!(self.out, "{}", sanitize_lines(text))
    }

    /// Writes `text` and a newline as a message (stderr), escaped as [`Printer::line`] does.
    pub fn note(&mut self, text: &str) -> std::io::Result<()> {
        writeln!(self.err, "{}", sanitize_lines(text))
    }

    /// `text` in `style` if colour is on.
    pub fn paint(&self, text: &str, style: Style) -> String {
        style.paint(&sanitize(text), self.color)
    }

    /// `at` relative to now.
    pub fn ago(&self, at: Timestamp) -> String {
        relative(at, self.now)
    }

    /// Flushes data and messages.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        self.err.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_visible_width_and_carry_no_trailing_blanks() {
        let mut t = Table::new(["KEY", "STATE", "NOTE"]);
        t.row([
            Cell::from("acme#dev"),
            Cell::styled("live", Style::Green),
            Cell::from(""),
        ]);
        t.row([
            Cell::from("globex#production"),
            Cell::styled("failed", Style::Red),
            Cell::from("corrupt"),
        ]);
        let plain = t.render(false);
        assert_eq!(
            plain,
            "KEY                STATE   NOTE\n\
             acme#dev           live\n\
             globex#production  failed  corrupt\n"
        );
        let colored = t.render(true);
        assert!(colored.contains("\u{1b}[32mlive\u{1b}[0m"));
        let strip = |s: &str| s.replace("\u{1b}[32m", "").replace("\u{1b}[31m", "");
        let strip = |s: &str| strip(s).replace("\u{1b}[1m", "").replace("\u{1b}[0m", "");
        assert_eq!(strip(&colored), plain, "escapes do not disturb alignment");
    }

    #[test]
    fn headless_tables_indent() {
        let mut t = Table::headless().indent(2);
        t.row(["image", "ami-1"]);
        t.row(["database endpoint", "db:3306"]);
        assert_eq!(
            t.render(false),
            "  image              ami-1\n  database endpoint  db:3306\n"
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(sanitize("plain"), "plain");
        assert_eq!(sanitize("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        assert_eq!(Cell::from("x\ty").text(), "x\\ty");
        assert_eq!(
            sanitize_lines("one\ntwo \u{1b}]0;title\u{7}\r"),
            "one\ntwo \\u{1b}]0;title\\u{7}\\r"
        );
    }

    #[test]
    fn relative_times_read_naturally() {
        let now = Timestamp::from_unix_millis(1_800_000_000_000);
        let before = |s: u64| Timestamp::from_unix_millis(1_800_000_000_000 - 1000 * s as i64);
        assert_eq!(relative(now, now), "just now");
        assert_eq!(relative(before(42), now), "42s ago");
        assert_eq!(relative(before(180), now), "3m ago");
        assert_eq!(relative(before(7200), now), "2h ago");
        assert_eq!(relative(before(7500), now), "2h 5m ago");
        assert_eq!(relative(before(3 * 86_400), now), "3d ago");
        assert_eq!(relative(before(90 * 86_400), now), "3mo ago");
        assert_eq!(relative(before(800 * 86_400), now), "2y ago");
        assert_eq!(
            relative(now.saturating_add(Duration::from_secs(20)), now),
            "in 20s"
        );
        assert_eq!(absolute(now), "2027-01-15 08:00:00");
    }

    #[test]
    fn json_never_gets_colour() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let p = Printer::new(Format::Json, true, Timestamp::EPOCH, &mut out, &mut err);
        assert!(!p.color);
        assert_eq!(p.paint("live", Style::Green), "live");
    }
}
