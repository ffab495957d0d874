//! The report of a load run: the figures and invariants as JSON, and the same as one
//! self-contained HTML page (inline SVG charts, no script, nothing fetched).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::analysis::{Invariant, percentile};

/// Push-to-live latency percentiles, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Pushes that went live.
    pub count: usize,
    /// Pushes that never did.
    pub never_live: usize,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Longest.
    pub max_ms: f64,
}

impl Latency {
    /// The percentiles of `values` (sorted here); `missing` never went live.
    pub fn of(values: &mut [Duration], missing: usize) -> Self {
        values.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Self {
            count: values.len(),
            never_live: missing,
            p50_ms: ms(percentile(values, 0.5)),
            p90_ms: ms(percentile(values, 0.9)),
            p99_ms: ms(percentile(values, 0.99)),
            max_ms: ms(values.last().copied().unwrap_or_default()),
        }
    }
}

/// How evenly a storm's waits were spread over tenants.
#[derive(Debug, Clone, Serialize)]
pub struct Fairness {
    /// Tenants measured.
    pub tenants: usize,
    /// The median tenant's wait from its push to live, in seconds.
    pub median_wait_s: f64,
    /// The longest, in seconds.
    pub longest_wait_s: f64,
    /// Longest over median.
    pub ratio: f64,
}

/// One bar of the latency histogram: pushes whose latency was at most `upto_ms` (and more
/// than the previous bar's).
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    /// Upper bound, milliseconds.
    pub upto_ms: f64,
    /// Pushes in it.
    pub count: u64,
}

/// Log-spaced buckets (four per power of ten) covering `values`.
pub fn histogram(values: &[Duration]) -> Vec<Bucket> {
    let ms: Vec<f64> = values.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    let Some(max) = ms.iter().copied().reduce(f64::max) else {
        return Vec::new();
    };
    let min = ms.iter().copied().reduce(f64::min).unwrap_or(max).max(0.1);
    let step = 10f64.powf(0.25);
    let mut bound = 10f64.powf((min.log10() * 4.0).floor() / 4.0);
    let mut out = Vec::new();
    loop {
        bound *= step;
        out.push(Bucket {
            upto_ms: (bound * 100.0).round() / 100.0,
            count: 0,
        });
        if bound >= max {
            break;
        }
    }
    for v in ms {
        let i = out
            .iter()
            .position(|b| v <= b.upto_ms)
            .unwrap_or(out.len() - 1);
        out[i].count += 1;
    }
    out
}

/// Everything a run measured and checked.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `steady`, `storm` or `chaos`.
    pub scenario: String,
    /// `embedded` or `aws`.
    pub backend: String,
    /// `queue` or `ingress`.
    pub via: String,
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// The settings it ran with.
    pub settings: BTreeMap<String, String>,
    /// Pushes accepted.
    pub pushes: u64,
    /// Seconds the pushes took to send.
    pub load_s: f64,
    /// Seconds from the first push to the last workflow live.
    pub total_s: f64,
    /// Pushes accepted per second while sending.
    pub events_per_s: f64,
    /// History entries written.
    pub transitions: u64,
    /// Transitions per second from the first push to the last workflow live.
    pub transitions_per_s: f64,
    /// Push-to-live latency.
    pub latency: Latency,
    /// AWS requests (SQS and DynamoDB) per transition, on the AWS backend.
    pub aws_requests_per_transition: Option<f64>,
    /// The largest peak resident set of any worker process, MiB.
    pub worker_peak_rss_mib: f64,
    /// Worker processes killed and started again (chaos).
    pub worker_restarts: u64,
    /// Failed workflows the load generator retried, as an operator would (chaos).
    pub operator_retries: u64,
    /// Storm only: the spread of per-tenant waits.
    pub fairness: Option<Fairness>,
    /// The invariants.
    pub invariants: Vec<Invariant>,
    /// Transitions per second over the run.
    pub transitions_series: Vec<u64>,
    /// Pushes sent per second over the run.
    pub pushes_series: Vec<u64>,
    /// The latency histogram.
    pub histogram: Vec<Bucket>,
}

impl Report {
    /// Whether every invariant held.
    pub fn ok(&self) -> bool {
        self.invariants.iter().all(|i| i.held)
    }

    /// The summary printed at the end of a run.
    pub fn text(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "loadgen {} on {} via {}: {} pushes in {:.1} s ({:.0} events/s); {} transitions in {:.1} s ({:.0} transitions/s)",
            self.scenario,
            self.backend,
            self.via,
            self.pushes,
            self.load_s,
            self.events_per_s,
            self.transitions,
            self.total_s,
            self.transitions_per_s
        );
        let l = &self.latency;
        let _ = writeln!(
            t,
            "push to live: p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} live, {} never)",
            l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.count, l.never_live
        );
        if let Some(r) = self.aws_requests_per_transition {
            let _ = writeln!(t, "AWS requests per transition: {r:.2}");
        }
        let _ = writeln!(
            t,
            "worker peak RSS: {:.1} MiB; worker restarts: {}; operator retries: {}",
            self.worker_peak_rss_mib, self.worker_restarts, self.operator_retries
        );
        if let Some(f) = &self.fairness {
            let _ = writeln!(
                t,
                "per-tenant wait over {} tenants: median {:.2} s, longest {:.2} s, ratio {:.2}",
                f.tenants, f.median_wait_s, f.longest_wait_s, f.ratio
            );
        }
        for i in &self.invariants {
            let _ = writeln!(
                t,
                "{} {}: {}",
                if i.held { "ok  " } else { "FAIL" },
                i.name,
                i.detail
            );
        }
        t
    }

    /// The report as one HTML page with inline SVG charts.
    pub fn html(&self) -> String {
        let mut h = String::new();
        let _ = write!(
            h,
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>loadgen {scenario}</title>\
             <style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:62em;color:#222}}\
             table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}\
             .ok{{color:#086b2c}}.fail{{color:#b00020;font-weight:bold}}svg{{background:#fafafa;border:1px solid #ddd}}\
             </style></head><body><h1>loadgen {scenario}: {verdict}</h1>",
            scenario = escape(&self.scenario),
            verdict = if self.ok() {
                "every invariant held"
            } else {
                "an invariant failed"
            }
        );
        let _ = write!(
            h,
            "<p>{} backend, pushes sent via {}, started {}.</p><table>",
            escape(&self.backend),
            escape(&self.via),
            escape(&self.started_at)
        );
        let l = &self.latency;
        let mut rows = vec![
            ("pushes", format!("{} in {:.1} s", self.pushes, self.load_s)),
            ("events/s", format!("{:.0}", self.events_per_s)),
            (
                "transitions",
                format!("{} in {:.1} s", self.transitions, self.total_s),
            ),
            ("transitions/s", format!("{:.0}", self.transitions_per_s)),
            (
                "push to live",
                format!(
                    "p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} never live)",
                    l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.never_live
                ),
            ),
            (
                "worker peak RSS",
                format!("{:.1} MiB", self.worker_peak_rss_mib),
            ),
            ("worker restarts", self.worker_restarts.to_string()),
            ("operator retries", self.operator_retries.to_string()),
        ];
        if let Some(r) = self.aws_requests_per_transition {
            rows.push(("AWS requests per transition", format!("{r:.2}")));
        }
        if let Some(f) = &self.fairness {
            rows.push((
                "per-tenant wait",
                format!(
                    "median {:.2} s, longest {:.2} s, ratio {:.2} over {} tenants",
                    f.median_wait_s, f.longest_wait_s, f.ratio, f.tenants
                ),
            ));
        }
        for (name, value) in rows {
            let _ = write!(h, "<tr><th>{name}</th><td>{}</td></tr>", escape(&value));
        }
        h.push_str("</table><h2>Invariants</h2><table>");
        for i in &self.invariants {
            let _ = write!(
                h,
                "<tr><td class=\"{}\">{}</td><th>{}</th><td>{}</td></tr>",
                if i.held { "ok" } else { "fail" },
                if i.held { "held" } else { "FAILED" },
                escape(i.name),
                escape(&i.detail)
            );
        }
        h.push_str("</table><h2>Throughput</h2>");
        h.push_str(&line_chart(&[
            ("transitions/s", "#1f5fa8", &self.transitions_series),
            ("pushes sent/s", "#d9822b", &self.pushes_series),
        ]));
        h.push_str("<h2>Push-to-live latency</h2>");
        h.push_str(&bar_chart(&self.histogram));
        h.push_str("<h2>Settings</h2><table>");
        for (k, v) in &self.settings {
            let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v));
        }
        h.push_str("</table></body></html>\n");
        h
    }
}

const W: f64 = 760.0;
const H: f64 = 260.0;
const PAD: f64 = 44.0;

/// Series over seconds as polylines, with axes and a legend.
fn line_chart(series: &[(&str, &str, &Vec<u64>)]) -> String {
    let len = series.iter().map(|s| s.2.len()).max().unwrap_or(0).max(2);
    let top = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let x = |i: usize| PAD + (W - 2.0 * PAD) * i as f64 / (len - 1) as f64;
    let y = |v: u64| H - PAD - (H - 2.0 * PAD) * v as f64 / top;
    let mut s = axes(&format!("{top:.0}"), "0 s", &format!("{} s", len - 1));
    for (n, (name, colour, values)) in series.iter().enumerate() {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect();
        let _ = write!(
            s,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\
             <text x=\"{:.0}\" y=\"{:.0}\" fill=\"{colour}\">{}</text>",
            points.join(" "),
            PAD + 8.0,
            PAD - 22.0 + 14.0 * n as f64,
            escape(name)
        );
    }
    s.push_str("</svg>");
    s
}

/// The latency histogram as bars, labelled by upper bound.
fn bar_chart(buckets: &[Bucket]) -> String {
    let top = buckets.iter().map(|b| b.count).max().unwrap_or(0).max(1) as f64;
    let n = buckets.len().max(1) as f64;
    let width = (W - 2.0 * PAD) / n;
    let mut s = axes(&format!("{top:.0}"), "", "");
    for (i, b) in buckets.iter().enumerate() {
        let height = (H - 2.0 * PAD) * b.count as f64 / top;
        let left = PAD + width * i as f64;
        let _ = write!(
            s,
            "<rect x=\"{left:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{height:.1}\" fill=\"#1f5fa8\">\
             <title>≤ {} ms: {}</title></rect>\
             <text x=\"{:.1}\" y=\"{:.0}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            H - PAD - height,
            (width - 2.0).max(1.0),
            b.upto_ms,
            b.count,
            left + width / 2.0,
            H - PAD + 14.0,
            short_ms(b.upto_ms)
        );
    }
    let _ = write!(
        s,
        "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">push-to-live latency (upper bound of each bar)</text></svg>",
        W - PAD,
        H - 8.0
    );
    s
}

fn axes(top: &str, left: &str, right: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\">\
         <line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{b}\" stroke=\"#888\"/>\
         <line x1=\"{PAD}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#888\"/>\
         <text x=\"{t}\" y=\"{PAD}\" text-anchor=\"end\" font-size=\"11\">{top}</text>\
         <text x=\"{t}\" y=\"{b}\" text-anchor=\"end\" font-size=\"11\">0</text>\
         <text x=\"{PAD}\" y=\"{l}\" font-size=\"11\">{left}</text>\
         <text x=\"{r}\" y=\"{l}\" text-anchor=\"end\" font-size=\"11\">{right}</text>",
        b = H - PAD,
        r = W - PAD,
        t = PAD - 4.0,
        l = H - PAD + 16.0,
        top = escape(top),
        left = escape(left),
        right = escape(right),
    )
}

fn short_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.1}s", ms / 1000.0)
    } else {
        format!("{ms:.0}ms")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(held: bool) -> Report {
        Report {
            scenario: "steady".into(),
            backend: "embedded".into(),
            via: "queue".into(),
            started_at: "2026-11-27T00:00:00Z".into(),
            settings: BTreeMap::from([("tenants".into(), "<10>".into())]),
            pushes: 10,
            load_s: 1.0,
            total_s: 2.0,
            events_per_s: 10.0,
            transitions: 40,
            transitions_per_s: 20.0,
            latency: Latency::default(),
            aws_requests_per_transition: None,
            worker_peak_rss_mib: 30.0,
            worker_restarts: 0,
            operator_retries: 0,
            fairness: None,
            invariants: vec![Invariant {
                name: "no event lost",
                held,
                detail: "x".into(),
            }],
            transitions_series: vec![5, 20, 15],
            pushes_series: vec![10],
            histogram: histogram(&[Duration::from_millis(120), Duration::from_millis(900)]),
        }
    }

    #[test]
    fn the_page_is_self_contained_and_escaped() {
        let page = report(true).html();
        assert!(page.contains("<svg"));
        assert!(page.contains("<polyline"));
        assert!(page.contains("<rect"));
        assert!(page.contains("&lt;10&gt;"), "settings escaped");
        assert!(!page.contains("<script"));
        assert!(!page.contains("src=\"http"), "nothing fetched");
        assert!(page.contains("every invariant held"));
        assert!(report(false).html().contains("an invariant failed"));
        assert!(!report(false).ok());
    }

    #[test]
    fn histogram_buckets_cover_every_value_once() {
        let values: Vec<Duration> = [3, 40, 41, 700, 5_000]
            .into_iter()
            .map(Duration::from_millis)
            .collect();
        let h = histogram(&values);
        assert_eq!(h.iter().map(|b| b.count).sum::<u64>(), 5);
        assert!(h.windows(2).all(|w| w[0].upto_ms < w[1].upto_ms));
        assert!(h.last().expect("bars").upto_ms >= 5_000.0);
        assert!(h[0].upto_ms >= 3.0);
        assert!(histogram(&[]).is_empty());
    }

    #[test]
    fn latency_percentiles_in_milliseconds() {
        let mut v: Vec<Duration> = (1..=10).map(|s| Duration::from_millis(s * 100)).collect();
        let l = Latency::of(&mut v, 2);
        assert_eq!(l.count, 10);
        assert_eq!(l.never_live, 2);
        assert_eq!(l.max_ms, 1000.0);
        assert_eq!(l.p50_ms, 600.0);
    }
}
