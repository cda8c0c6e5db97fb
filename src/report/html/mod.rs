//! Self-contained HTML views of a [`Report`]: one page per run ([`render_html`]) and several
//! runs side by side ([`render_compare_html`], with its Markdown twin
//! [`render_compare_markdown`]).
//!
//! Everything renders from the typed [`Report`] (a report read back from disk goes through
//! [`Report::from_file`]); optional fields that a report lacks are left out of the page. The
//! page has no external references at all (inline CSS, hand-written inline SVG, no scripts, no
//! fonts or images from elsewhere) and every piece of text from the report is HTML-escaped.
//!
//! * this module: the document (head, style, layout) and the single-run page: header, key
//!   figures, warnings, summary table, per-linear charts, timing and memory, the pipeline as
//!   run.
//! * [`tables`]: the base-vs-compressed summary table and the per-linear table.
//! * [`charts`]: hand-written SVG bar charts.
//! * [`compare`]: several runs side by side, the best value of each row in bold.
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

mod charts;
mod compare;
mod tables;

pub use super::format::escape_html;
pub use compare::{render_compare_html, render_compare_markdown};

use super::facts::{finite, McrSource};
use super::format::{esc, fmt_bytes, fmt_int, fmt_pct_signed, fmt_ppl, fmt_secs};
use super::Report;
use std::fmt::Write as _;

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

/// The HTML document around a page body.
fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}</main>\n</body>\n</html>\n",
        esc(title)
    )
}

/// Render one report as a self-contained HTML page.
pub fn render_html(r: &Report) -> String {
    let mcr = r.mcr();
    let mut b = String::new();
    header(&mut b, r);
    key_figures(&mut b, r, mcr.as_ref());
    warnings(&mut b, &r.warnings);
    tables::summary_table(&mut b, r, mcr.as_ref());
    if !r.layers.is_empty() {
        b.push_str("<h2 id=\"layers\">Per-linear results</h2>\n");
        charts::layer_charts(&mut b, &r.layers);
        tables::layer_table(&mut b, &r.layers);
    }
    resources(&mut b, r);
    if !r.pipeline.is_null() {
        b.push_str("<h2 id=\"pipeline\">Pipeline as run</h2>\n");
        let _ = writeln!(
            b,
            "<pre>{}</pre>",
            esc(&serde_json::to_string_pretty(&r.pipeline).unwrap_or_default())
        );
    }
    footer(&mut b, r, mcr.as_ref());
    page(&format!("compress report — {}", r.model.path), &b)
}

/// A definition in the header's list; `v` is HTML already.
fn meta_item(out: &mut String, k: &str, v: Option<String>) {
    if let Some(v) = v {
        let _ = write!(out, "<dt>{}</dt><dd>{}</dd>", esc(k), v);
    }
}

/// Title, model → output, and the facts of both.
fn header(b: &mut String, r: &Report) {
    let code = |s: &str| Some(format!("<code>{}</code>", esc(s)));
    b.push_str("<header>\n<h1>Compression report</h1>\n");
    let _ = writeln!(
        b,
        "<p class=\"sub mono\">{} &rarr; {}</p>",
        esc(&r.model.path),
        esc(&r.output.path)
    );
    b.push_str("<dl class=\"meta\">");
    meta_item(b, "model", code(&r.model.path));
    meta_item(b, "output", code(&r.output.path));
    meta_item(b, "architecture", Some(esc(&r.model.architecture)));
    meta_item(b, "format", Some(esc(&r.output.format)));
    let p = r.model.parameters as f64;
    meta_item(
        b,
        "parameters",
        Some(format!("{} ({:.1} M)", fmt_int(p), p / 1e6)),
    );
    meta_item(b, "layers", Some(r.model.num_layers.to_string()));
    meta_item(b, "dtype", Some(esc(&r.model.dtype)));
    meta_item(b, "files", Some(esc(&r.output.files.join(", "))));
    meta_item(b, "eval seq_len", r.eval_seq_len.map(|s| s.to_string()));
    meta_item(
        b,
        "identical to input",
        r.output.identical_to_input.map(|x| {
            if x {
                "yes (byte-identical tensors)".into()
            } else {
                "<span class=\"bad\">NO</span>".into()
            }
        }),
    );
    meta_item(b, "tool version", Some(esc(&r.tool_version)));
    meta_item(b, "schema", code(&r.schema));
    b.push_str("</dl>\n</header>\n");
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

/// The cards under the header: first perplexity, ratio, bits, MCR, time, memory, warnings.
fn key_figures(b: &mut String, r: &Report, mcr: Option<&(f64, McrSource)>) {
    let mut cards = String::new();
    if let Some(d) = r.datasets().first() {
        if let Some(a) = d.after {
            let sub = match (d.before, d.delta_pct) {
                (Some(bf), Some(dp)) => {
                    format!("{} → {} ({})", fmt_ppl(bf), fmt_ppl(a), fmt_pct_signed(dp))
                }
                _ => d.name.to_string(),
            };
            let k = format!("perplexity · {}", d.name);
            card(&mut cards, &k, &fmt_ppl(a), &sub);
        }
    }
    if let Some(cr) = r.compression_ratio() {
        let sub = format!(
            "{} → {}",
            fmt_bytes(r.size_orig()),
            fmt_bytes(r.size_comp())
        );
        card(&mut cards, "compression ratio", &format!("{cr:.3}×"), &sub);
    }
    if let Some(bpw) = r.bits_per_weight() {
        let d = "decoder linears, scales included";
        card(&mut cards, "bits per weight", &format!("{bpw:.3}"), d);
    }
    if let Some((m, _)) = mcr {
        let d = "size ratio × performance ratio ¹";
        card(&mut cards, "MCR", &format!("{m:.3}"), d);
    }
    if let Some(t) = finite(r.timing.total_seconds) {
        card(&mut cards, "wall time", &fmt_secs(t), "all stages");
    }
    if let Some(p) = r.peak_rss_bytes {
        let d = "resident set size";
        card(&mut cards, "peak memory", &fmt_bytes(p as f64), d);
    }
    let n = r.warnings.len().to_string();
    let d = if r.warnings.is_empty() {
        "none"
    } else {
        "see below"
    };
    card(&mut cards, "warnings", &n, d);
    let _ = writeln!(b, "<div class=\"cards\">{cards}</div>");
}

fn warnings(b: &mut String, warns: &[String]) {
    b.push_str("<h2 id=\"warnings\">Warnings</h2>\n");
    if warns.is_empty() {
        b.push_str("<p class=\"ok\">none</p>\n");
    } else {
        b.push_str("<ul class=\"warnings\">\n");
        for w in warns {
            let _ = writeln!(b, "<li>{}</li>", esc(w));
        }
        b.push_str("</ul>\n");
    }
}

/// Wall time per stage (chart) and peak memory.
fn resources(b: &mut String, r: &Report) {
    let mut rows: Vec<(String, f64, &'static str)> = vec![];
    for (name, x) in r.timing.stages() {
        if let Some(x) = finite(x) {
            let c = charts::PALETTE[rows.len() % charts::PALETTE.len()];
            rows.push((name.to_string(), x, c));
        }
    }
    let total = finite(r.timing.total_seconds);
    let peak = r.peak_rss_bytes.map(|p| p as f64);
    if rows.is_empty() && total.is_none() && peak.is_none() {
        return;
    }
    b.push_str("<h2 id=\"resources\">Time and memory</h2>\n");
    if !rows.is_empty() || total.is_some() {
        if let Some(t) = total {
            rows.push(("total".into(), t, "#8c959f"));
        }
        let _ = writeln!(
            b,
            "<figure>\n<h3>Wall time per stage</h3>\n{}\n<figcaption>Seconds per stage (timing.*_seconds); the grey bar is the whole run. Hover a bar for its value.</figcaption>\n</figure>",
            charts::hbar_chart_svg(&rows, "seconds", &|v: f64| fmt_secs(v))
        );
    }
    if let Some(p) = peak {
        let s = r.size_orig();
        let rel = if s > 0.0 {
            format!(" — {:.1}× the model's size on disk", p / s)
        } else {
            String::new()
        };
        let _ = writeln!(
            b,
            "<p>Peak memory (resident set size): <strong>{}</strong> <span class=\"muted\">({} bytes){}</span></p>",
            esc(&fmt_bytes(p)),
            fmt_int(p),
            esc(&rel)
        );
    }
}

/// How MCR was obtained, tool version and schema.
fn footer(b: &mut String, r: &Report, mcr: Option<&(f64, McrSource)>) {
    b.push_str("<footer>\n");
    match mcr {
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
        esc(&r.tool_version),
        esc(&r.schema)
    );
}
