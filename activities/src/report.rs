//! What a builder or an app instance reports about the scripts it ran: the report's text, the
//! bash that writes it, and how a reconciler reads it back.
//!
//! An instance runs each part of its start (fetching the artifact, each provisioning script,
//! `install.sh`) through the bash function `run_step` ([`runner_script`]), which appends one
//! line per part to the report file: `ok NAME`, or `failed CODE NAME` followed by the last
//! [`TAIL_LINES`] lines of the part's output, each prefixed with `| ` and cut to
//! [`LINE_BYTES`] bytes. The first failure ends the run. The instance then uploads the file to
//! the artifact bucket under a key the reconciler chose, ending in [`OK_SUFFIX`] or
//! [`FAILED_SUFFIX`], so that listing the keys tells the outcome without reading any.
//!
//! A report comes from an instance that runs the tenant's scripts, so it is input like any
//! other: [`Report::parse`] accepts any text, keeps what it recognises and bounds what it keeps.

use std::fmt::Write as _;

/// The first line of a report.
pub const HEADER: &str = "# tenant-host script report v1";

/// How many of the last lines of a failed part's output a report keeps.
pub const TAIL_LINES: usize = 30;

/// How many bytes of each of those lines it keeps.
pub const LINE_BYTES: usize = 300;

/// The key suffix of a report whose every part succeeded.
pub const OK_SUFFIX: &str = ".ok.log";

/// The key suffix of a report with a failed part.
pub const FAILED_SUFFIX: &str = ".failed.log";

/// How many bytes of a report a reconciler reads at most.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// Bash defining `run_step NAME COMMAND...`: runs the command with its output appended to
/// `log` (the instance's full log), and records the outcome in `report` (which it starts
/// empty, with [`HEADER`]). It returns the command's exit code, so that `|| finish` ends the
/// start at the first failure.
pub fn runner_script(report: &str, log: &str) -> String {
    format!(
        r#"report_file={report}
printf '%s\n' '{HEADER}' > "$report_file"
run_step() {{
  local name="$1"; shift
  local out; out="$(mktemp)"
  local code=0
  "$@" >"$out" 2>&1 </dev/null || code=$?
  cat "$out" >> {log}
  if [ "$code" -eq 0 ]; then
    printf 'ok %s\n' "$name" >> "$report_file"
  else
    printf 'failed %s %s\n' "$code" "$name" >> "$report_file"
    tail -n {TAIL_LINES} "$out" | cut -b 1-{LINE_BYTES} | sed 's/^/| /' >> "$report_file"
  fi
  rm -f "$out"
  return "$code"
}}
"#
    )
}

/// One part of an instance's start that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// What ran: `fetch`, `environment`, a script's path in the artifact.
    pub name: String,
    /// Its exit code (0 for success).
    pub code: i32,
}

/// A report read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The parts in the order they ran.
    pub parts: Vec<Part>,
    /// The last lines of the failed part's output (empty when nothing failed).
    pub tail: Vec<String>,
}

impl Report {
    /// Reads a report's text. Lines that are not part of the format are skipped; at most
    /// [`TAIL_LINES`] tail lines of at most [`LINE_BYTES`] bytes each are kept, and at most
    /// 1,000 parts.
    pub fn parse(text: &str) -> Self {
        let mut report = Report::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("| ") {
                if report.failed().is_some() {
                    report.tail.push(truncate(rest, LINE_BYTES).to_owned());
                }
            } else if let Some(name) = line.strip_prefix("ok ") {
                report.push(name, 0);
            } else if let Some(rest) = line.strip_prefix("failed ") {
                let (code, name) = rest.split_once(' ').unwrap_or((rest, "?"));
                report.push(name, code.trim().parse().unwrap_or(-1));
            }
        }
        let extra = report.tail.len().saturating_sub(TAIL_LINES);
        report.tail.drain(..extra);
        report
    }

    fn push(&mut self, name: &str, code: i32) {
        if self.parts.len() < 1_000 && self.failed().is_none() {
            self.parts.push(Part {
                name: truncate(name, 256).to_owned(),
                code,
            });
        }
    }

    /// The part that failed, if one did (the report's last part).
    pub fn failed(&self) -> Option<&Part> {
        self.parts.last().filter(|p| p.code != 0)
    }

    /// The failure in words for `wfctl show` and history: which part of `what` failed with which
    /// code, then its last lines indented; `None` when nothing failed.
    pub fn failure(&self, what: &str) -> Option<String> {
        let part = self.failed()?;
        let mut text = format!("{} exited {} on {what}", part.name, part.code);
        if self.tail.is_empty() {
            text.push_str("; it printed nothing");
        } else {
            text.push_str("; its last lines:");
            for line in &self.tail {
                let _ = write!(text, "\n  {line}");
            }
        }
        Some(text)
    }

    /// The parts that ran, in words: `fetch, provision/10-base.sh, ...`.
    pub fn summary(&self) -> String {
        let names: Vec<&str> = self.parts.iter().map(|p| p.name.as_str()).collect();
        if names.is_empty() {
            "nothing ran".to_owned()
        } else {
            names.join(", ")
        }
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs `steps` after the runner in bash in a fresh directory and returns the report's
    /// text and the full log's.
    fn run(steps: &str) -> (String, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = dir.path().join("report");
        let log = dir.path().join("log");
        let script = format!(
            "set -uo pipefail\ncd {}\n{}{steps}\ntrue",
            dir.path().display(),
            runner_script(&report.display().to_string(), &log.display().to_string())
        );
        let status = std::process::Command::new("bash")
            .arg("-c")
            .arg(script)
            .status()
            .expect("bash runs");
        assert!(status.success());
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
        (read(&report), read(&log))
    }

    #[test]
    fn a_run_that_passes_lists_its_parts() {
        let (text, log) = run("run_step one echo hello && run_step two true\n");
        let report = Report::parse(&text);
        assert!(text.starts_with(HEADER));
        assert_eq!(report.failed(), None);
        assert_eq!(report.summary(), "one, two");
        assert_eq!(report.failure("builder i-1"), None);
        assert!(log.contains("hello"), "the full log keeps the output");
    }

    #[test]
    fn the_first_failure_ends_the_run_with_its_code_and_last_lines() {
        let steps = "printf 'for i in $(seq 1 50); do echo line $i; done; echo oops >&2; exit 3' > bad.sh\n\
                     run_step fetch true && run_step provision/20-app.sh bash bad.sh && run_step never true\n";
        let (text, _) = run(steps);
        let report = Report::parse(&text);
        let failed = report.failed().expect("a failure");
        assert_eq!(failed.name, "provision/20-app.sh");
        assert_eq!(failed.code, 3);
        assert_eq!(report.parts.len(), 2, "nothing ran after it: {text}");
        assert_eq!(report.tail.len(), TAIL_LINES);
        assert_eq!(report.tail.last().map(String::as_str), Some("oops"));
        assert_eq!(report.tail[0], "line 22");
        let message = report.failure("builder i-1").expect("message");
        assert!(
            message.starts_with("provision/20-app.sh exited 3 on builder i-1; its last lines:"),
            "{message}"
        );
        assert!(message.ends_with("\n  oops"), "{message}");
    }

    #[test]
    fn long_lines_are_cut() {
        let (text, _) = run("run_step long bash -c 'printf \"%0500d\\n\" 7; exit 1'\n");
        let report = Report::parse(&text);
        assert_eq!(report.tail.len(), 1);
        assert_eq!(report.tail[0].len(), LINE_BYTES);
    }

    proptest! {
        #[test]
        fn any_text_parses_within_bounds(text in ".{0,4000}") {
            let report = Report::parse(&text);
            prop_assert!(report.tail.len() <= TAIL_LINES);
            prop_assert!(report.tail.iter().all(|l| l.len() <= LINE_BYTES));
            prop_assert!(report.parts.iter().filter(|p| p.code != 0).count() <= 1);
        }
    }
}
