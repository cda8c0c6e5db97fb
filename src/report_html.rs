//! Self-contained HTML (and Markdown) views of `report.json` (schema `compress.report/2`, read as untyped JSON so that older reports render too).
//!
//! Everything here works on a [`serde_json::Value`], so a report read back from disk renders
//! as well as a fresh one, and older or partial reports render what they have: every field is
//! optional. The page has no external references at all (inline CSS, hand-written inline SVG,
//! no scripts, no fonts or images from elsewhere) and every piece of text from the report is
//! HTML-escaped.
//!
//! * [`render_html`]: one page per run for a release reviewer: header, summary table base vs
//!   compressed (perplexity, zero-shot tasks, size, bits per weight, sparsity, compression
//!   ratio, MCR), per-linear charts, timing and memory, warnings, the pipeline as run.
//! * [`render_compare_markdown`] / [`render_compare_html`]: several runs side by side, the best
//!   value of each row in bold.
//!
//! Visual check (not part of `cargo test`; CI has no Chromium): write a page to
//! `/tmp/report.html`, then
//!
//! ```text
//! chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
//!   --disable-background-networking --disable-component-update --disable-sync \
//!   --user-data-dir=$(mktemp -d) --screenshot=/tmp/report.png --window-size=1280,2400 \
//!   file:///tmp/report.html
//! ```

use serde_json::Value;
use std::fmt::Write as _;

// ------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------

/// HTML-escape text (also safe inside attribute values).
pub fn escape_html(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

fn esc(s: &str) -> String {
    escape_html(s)
}

/// Markdown table cell: escape pipes and fold newlines.
fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut cur = v;
    for k in path {
        cur = cur.get(*k)?;
    }
    if cur.is_null() {
        None
    } else {
        Some(cur)
    }
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    at(v, path)
        .and_then(|x| x.as_f64())
        .filter(|x| x.is_finite())
}

/// A scalar as text (strings as they are, numbers and booleans printed).
fn text(v: &Value, path: &[&str]) -> Option<String> {
    match at(v, path)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        other => Some(other.to_string()),
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn fmt_bytes(b: f64) -> String {
    const K: f64 = 1024.0;
    if b >= K * K * K {
        format!("{:.2} GiB", b / (K * K * K))
    } else if b >= K * K {
        format!("{:.2} MiB", b / (K * K))
    } else if b >= K {
        format!("{:.1} KiB", b / K)
    } else {
        format!("{b:.0} B")
    }
}

fn fmt_secs(s: f64) -> String {
    if s >= 100.0 {
        format!("{s:.1} s")
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.3} s")
    }
}

fn fmt_int(n: f64) -> String {
    let s = format!("{:.0}", n.abs());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

fn fmt_ppl(p: f64) -> String {
    format!("{p:.4}")
}

fn fmt_pct_signed(p: f64) -> String {
    format!("{p:+.3} %")
}

/// Compact general number: fixed for "ordinary" magnitudes, scientific otherwise.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.3e}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.4}")
    }
}

/// Bits of one element of a checkpoint dtype (`BF16` → 16).
fn dtype_bits(dtype: &str) -> Option<f64> {
    let d = dtype.to_ascii_uppercase();
    let digits: String = d.chars().filter(|c| c.is_ascii_digit()).collect();
    let b: f64 = digits.get(..digits.len().min(2))?.parse().ok()?;
    if d.starts_with("F") || d.starts_with("BF") || d.starts_with("I") || d.starts_with("U") {
        Some(b)
    } else {
        None
    }
}

/// Short name of a linear for chart labels: `self_attn.q_proj` → `q`.
fn short_linear(name: &str) -> String {
    let last = name.rsplit('.').next().unwrap_or(name);
    last.strip_suffix("_proj").unwrap_or(last).to_string()
}

const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#9c755f",
    "#ff9da7", "#bab0ac",
];

// ------------------------------------------------------------------------------------------
// Report facts shared by the single-run page and the comparison
// ------------------------------------------------------------------------------------------

struct Dataset {
    name: String,
    file: Option<String>,
    before: Option<f64>,
    after: Option<f64>,
    delta_pct: Option<f64>,
    windows: Option<f64>,
    tokens: Option<f64>,
}

fn datasets(r: &Value) -> Vec<Dataset> {
    let Some(Value::Object(m)) = at(r, &["eval"]) else {
        return vec![];
    };
    let mut out = vec![];
    for (k, d) in m {
        if !d.is_object() {
            continue;
        }
        // A task map nested under `eval` (older layouts) is not a perplexity data set.
        let has = |f: &str| d.get(f).is_some();
        if !(has("before") || has("after") || has("delta_pct") || has("perplexity")) {
            continue;
        }
        let before = num(d, &["before", "perplexity"]);
        let after = num(d, &["after", "perplexity"]).or_else(|| num(d, &["perplexity"]));
        let delta_pct = num(d, &["delta_pct"]).or(match (before, after) {
            (Some(b), Some(a)) if b != 0.0 => Some(100.0 * (a - b) / b),
            _ => None,
        });
        let side = d.get("after").or(d.get("before"));
        out.push(Dataset {
            name: k.clone(),
            file: text(d, &["file"]),
            before,
            after,
            delta_pct,
            windows: side.and_then(|s| num(s, &["windows"])),
            tokens: side.and_then(|s| num(s, &["tokens"])),
        });
    }
    out
}

struct TaskSide {
    value: f64,
    stderr: Option<f64>,
}

struct TaskMetric {
    task: String,
    metric: String,
    n: Option<f64>,
    before: Option<TaskSide>,
    after: Option<TaskSide>,
}

fn is_lower_better_metric(metric: &str) -> bool {
    let m = metric.to_ascii_lowercase();
    m.contains("perplexity") || m.contains("ppl") || m.contains("loss") || m.contains("nll")
}

/// Accuracy-like metrics in [0, 1] are shown as percentages.
fn is_fraction_metric(metric: &str) -> bool {
    !is_lower_better_metric(metric)
}

fn tasks_map(r: &Value) -> Option<&serde_json::Map<String, Value>> {
    at(r, &["tasks"])
        .and_then(|t| t.as_object())
        .or_else(|| at(r, &["eval", "tasks"]).and_then(|t| t.as_object()))
}

fn task_metrics(r: &Value) -> Vec<TaskMetric> {
    let Some(m) = tasks_map(r) else {
        return vec![];
    };
    let mut out = vec![];
    for (task, t) in m {
        if !t.is_object() {
            continue;
        }
        // Metric names: acc, acc_norm first, then the rest in report order.
        let mut names: Vec<String> = vec![];
        for side in ["before", "after"] {
            if let Some(Value::Object(ms)) = at(t, &[side, "metrics"]) {
                for k in ms.keys() {
                    if !names.contains(k) {
                        names.push(k.clone());
                    }
                }
            }
        }
        let rank = |n: &str| match n {
            "acc" => 0,
            "acc_norm" => 1,
            _ => 2,
        };
        names.sort_by_key(|n| rank(n));
        let n = num(t, &["after", "n"]).or_else(|| num(t, &["before", "n"]));
        for metric in names {
            let side = |s: &str| {
                num(t, &[s, "metrics", &metric]).map(|value| TaskSide {
                    value,
                    stderr: num(t, &[s, "stderr", &metric]),
                })
            };
            out.push(TaskMetric {
                task: task.clone(),
                metric: metric.clone(),
                n,
                before: side("before"),
                after: side("after"),
            });
        }
    }
    out
}

fn fmt_task_value(metric: &str, s: &TaskSide) -> String {
    if is_fraction_metric(metric) {
        match s.stderr {
            Some(e) => format!("{:.2} ± {:.2} %", 100.0 * s.value, 100.0 * e),
            None => format!("{:.2} %", 100.0 * s.value),
        }
    } else {
        let f = |v: f64| {
            if metric.contains("perplexity") {
                fmt_ppl(v)
            } else {
                fmt_num(v)
            }
        };
        match s.stderr {
            Some(e) => format!("{} ± {}", f(s.value), f(e)),
            None => f(s.value),
        }
    }
}

fn size_orig(r: &Value) -> Option<f64> {
    num(r, &["model", "size_bytes"])
}

fn size_comp(r: &Value) -> Option<f64> {
    num(r, &["output", "size_bytes"])
}

fn compression_ratio(r: &Value) -> Option<f64> {
    num(r, &["output", "compression_ratio"]).or(match (size_orig(r), size_comp(r)) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    })
}

fn sparsity(r: &Value) -> Option<f64> {
    num(r, &["output", "sparsity"]).or_else(|| num(r, &["summary", "sparsity"]))
}

fn fmt_sparsity(s: f64) -> String {
    // Stored as a fraction; tolerate percentages.
    let p = if s <= 1.0 { 100.0 * s } else { s };
    format!("{p:.2} %")
}

enum McrSource {
    Reported,
    Computed { dataset: String },
}

/// Model compression rate (size_orig/size_comp) × (perf_comp/perf_orig): `summary.mcr` when
/// the report has it, else computed with perf = 1/perplexity of the first data set.
fn mcr(r: &Value) -> Option<(f64, McrSource)> {
    let reported = num(r, &["summary", "mcr"]).or_else(|| num(r, &["summary", "mcr", "value"]));
    if let Some(m) = reported {
        return Some((m, McrSource::Reported));
    }
    let ratio = compression_ratio(r)?;
    let d = datasets(r)
        .into_iter()
        .find(|d| d.before.is_some() && d.after.is_some())?;
    let (b, a) = (d.before?, d.after?);
    if a <= 0.0 || b <= 0.0 {
        return None;
    }
    Some((ratio * (b / a), McrSource::Computed { dataset: d.name }))
}

fn warnings(r: &Value) -> Vec<String> {
    match at(r, &["warnings"]) {
        Some(Value::Array(a)) => a.iter().map(value_text).collect(),
        Some(other) => vec![value_text(other)],
        None => vec![],
    }
}

// ------------------------------------------------------------------------------------------
// CSS
// ------------------------------------------------------------------------------------------

const CSS: &str = r#"
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#ffffff; --soft:#f6f8fa;
  --accent:#0969da; --good:#1a7f37; --bad:#b4232c; --warn-bg:#fff8c5; --warn-line:#d4a72c; }
* { box-sizing: border-box; }
body { margin:0; background:var(--soft); color:var(--fg);
  font-family: -apple-system, BlinkMacSystemFont, "Segoe UI", Roboto, "Helvetica Neue", Arial,
    "Noto Sans", "Liberation Sans", sans-serif;
  font-size:15px; line-height:1.5; }
main { max-width:1200px; margin:0 auto; padding:24px 28px 48px; background:var(--bg);
  min-height:100vh; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:19px; margin:32px 0 10px; padding-bottom:4px; border-bottom:1px solid var(--line); }
h3 { font-size:15px; margin:18px 0 6px; }
.sub { color:var(--muted); margin:0 0 14px; word-break:break-all; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono",
  monospace; font-size:13px; }
dl.meta { display:grid; grid-template-columns: max-content 1fr max-content 1fr; gap:2px 18px;
  margin:0; }
dl.meta dt { color:var(--muted); }
dl.meta dd { margin:0; word-break:break-all; }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin:18px 0 6px; }
.card { flex:1 1 150px; border:1px solid var(--line); border-radius:8px; padding:10px 14px;
  background:var(--bg); }
.card .k { color:var(--muted); font-size:12px; letter-spacing:.02em; }
.card .v { font-size:21px; font-weight:600; white-space:nowrap; }
.card .d { color:var(--muted); font-size:12px; }
table { border-collapse:collapse; width:100%; margin:6px 0; font-variant-numeric: tabular-nums; }
th, td { border-bottom:1px solid var(--line); padding:6px 10px; text-align:left;
  vertical-align:top; }
th { background:var(--soft); font-weight:600; }
td.n, th.n { text-align:right; white-space:nowrap; }
tr.group td { background:#eef2f6; font-weight:600; color:var(--muted); font-size:13px;
  padding:4px 10px; }
.good { color:var(--good); }
.bad { color:var(--bad); }
.muted { color:var(--muted); }
td.best { background:#dafbe1; }
.warnings { border:1px solid var(--warn-line); background:var(--warn-bg); border-radius:8px;
  padding:8px 14px 8px 34px; margin:8px 0; }
.warnings li { margin:3px 0; }
.ok { border:1px solid #aceebb; background:#dafbe1; border-radius:8px; padding:8px 14px;
  margin:8px 0; }
pre { background:var(--soft); border:1px solid var(--line); border-radius:6px; padding:12px;
  overflow:auto; }
figure { margin:10px 0 22px; }
figcaption { color:var(--muted); font-size:13px; margin-top:2px; }
svg { display:block; width:100%; height:auto; }
svg text { font-family: inherit; fill:#3d444d; }
svg .axis { stroke:#8c959f; stroke-width:1; }
svg .grid { stroke:#e3e7eb; stroke-width:1; }
svg .band { fill:#f3f5f8; }
svg rect.bar:hover { opacity:.65; }
.legend { display:flex; flex-wrap:wrap; gap:4px 14px; font-size:13px; color:var(--muted);
  margin:2px 0 0 4px; }
.legend span.sw { display:inline-block; width:11px; height:11px; border-radius:2px;
  margin-right:5px; vertical-align:-1px; }
details summary { cursor:pointer; color:var(--accent); margin:6px 0; }
footer { margin-top:36px; color:var(--muted); font-size:13px; border-top:1px solid var(--line);
  padding-top:10px; }
footer p { margin:4px 0; }
"#;

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}</main>\n</body>\n</html>\n",
        esc(title)
    )
}

// ------------------------------------------------------------------------------------------
// SVG charts
// ------------------------------------------------------------------------------------------

struct Bar {
    group: String,
    label: String,
    value: Option<f64>,
    color: &'static str,
    title: String,
}

#[derive(Clone, Copy, PartialEq)]
enum Scale {
    Linear,
    Log,
}

/// 1, 2 or 5 × 10^k at or above `x / 5`: a tick step giving about five ticks up to `x`.
fn nice_step(x: f64) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    let raw = x / 5.0;
    let p = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= raw {
            return m * p;
        }
    }
    10.0 * p
}

/// A tick label with as many decimals as the tick step needs (20 not 20.000; 0.25 with 0.05).
fn fmt_tick(v: f64, step: f64) -> String {
    if step >= 1e5 {
        return format!("{v:.1e}");
    }
    let dec = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil().max(0.0) as usize
    };
    let v = if v.abs() < step * 1e-9 { 0.0 } else { v };
    format!("{v:.dec$}")
}

fn fmt_decade(e: i32) -> String {
    match e {
        0 => "1".into(),
        1 => "10".into(),
        2 => "100".into(),
        _ => format!("1e{e}"),
    }
}

/// Vertical bar chart, bars grouped (e.g. by layer) with alternating bands under the groups.
fn bar_chart_svg(
    y_label: &str,
    x_label: &str,
    bars: &[Bar],
    scale: Scale,
    tick_fmt: Option<&dyn Fn(f64) -> String>,
) -> String {
    let w = 1140.0;
    let (ml, mr, mt) = (74.0, 16.0, 14.0);
    let show_labels = bars.len() <= 120;
    let label_h = if show_labels {
        let longest = bars
            .iter()
            .map(|b| b.label.chars().count())
            .max()
            .unwrap_or(0);
        (longest as f64 * 6.2 + 10.0).min(70.0)
    } else {
        4.0
    };
    let mb = label_h + 42.0;
    let ph = 230.0;
    let h = mt + ph + mb;
    let pw = w - ml - mr;

    let vals: Vec<f64> = bars
        .iter()
        .filter_map(|b| b.value)
        .filter(|v| scale == Scale::Linear || *v > 0.0)
        .collect();
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{}\" preserveAspectRatio=\"xMidYMid meet\">",
        esc(y_label)
    );
    if vals.is_empty() {
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no values</text></svg>",
            w / 2.0,
            h / 2.0
        );
        return s;
    }
    let vmax = vals.iter().cloned().fold(f64::MIN, f64::max);
    let vmin = vals.iter().cloned().fold(f64::MAX, f64::min);

    // y mapping
    let (lo, hi, ticks): (f64, f64, Vec<(f64, String)>) = match scale {
        Scale::Log => {
            let mut a = vmin.log10().floor() as i32;
            let mut b = vmax.log10().ceil() as i32;
            if a == b {
                a -= 1;
                b += 0;
            }
            if b - a < 2 {
                b = a + 2;
            }
            let step = ((b - a) as f64 / 8.0).ceil().max(1.0) as i32;
            let ticks = (a..=b)
                .step_by(step as usize)
                .map(|e| (e as f64, fmt_decade(e)))
                .collect();
            (a as f64, b as f64, ticks)
        }
        Scale::Linear => {
            let top = vmax.max(0.0);
            let step = nice_step(if top > 0.0 { top } else { 1.0 });
            let hi = (top / step).ceil().max(1.0) * step;
            let lo = vmin.min(0.0);
            let lo = if lo < 0.0 {
                (lo / step).floor() * step
            } else {
                0.0
            };
            let mut ticks = vec![];
            let mut t = lo;
            while t <= hi + step * 1e-9 {
                ticks.push((
                    t,
                    tick_fmt.map(|f| f(t)).unwrap_or_else(|| fmt_tick(t, step)),
                ));
                t += step;
            }
            (lo, hi, ticks)
        }
    };
    let yv = |v: f64| -> f64 {
        let t = match scale {
            Scale::Log => v.log10(),
            Scale::Linear => v,
        };
        mt + ph * (1.0 - (t - lo) / (hi - lo))
    };
    let ytick = |t: f64| mt + ph * (1.0 - (t - lo) / (hi - lo));

    // x layout: slots with a gap between groups.
    let mut groups: Vec<(String, usize, usize)> = vec![]; // name, first, last
    for (i, b) in bars.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if g.0 == b.group => g.2 = i,
            _ => groups.push((b.group.clone(), i, i)),
        }
    }
    let gap = 0.9;
    let slots = bars.len() as f64 + gap * (groups.len().saturating_sub(1)) as f64;
    let slot = pw / slots;
    let mut xs = Vec::with_capacity(bars.len());
    {
        let mut x = ml;
        let mut gi = 0;
        for (i, _) in bars.iter().enumerate() {
            if gi + 1 < groups.len() && i == groups[gi + 1].1 {
                gi += 1;
                x += gap * slot;
            }
            xs.push(x);
            x += slot;
        }
    }

    // group bands
    for (gi, (name, a, b)) in groups.iter().enumerate() {
        let x0 = xs[*a] - 0.45 * gap * slot;
        let x1 = xs[*b] + slot + 0.45 * gap * slot;
        if gi % 2 == 0 {
            let _ = write!(
                s,
                "<rect class=\"band\" x=\"{x0:.1}\" y=\"{mt}\" width=\"{:.1}\" height=\"{ph}\"/>",
                x1 - x0
            );
        }
        let gl = if groups.len() > 16 {
            name.trim_start_matches("layer ").to_string()
        } else {
            name.clone()
        };
        let fs = if groups.len() > 40 { 9 } else { 11 };
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"{fs}\">{}</text>",
            (x0 + x1) / 2.0,
            mt + ph + label_h + 16.0,
            esc(&gl)
        );
    }
    // grid + y ticks
    for (t, lab) in &ticks {
        let y = ytick(*t);
        let _ = write!(
            s,
            "<line class=\"grid\" x1=\"{ml}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\">{}</text>",
            ml + pw,
            ml - 6.0,
            y + 4.0,
            esc(lab)
        );
    }
    if scale == Scale::Log {
        // minor ticks at 2..9 × 10^k
        let (a, b) = (lo as i32, hi as i32);
        for e in a..b {
            for m in 2..10 {
                let y = yv(m as f64 * 10f64.powi(e));
                let _ = write!(
                    s,
                    "<line class=\"axis\" x1=\"{:.1}\" x2=\"{ml}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>",
                    ml - 3.0
                );
            }
        }
    }
    // bars
    let base_y = match scale {
        Scale::Log => mt + ph,
        Scale::Linear => ytick(0.0),
    };
    let bw = (slot * 0.78).max(1.0);
    for (i, b) in bars.iter().enumerate() {
        let x = xs[i] + (slot - bw) / 2.0;
        if let Some(v) = b.value.filter(|v| scale == Scale::Linear || *v > 0.0) {
            let y = yv(v).clamp(mt, mt + ph);
            let (y0, hh) = if y <= base_y {
                (y, base_y - y)
            } else {
                (base_y, y - base_y)
            };
            let _ = write!(
                s,
                "<rect class=\"bar\" x=\"{x:.2}\" y=\"{y0:.2}\" width=\"{bw:.2}\" height=\"{:.2}\" fill=\"{}\"><title>{}</title></rect>",
                hh.max(0.5),
                b.color,
                esc(&b.title)
            );
        } else {
            // No value (or not positive on a log axis): a hollow marker on the axis.
            let _ = write!(
                s,
                "<rect x=\"{x:.2}\" y=\"{:.2}\" width=\"{bw:.2}\" height=\"3\" fill=\"none\" stroke=\"#8c959f\"><title>{}</title></rect>",
                base_y - 3.0,
                esc(&b.title)
            );
        }
        if show_labels {
            let cx = xs[i] + slot / 2.0;
            let ly = mt + ph + 6.0;
            let _ = write!(
                s,
                "<text x=\"{cx:.1}\" y=\"{ly:.1}\" font-size=\"10\" text-anchor=\"end\" dominant-baseline=\"central\" transform=\"rotate(-90 {cx:.1} {ly:.1})\">{}</text>",
                esc(&b.label)
            );
        }
    }
    // axes
    let _ = write!(
        s,
        "<line class=\"axis\" x1=\"{ml}\" x2=\"{ml}\" y1=\"{mt}\" y2=\"{:.1}\"/>\
         <line class=\"axis\" x1=\"{ml}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/>",
        mt + ph,
        ml + pw,
        base_y,
        base_y
    );
    let _ = write!(
        s,
        "<text x=\"14\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"12\" transform=\"rotate(-90 14 {:.1})\">{}</text>",
        mt + ph / 2.0,
        mt + ph / 2.0,
        esc(y_label)
    );
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"12\">{}</text>",
        ml + pw / 2.0,
        h - 6.0,
        esc(x_label)
    );
    s.push_str("</svg>");
    s
}

/// Horizontal bar chart of labelled values (e.g. seconds per stage).
fn hbar_chart_svg(
    rows: &[(String, f64, &'static str)],
    x_label: &str,
    fmt: &dyn Fn(f64) -> String,
) -> String {
    let w = 900.0;
    let (ml, mr, mt) = (170.0, 110.0, 8.0);
    let row_h = 30.0;
    let ph = row_h * rows.len().max(1) as f64;
    let h = mt + ph + 40.0;
    let pw = w - ml - mr;
    let vmax = rows.iter().map(|r| r.1).fold(0.0, f64::max);
    let step = nice_step(if vmax > 0.0 { vmax } else { 1.0 });
    let hi = (vmax / step).ceil().max(1.0) * step;
    let xv = |v: f64| ml + pw * (v.max(0.0) / hi);
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{}\" style=\"max-width:{w}px\">",
        esc(x_label)
    );
    let mut t = 0.0;
    while t <= hi + step * 1e-9 {
        let x = xv(t);
        let _ = write!(
            s,
            "<line class=\"grid\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{mt}\" y2=\"{:.1}\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
            mt + ph,
            mt + ph + 15.0,
            esc(&fmt_tick(t, step))
        );
        t += step;
    }
    for (i, (label, v, color)) in rows.iter().enumerate() {
        let y = mt + i as f64 * row_h + 5.0;
        let bh = row_h - 10.0;
        let x1 = xv(*v);
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"13\">{}</text>\
             <rect class=\"bar\" x=\"{ml}\" y=\"{y:.1}\" width=\"{:.2}\" height=\"{bh}\" fill=\"{color}\" rx=\"2\"><title>{}</title></rect>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\">{}</text>",
            ml - 8.0,
            y + bh / 2.0 + 4.5,
            esc(label),
            (x1 - ml).max(0.5),
            esc(&format!("{label}: {}", fmt(*v))),
            x1 + 6.0,
            y + bh / 2.0 + 4.0,
            esc(&fmt(*v))
        );
    }
    let _ = write!(
        s,
        "<line class=\"axis\" x1=\"{ml}\" x2=\"{ml}\" y1=\"{mt}\" y2=\"{:.1}\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"12\">{}</text></svg>",
        mt + ph,
        ml + pw / 2.0,
        h - 4.0,
        esc(x_label)
    );
    s
}

// ------------------------------------------------------------------------------------------
// Single-run page
// ------------------------------------------------------------------------------------------

fn meta_item(out: &mut String, k: &str, v: Option<String>) {
    if let Some(v) = v {
        let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", esc(k), v);
    }
}

fn card(out: &mut String, k: &str, v: &str, d: &str) {
    let _ = write!(
        out,
        "<div class=\"card\"><div class=\"k\">{}</div><div class=\"v\">{}</div><div class=\"d\">{}</div></div>",
        esc(k),
        esc(v),
        esc(d)
    );
}

fn cls_delta(delta: f64, lower_better: bool) -> &'static str {
    if delta == 0.0 {
        ""
    } else if (delta < 0.0) == lower_better {
        "good"
    } else {
        "bad"
    }
}

/// Render one `report.json` as a self-contained HTML page.
pub fn render_html(report: &Value) -> String {
    let r = report;
    let mut b = String::new();
    let model = text(r, &["model", "path"]);
    let ds = datasets(r);
    let tms = task_metrics(r);
    let warns = warnings(r);
    let mcr_v = mcr(r);

    // ---- header
    b.push_str("<header>\n<h1>Compression report</h1>\n");
    let _ = writeln!(
        b,
        "<p class=\"sub mono\">{} &rarr; {}</p>",
        esc(model.as_deref().unwrap_or("(model not recorded)")),
        esc(text(r, &["output", "path"])
            .as_deref()
            .unwrap_or("(output not recorded)"))
    );
    b.push_str("<dl class=\"meta\">");
    meta_item(
        &mut b,
        "model",
        model.as_deref().map(|m| format!("<code>{}</code>", esc(m))),
    );
    meta_item(
        &mut b,
        "output",
        text(r, &["output", "path"]).map(|m| format!("<code>{}</code>", esc(&m))),
    );
    meta_item(
        &mut b,
        "architecture",
        text(r, &["model", "architecture"]).map(|x| esc(&x)),
    );
    meta_item(
        &mut b,
        "format",
        text(r, &["output", "format"]).map(|x| esc(&x)),
    );
    meta_item(
        &mut b,
        "parameters",
        num(r, &["model", "parameters"]).map(|p| format!("{} ({:.1} M)", fmt_int(p), p / 1e6)),
    );
    meta_item(
        &mut b,
        "layers",
        text(r, &["model", "num_layers"]).map(|x| esc(&x)),
    );
    meta_item(
        &mut b,
        "dtype",
        text(r, &["model", "dtype"]).map(|x| esc(&x)),
    );
    meta_item(
        &mut b,
        "files",
        match at(r, &["output", "files"]) {
            Some(Value::Array(a)) => Some(esc(&a
                .iter()
                .map(value_text)
                .collect::<Vec<_>>()
                .join(", "))),
            _ => None,
        },
    );
    meta_item(
        &mut b,
        "eval seq_len",
        text(r, &["eval_seq_len"]).map(|x| esc(&x)),
    );
    meta_item(
        &mut b,
        "identical to input",
        at(r, &["output", "identical_to_input"])
            .and_then(|v| v.as_bool())
            .map(|x| {
                if x {
                    "yes (byte-identical tensors)".into()
                } else {
                    "<span class=\"bad\">NO</span>".into()
                }
            }),
    );
    meta_item(
        &mut b,
        "tool version",
        text(r, &["tool_version"]).map(|x| esc(&x)),
    );
    meta_item(
        &mut b,
        "schema",
        text(r, &["schema"]).map(|x| format!("<code>{}</code>", esc(&x))),
    );
    b.push_str("</dl>\n</header>\n");

    // ---- key figures
    let mut cards = String::new();
    if let Some(d) = ds.first() {
        if let Some(a) = d.after {
            let sub = match (d.before, d.delta_pct) {
                (Some(bf), Some(dp)) => {
                    format!("{} → {} ({})", fmt_ppl(bf), fmt_ppl(a), fmt_pct_signed(dp))
                }
                _ => d.name.clone(),
            };
            card(
                &mut cards,
                &format!("perplexity · {}", d.name),
                &fmt_ppl(a),
                &sub,
            );
        }
    }
    if let Some(cr) = compression_ratio(r) {
        let sub = match (size_orig(r), size_comp(r)) {
            (Some(a), Some(c)) => format!("{} → {}", fmt_bytes(a), fmt_bytes(c)),
            _ => String::new(),
        };
        card(&mut cards, "compression ratio", &format!("{cr:.3}×"), &sub);
    }
    if let Some(bpw) = num(r, &["output", "bits_per_weight"]) {
        card(
            &mut cards,
            "bits per weight",
            &format!("{bpw:.3}"),
            "decoder linears, scales included",
        );
    }
    if let Some((m, _)) = &mcr_v {
        card(
            &mut cards,
            "MCR",
            &format!("{m:.3}"),
            "size ratio × performance ratio ¹",
        );
    }
    if let Some(t) = num(r, &["timing", "total_seconds"]) {
        card(&mut cards, "wall time", &fmt_secs(t), "all stages");
    }
    if let Some(p) = num(r, &["peak_rss_bytes"]) {
        card(
            &mut cards,
            "peak memory",
            &fmt_bytes(p),
            "resident set size",
        );
    }
    card(
        &mut cards,
        "warnings",
        &warns.len().to_string(),
        if warns.is_empty() {
            "none"
        } else {
            "see below"
        },
    );
    let _ = writeln!(b, "<div class=\"cards\">{cards}</div>");

    // ---- warnings
    b.push_str("<h2 id=\"warnings\">Warnings</h2>\n");
    if warns.is_empty() {
        b.push_str("<p class=\"ok\">none</p>\n");
    } else {
        b.push_str("<ul class=\"warnings\">\n");
        for w in &warns {
            let _ = writeln!(b, "<li>{}</li>", esc(w));
        }
        b.push_str("</ul>\n");
    }

    // ---- summary table
    b.push_str("<h2 id=\"summary\">Summary: base vs compressed</h2>\n");
    b.push_str("<table>\n<thead><tr><th>metric</th><th class=\"n\">base</th><th class=\"n\">compressed</th><th class=\"n\">Δ</th></tr></thead>\n<tbody>\n");
    let row = |b: &mut String, label: &str, base: String, comp: String, delta: String| {
        let _ = writeln!(
            b,
            "<tr><td>{label}</td><td class=\"n\">{base}</td><td class=\"n\">{comp}</td><td class=\"n\">{delta}</td></tr>"
        );
    };
    let dash = || "—".to_string();
    if !ds.is_empty() {
        let _ = writeln!(
            b,
            "<tr class=\"group\"><td colspan=\"4\">Perplexity{} · lower is better · compressed measured on the artifact read back from disk</td></tr>",
            num(r, &["eval_seq_len"]).map(|s| format!(" (seq_len {s})")).unwrap_or_default()
        );
        for d in &ds {
            let mut label = format!("<code>{}</code>", esc(&d.name));
            let mut extra = vec![];
            if let Some(w) = d.windows {
                extra.push(format!("{} windows", fmt_int(w)));
            }
            if let Some(t) = d.tokens {
                extra.push(format!("{} tokens", fmt_int(t)));
            }
            if !extra.is_empty() {
                let _ = write!(
                    label,
                    " <span class=\"muted\">{}</span>",
                    esc(&extra.join(", "))
                );
            }
            if let Some(f) = &d.file {
                label = format!("<span title=\"{}\">{label}</span>", esc(f));
            }
            let delta = d
                .delta_pct
                .map(|p| {
                    format!(
                        "<span class=\"{}\">{}</span>",
                        cls_delta(p, true),
                        esc(&fmt_pct_signed(p))
                    )
                })
                .unwrap_or_else(dash);
            row(
                &mut b,
                &label,
                d.before.map(fmt_ppl).unwrap_or_else(dash),
                d.after.map(fmt_ppl).unwrap_or_else(dash),
                delta,
            );
        }
    }
    if !tms.is_empty() {
        b.push_str("<tr class=\"group\"><td colspan=\"4\">Zero-shot tasks · accuracy ± standard error · higher is better</td></tr>\n");
        for t in &tms {
            let label = format!(
                "{} · <code>{}</code>{}",
                esc(&t.task),
                esc(&t.metric),
                t.n.map(|n| format!(" <span class=\"muted\">n={}</span>", fmt_int(n)))
                    .unwrap_or_default()
            );
            let lower = is_lower_better_metric(&t.metric);
            let delta = match (&t.before, &t.after) {
                (Some(bf), Some(af)) => {
                    if is_fraction_metric(&t.metric) {
                        let d = 100.0 * (af.value - bf.value);
                        format!(
                            "<span class=\"{}\">{:+.2} pp</span>",
                            cls_delta(d, lower),
                            d
                        )
                    } else if bf.value != 0.0 {
                        let d = 100.0 * (af.value - bf.value) / bf.value;
                        format!(
                            "<span class=\"{}\">{}</span>",
                            cls_delta(d, lower),
                            esc(&fmt_pct_signed(d))
                        )
                    } else {
                        dash()
                    }
                }
                _ => dash(),
            };
            row(
                &mut b,
                &label,
                t.before
                    .as_ref()
                    .map(|s| esc(&fmt_task_value(&t.metric, s)))
                    .unwrap_or_else(dash),
                t.after
                    .as_ref()
                    .map(|s| esc(&fmt_task_value(&t.metric, s)))
                    .unwrap_or_else(dash),
                delta,
            );
        }
    }
    b.push_str("<tr class=\"group\"><td colspan=\"4\">Size</td></tr>\n");
    {
        let (so, sc) = (size_orig(r), size_comp(r));
        let delta = match (so, sc) {
            (Some(a), Some(c)) if a > 0.0 => esc(&format!("{:+.1} %", 100.0 * (c - a) / a)),
            _ => dash(),
        };
        let fb = |x: Option<f64>| {
            x.map(|v| {
                format!(
                    "<span title=\"{} bytes\">{}</span>",
                    fmt_int(v),
                    esc(&fmt_bytes(v))
                )
            })
            .unwrap_or_else(dash)
        };
        row(&mut b, "size on disk", fb(so), fb(sc), delta);
        let base_bits = text(r, &["model", "dtype"]).and_then(|d| dtype_bits(&d).map(|b| (b, d)));
        let bpw = num(r, &["output", "bits_per_weight"]);
        if base_bits.is_some() || bpw.is_some() {
            let delta = match (&base_bits, bpw) {
                (Some((bb, _)), Some(c)) => esc(&format!("{:+.3}", c - bb)),
                _ => dash(),
            };
            row(
                &mut b,
                "bits per weight <span class=\"muted\">(decoder linears)</span>",
                base_bits
                    .map(|(bb, d)| esc(&format!("{bb:.0} ({d})")))
                    .unwrap_or_else(dash),
                bpw.map(|x| format!("{x:.3}")).unwrap_or_else(dash),
                delta,
            );
        }
        if let Some(sp) = sparsity(r) {
            row(
                &mut b,
                "sparsity",
                "0.00 %".into(),
                esc(&fmt_sparsity(sp)),
                dash(),
            );
        }
        if let Some(cr) = compression_ratio(r) {
            row(
                &mut b,
                "compression ratio",
                "1.000×".into(),
                format!("{cr:.3}×"),
                dash(),
            );
        }
        if let Some((m, _)) = &mcr_v {
            row(
                &mut b,
                "MCR <sup>1</sup>",
                "1.000".into(),
                format!("<strong>{m:.3}</strong>"),
                dash(),
            );
        }
    }
    b.push_str("</tbody>\n</table>\n");

    // ---- per-linear charts
    let layers: Vec<&Value> = match at(r, &["layers"]) {
        Some(Value::Array(a)) => a.iter().filter(|x| x.is_object()).collect(),
        _ => vec![],
    };
    if !layers.is_empty() {
        b.push_str("<h2 id=\"layers\">Per-linear results</h2>\n");
        let mut linear_names: Vec<String> = vec![];
        let mut passes: Vec<String> = vec![];
        for l in &layers {
            let n = text(l, &["linear"]).unwrap_or_default();
            if !linear_names.contains(&n) {
                linear_names.push(n);
            }
            let p = text(l, &["pass"]).unwrap_or_default();
            if !passes.contains(&p) {
                passes.push(p);
            }
        }
        let color_of = |n: &str| {
            let i = linear_names.iter().position(|x| x == n).unwrap_or(0);
            PALETTE[i % PALETTE.len()]
        };
        let mut legend = String::from("<div class=\"legend\">");
        for n in &linear_names {
            let _ = write!(
                legend,
                "<span><span class=\"sw\" style=\"background:{}\"></span>{}</span>",
                color_of(n),
                esc(n)
            );
        }
        legend.push_str("</div>");

        struct Metric {
            title: &'static str,
            y_label: &'static str,
            path: &'static [&'static str],
            scale: Option<Scale>,
            fmt: fn(f64) -> String,
            caption: &'static str,
        }
        fn sci(v: f64) -> String {
            format!("{v:.3e}")
        }
        fn frac_pct(v: f64) -> String {
            format!("{:.2} %", if v <= 1.0 { 100.0 * v } else { v })
        }
        fn int(v: f64) -> String {
            fmt_int(v)
        }
        let metrics = [
            Metric {
                title: "Relative output error per linear",
                y_label: "‖(W−Ŵ)X‖² / ‖WX‖² (log)",
                path: &["rel_output_error"],
                scale: Some(Scale::Log),
                fmt: sci,
                caption: "Relative output reconstruction error on the calibration inputs, log scale; grouped by layer. Hover a bar for its value.",
            },
            Metric {
                title: "GPTQ loss per linear",
                y_label: "loss",
                path: &["loss"],
                scale: None,
                fmt: sci,
                caption: "Σ((w−q)/[H⁻¹]ⱼⱼ)² per linear; grouped by layer. Hover a bar for its value.",
            },
            Metric {
                title: "Sparsity per linear",
                y_label: "sparsity",
                path: &["notes", "sparsity"],
                scale: Some(Scale::Linear),
                fmt: frac_pct,
                caption: "Fraction of zero weights per linear (notes.sparsity).",
            },
            Metric {
                title: "Rank per linear",
                y_label: "rank",
                path: &["notes", "rank"],
                scale: Some(Scale::Linear),
                fmt: int,
                caption: "Rank kept per linear (notes.rank).",
            },
        ];
        for m in &metrics {
            for pass in &passes {
                let recs: Vec<&&Value> = layers
                    .iter()
                    .filter(|l| text(l, &["pass"]).unwrap_or_default() == *pass)
                    .collect();
                if !recs.iter().any(|l| num(l, m.path).is_some()) {
                    continue;
                }
                let vals: Vec<f64> = recs.iter().filter_map(|l| num(l, m.path)).collect();
                let scale = m.scale.unwrap_or_else(|| {
                    let pos: Vec<f64> = vals.iter().cloned().filter(|v| *v > 0.0).collect();
                    let mx = pos.iter().cloned().fold(f64::MIN, f64::max);
                    let mn = pos.iter().cloned().fold(f64::MAX, f64::min);
                    if pos.len() == vals.len() && !pos.is_empty() && mx / mn > 50.0 {
                        Scale::Log
                    } else {
                        Scale::Linear
                    }
                });
                let frac = m.path == ["notes", "sparsity"] && vals.iter().all(|v| *v <= 1.0);
                let bars: Vec<Bar> = recs
                    .iter()
                    .map(|l| {
                        let layer = text(l, &["layer"]).unwrap_or_else(|| "?".into());
                        let linear = text(l, &["linear"]).unwrap_or_default();
                        let v = num(l, m.path).map(|v| if frac { 100.0 * v } else { v });
                        let shown = num(l, m.path)
                            .map(m.fmt)
                            .unwrap_or_else(|| "no value".into());
                        Bar {
                            group: format!("layer {layer}"),
                            label: short_linear(&linear),
                            value: v,
                            color: color_of(&linear),
                            title: format!(
                                "layer {layer} · {linear} · {pass}\n{}: {shown}",
                                m.path.join(".")
                            ),
                        }
                    })
                    .collect();
                let y_label = if frac { "sparsity (%)" } else { m.y_label };
                let y_label = if scale == Scale::Log && m.scale.is_none() {
                    format!("{y_label} (log)")
                } else {
                    y_label.to_string()
                };
                let pct = |v: f64| format!("{v:.0}%");
                let tick: Option<&dyn Fn(f64) -> String> = if frac { Some(&pct) } else { None };
                let title = if passes.len() > 1 {
                    format!("{} — pass {}", m.title, pass)
                } else {
                    m.title.to_string()
                };
                let missing = recs.len() - vals.len();
                let _ =
                    writeln!(
                    b,
                    "<figure>\n<h3>{}</h3>\n{}\n{legend}\n<figcaption>{}{}</figcaption>\n</figure>",
                    esc(&title),
                    bar_chart_svg(&y_label, "layer · linear", &bars, scale, tick),
                    esc(m.caption),
                    if missing > 0 {
                        esc(&format!(" {missing} records carry no value (hollow markers)."))
                    } else {
                        String::new()
                    }
                );
            }
        }

        // full table, folded
        b.push_str("<details><summary>Per-linear table</summary>\n<table>\n<thead><tr><th class=\"n\">layer</th><th>linear</th><th>pass</th><th class=\"n\">rel. output error</th><th class=\"n\">loss</th><th class=\"n\">seconds</th><th>notes</th></tr></thead>\n<tbody>\n");
        for l in &layers {
            let notes = match at(l, &["notes"]) {
                Some(Value::Object(o)) if !o.is_empty() => o
                    .iter()
                    .map(|(k, v)| format!("{k}={}", value_text(v)))
                    .collect::<Vec<_>>()
                    .join(", "),
                Some(Value::Object(_)) | None => String::new(),
                Some(v) => value_text(v),
            };
            let _ = writeln!(
                b,
                "<tr><td class=\"n\">{}</td><td><code>{}</code></td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"mono\">{}</td></tr>",
                esc(&text(l, &["layer"]).unwrap_or_default()),
                esc(&text(l, &["linear"]).unwrap_or_default()),
                esc(&text(l, &["pass"]).unwrap_or_default()),
                num(l, &["rel_output_error"]).map(|x| format!("{x:.3e}")).unwrap_or_else(dash),
                num(l, &["loss"]).map(|x| format!("{x:.4e}")).unwrap_or_else(dash),
                num(l, &["seconds"]).map(|x| format!("{x:.3}")).unwrap_or_else(dash),
                esc(&notes)
            );
        }
        b.push_str("</tbody>\n</table>\n</details>\n");
    }

    // ---- timing and memory
    let mut stages: Vec<(String, f64, &'static str)> = vec![];
    let mut total = None;
    if let Some(Value::Object(t)) = at(r, &["timing"]) {
        for (k, v) in t {
            let Some(x) = v.as_f64().filter(|x| x.is_finite()) else {
                continue;
            };
            let name = k.strip_suffix("_seconds").unwrap_or(k).replace('_', " ");
            if k == "total_seconds" {
                total = Some(x);
            } else {
                let c = PALETTE[stages.len() % PALETTE.len()];
                stages.push((name, x, c));
            }
        }
    }
    let peak = num(r, &["peak_rss_bytes"]);
    if !stages.is_empty() || total.is_some() || peak.is_some() {
        b.push_str("<h2 id=\"resources\">Time and memory</h2>\n");
        if !stages.is_empty() || total.is_some() {
            let mut rows = stages.clone();
            if let Some(t) = total {
                rows.push(("total".into(), t, "#8c959f"));
            }
            let _ = writeln!(
                b,
                "<figure>\n<h3>Wall time per stage</h3>\n{}\n<figcaption>Seconds per stage (timing.*_seconds); the grey bar is the whole run. Hover a bar for its value.</figcaption>\n</figure>",
                hbar_chart_svg(&rows, "seconds", &|v: f64| fmt_secs(v))
            );
        }
        if let Some(p) = peak {
            let rel = size_orig(r)
                .filter(|s| *s > 0.0)
                .map(|s| format!(" — {:.1}× the model's size on disk", p / s))
                .unwrap_or_default();
            let _ = writeln!(
                b,
                "<p>Peak memory (resident set size): <strong>{}</strong> <span class=\"muted\">({} bytes){}</span></p>",
                esc(&fmt_bytes(p)),
                fmt_int(p),
                esc(&rel)
            );
        }
    }

    // ---- pipeline
    if let Some(p) = at(r, &["pipeline"]) {
        b.push_str("<h2 id=\"pipeline\">Pipeline as run</h2>\n");
        let _ = writeln!(
            b,
            "<pre>{}</pre>",
            esc(&serde_json::to_string_pretty(p).unwrap_or_default())
        );
    }

    // ---- footer
    b.push_str("<footer>\n");
    match &mcr_v {
        Some((_, McrSource::Reported)) => b.push_str(
            "<p>¹ MCR (model compression rate) = (size<sub>orig</sub> / size<sub>comp</sub>) × (perf<sub>comp</sub> / perf<sub>orig</sub>), as reported by the tool (<code>summary.mcr</code>).</p>\n",
        ),
        Some((_, McrSource::Computed { dataset })) => {
            let _ = writeln!(
                b,
                "<p>¹ MCR (model compression rate) = (size<sub>orig</sub> / size<sub>comp</sub>) × (perf<sub>comp</sub> / perf<sub>orig</sub>), computed here (the report has no <code>summary.mcr</code>) with perf = 1 / perplexity on <code>{}</code>, i.e. compression ratio × ppl<sub>before</sub> / ppl<sub>after</sub>.</p>",
                esc(dataset)
            );
        }
        None => b.push_str("<p>¹ MCR not available: the report has neither <code>summary.mcr</code> nor sizes with a before/after perplexity.</p>\n"),
    }
    let _ = writeln!(
        b,
        "<p>compress {} · report schema {}</p>\n</footer>",
        esc(text(r, &["tool_version"]).as_deref().unwrap_or("?")),
        esc(text(r, &["schema"]).as_deref().unwrap_or("?"))
    );

    page(
        &format!("compress report — {}", model.as_deref().unwrap_or("model")),
        &b,
    )
}

// ------------------------------------------------------------------------------------------
// Comparison of several runs
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
    None,
}

/// One comparison cell: shown text and the value compared for "best".
type Cell = Option<(String, Option<f64>)>;

struct CmpRow {
    label: String,
    better: Better,
    /// Per run: shown text and the value compared for "best".
    cells: Vec<Cell>,
    group: bool,
}

impl CmpRow {
    /// Indices of the best cells (ties all marked); none when fewer than two runs have a value.
    fn best(&self) -> Vec<usize> {
        if self.better == Better::None {
            return vec![];
        }
        let vals: Vec<(usize, f64)> = self
            .cells
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().and_then(|c| c.1).map(|v| (i, v)))
            .collect();
        if vals.len() < 2 {
            return vec![];
        }
        let best = vals
            .iter()
            .map(|x| x.1)
            .fold(None, |acc: Option<f64>, v| match acc {
                None => Some(v),
                Some(a) => Some(if (self.better == Better::Lower) == (v < a) {
                    v
                } else {
                    a
                }),
            })
            .unwrap();
        let all_same = vals.iter().all(|x| x.1 == best);
        if all_same {
            return vec![];
        }
        let tol = 1e-12 * best.abs().max(1e-300);
        vals.iter()
            .filter(|x| (x.1 - best).abs() <= tol)
            .map(|x| x.0)
            .collect()
    }
}

fn compare_rows(runs: &[(String, Value)]) -> Vec<CmpRow> {
    let mut rows = vec![];
    let per =
        |f: &dyn Fn(&Value) -> Cell| -> Vec<Cell> { runs.iter().map(|(_, r)| f(r)).collect() };
    let group = |label: &str| CmpRow {
        label: label.into(),
        better: Better::None,
        cells: vec![],
        group: true,
    };
    rows.push(group("Artifact"));
    rows.push(CmpRow {
        label: "format".into(),
        better: Better::None,
        cells: per(&|r| text(r, &["output", "format"]).map(|s| (s, None))),
        group: false,
    });
    rows.push(CmpRow {
        label: "bits per weight".into(),
        better: Better::Lower,
        cells: per(&|r| {
            num(r, &["output", "bits_per_weight"]).map(|v| (format!("{v:.3}"), Some(v)))
        }),
        group: false,
    });
    rows.push(CmpRow {
        label: "size on disk".into(),
        better: Better::Lower,
        cells: per(&|r| size_comp(r).map(|v| (fmt_bytes(v), Some(v)))),
        group: false,
    });
    rows.push(CmpRow {
        label: "compression ratio".into(),
        better: Better::Higher,
        cells: per(&|r| compression_ratio(r).map(|v| (format!("{v:.3}×"), Some(v)))),
        group: false,
    });
    if runs.iter().any(|(_, r)| sparsity(r).is_some()) {
        rows.push(CmpRow {
            label: "sparsity".into(),
            better: Better::None,
            cells: per(&|r| sparsity(r).map(|v| (fmt_sparsity(v), Some(v)))),
            group: false,
        });
    }
    if runs.iter().any(|(_, r)| mcr(r).is_some()) {
        rows.push(CmpRow {
            label: "MCR ¹".into(),
            better: Better::Higher,
            cells: per(&|r| {
                mcr(r).map(|(v, src)| {
                    let mark = match src {
                        McrSource::Reported => "",
                        McrSource::Computed { .. } => " ²",
                    };
                    (format!("{v:.3}{mark}"), Some(v))
                })
            }),
            group: false,
        });
    }

    // data sets: union over runs, in first-seen order
    let mut ds_names: Vec<String> = vec![];
    for (_, r) in runs {
        for d in datasets(r) {
            if !ds_names.contains(&d.name) {
                ds_names.push(d.name);
            }
        }
    }
    if !ds_names.is_empty() {
        rows.push(group("Perplexity after (Δ % vs before) · lower is better"));
    }
    for name in &ds_names {
        rows.push(CmpRow {
            label: name.clone(),
            better: Better::Lower,
            cells: per(&|r| {
                let d = datasets(r).into_iter().find(|d| &d.name == name)?;
                let a = d.after?;
                let s = match d.delta_pct {
                    Some(p) => format!("{} ({})", fmt_ppl(a), fmt_pct_signed(p)),
                    None => fmt_ppl(a),
                };
                Some((s, Some(a)))
            }),
            group: false,
        });
    }

    // tasks
    let mut task_keys: Vec<(String, String)> = vec![];
    for (_, r) in runs {
        for t in task_metrics(r) {
            let k = (t.task, t.metric);
            if !task_keys.contains(&k) {
                task_keys.push(k);
            }
        }
    }
    if !task_keys.is_empty() {
        rows.push(group("Zero-shot tasks after · accuracy ± stderr"));
    }
    for (task, metric) in &task_keys {
        let lower = is_lower_better_metric(metric);
        rows.push(CmpRow {
            label: format!("{task} · {metric}"),
            better: if lower { Better::Lower } else { Better::Higher },
            cells: per(&|r| {
                let t = task_metrics(r)
                    .into_iter()
                    .find(|t| &t.task == task && &t.metric == metric)?;
                let a = t.after?;
                Some((fmt_task_value(metric, &a), Some(a.value)))
            }),
            group: false,
        });
    }

    rows.push(group("Cost"));
    rows.push(CmpRow {
        label: "compress seconds".into(),
        better: Better::Lower,
        cells: per(&|r| num(r, &["timing", "compress_seconds"]).map(|v| (fmt_secs(v), Some(v)))),
        group: false,
    });
    rows.push(CmpRow {
        label: "peak RSS".into(),
        better: Better::Lower,
        cells: per(&|r| num(r, &["peak_rss_bytes"]).map(|v| (fmt_bytes(v), Some(v)))),
        group: false,
    });
    rows.push(CmpRow {
        label: "warnings".into(),
        better: Better::Lower,
        cells: per(&|r| {
            at(r, &["warnings"])?;
            let n = warnings(r).len();
            Some((n.to_string(), Some(n as f64)))
        }),
        group: false,
    });
    rows
}

fn compare_footnotes(runs: &[(String, Value)]) -> Vec<String> {
    let mut notes = vec!["Bold: best value of the row (ties all bold; rows with a single value or all equal are not marked).".to_string()];
    if runs.iter().any(|(_, r)| mcr(r).is_some()) {
        notes.push(
            "¹ MCR (model compression rate) = (size_orig / size_comp) × (perf_comp / perf_orig)."
                .into(),
        );
        if runs
            .iter()
            .any(|(_, r)| matches!(mcr(r), Some((_, McrSource::Computed { .. }))))
        {
            notes.push("² computed here (the report has no summary.mcr) with perf = 1 / perplexity on the report's first data set.".into());
        }
    }
    notes
}

/// Several runs side by side as a Markdown table (columns = runs), best value per row in bold.
pub fn render_compare_markdown(runs: &[(String, Value)]) -> String {
    let rows = compare_rows(runs);
    let mut s = String::from("# compress: runs compared\n\n");
    s.push_str("| |");
    for (name, _) in runs {
        let _ = write!(s, " {} |", md_cell(name));
    }
    s.push_str("\n|---|");
    for _ in runs {
        s.push_str("---:|");
    }
    s.push('\n');
    for row in &rows {
        if row.group {
            let _ = write!(s, "| *{}* |", md_cell(&row.label));
            for _ in runs {
                s.push_str(" |");
            }
            s.push('\n');
            continue;
        }
        let best = row.best();
        let _ = write!(s, "| {} |", md_cell(&row.label));
        for (i, c) in row.cells.iter().enumerate() {
            match c {
                Some((t, _)) if best.contains(&i) => {
                    let _ = write!(s, " **{}** |", md_cell(t));
                }
                Some((t, _)) => {
                    let _ = write!(s, " {} |", md_cell(t));
                }
                None => s.push_str(" — |"),
            }
        }
        s.push('\n');
    }
    s.push('\n');
    for n in compare_footnotes(runs) {
        let _ = writeln!(s, "{n}  ");
    }
    s
}

/// Several runs side by side as a self-contained HTML page, best value per row in bold.
pub fn render_compare_html(runs: &[(String, Value)]) -> String {
    let rows = compare_rows(runs);
    let mut b = String::from("<header>\n<h1>Runs compared</h1>\n");
    let models: Vec<String> = {
        let mut m: Vec<String> = vec![];
        for (_, r) in runs {
            if let Some(p) = text(r, &["model", "path"]) {
                if !m.contains(&p) {
                    m.push(p);
                }
            }
        }
        m
    };
    let _ = writeln!(
        b,
        "<p class=\"sub\">{} run{} · model{} <span class=\"mono\">{}</span></p>\n</header>",
        runs.len(),
        if runs.len() == 1 { "" } else { "s" },
        if models.len() == 1 { "" } else { "s" },
        esc(&if models.is_empty() {
            "—".to_string()
        } else {
            models.join(", ")
        })
    );
    b.push_str("<table>\n<thead><tr><th></th>");
    for (name, r) in runs {
        let tip = text(r, &["output", "path"]).unwrap_or_default();
        let _ = write!(
            b,
            "<th class=\"n\" title=\"{}\">{}</th>",
            esc(&tip),
            esc(name)
        );
    }
    b.push_str("</tr></thead>\n<tbody>\n");
    for row in &rows {
        if row.group {
            let _ = writeln!(
                b,
                "<tr class=\"group\"><td colspan=\"{}\">{}</td></tr>",
                runs.len() + 1,
                esc(&row.label)
            );
            continue;
        }
        let best = row.best();
        let hint = match row.better {
            Better::Lower => " <span class=\"muted\" title=\"lower is better\">↓</span>",
            Better::Higher => " <span class=\"muted\" title=\"higher is better\">↑</span>",
            Better::None => "",
        };
        let _ = write!(b, "<tr><td>{}{hint}</td>", esc(&row.label));
        for (i, c) in row.cells.iter().enumerate() {
            match c {
                Some((t, _)) if best.contains(&i) => {
                    let _ = write!(b, "<td class=\"n best\"><strong>{}</strong></td>", esc(t));
                }
                Some((t, _)) => {
                    let _ = write!(b, "<td class=\"n\">{}</td>", esc(t));
                }
                None => b.push_str("<td class=\"n muted\">—</td>"),
            }
        }
        b.push_str("</tr>\n");
    }
    b.push_str("</tbody>\n</table>\n");

    // warnings per run
    if runs.iter().any(|(_, r)| !warnings(r).is_empty()) {
        b.push_str("<h2>Warnings</h2>\n");
        for (name, r) in runs {
            let w = warnings(r);
            if w.is_empty() {
                continue;
            }
            let _ = writeln!(b, "<h3>{}</h3>\n<ul class=\"warnings\">", esc(name));
            for x in &w {
                let _ = writeln!(b, "<li>{}</li>", esc(x));
            }
            b.push_str("</ul>\n");
        }
    }
    b.push_str("<footer>\n");
    for n in compare_footnotes(runs) {
        let _ = writeln!(b, "<p>{}</p>", esc(&n));
    }
    b.push_str("</footer>\n");
    page("compress — runs compared", &b)
}
