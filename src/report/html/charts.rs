//! Hand-written inline SVG: grouped vertical bar charts (per-linear figures) and horizontal
//! bar charts (time per stage).

use super::super::facts::finite_opt;
use super::super::format::{esc, fmt_int};
use crate::engine::LinearRecord;
use std::fmt::Write as _;

pub(super) const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#9c755f",
    "#ff9da7", "#bab0ac",
];

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

/// Short name of a linear for chart labels: `self_attn.q_proj` → `q`.
fn short_linear(name: &str) -> String {
    let last = name.rsplit('.').next().unwrap_or(name);
    last.strip_suffix("_proj").unwrap_or(last).to_string()
}

// ------------------------------------------------------------------------------------------
// Grouped vertical bar chart
// ------------------------------------------------------------------------------------------

/// Geometry of a vertical bar chart: canvas height, margins, plot area and the y range (in log10
/// units on a log scale).
struct Frame {
    h: f64,
    ml: f64,
    mt: f64,
    pw: f64,
    ph: f64,
    label_h: f64,
    scale: Scale,
    lo: f64,
    hi: f64,
}

impl Frame {
    /// y of a tick position (already in axis units).
    fn tick_y(&self, t: f64) -> f64 {
        self.mt + self.ph * (1.0 - (t - self.lo) / (self.hi - self.lo))
    }

    /// y of a value.
    fn y(&self, v: f64) -> f64 {
        self.tick_y(match self.scale {
            Scale::Log => v.log10(),
            Scale::Linear => v,
        })
    }

    /// y of the bars' base line.
    fn base_y(&self) -> f64 {
        match self.scale {
            Scale::Log => self.mt + self.ph,
            Scale::Linear => self.tick_y(0.0),
        }
    }
}

/// The y range (lo, hi) in axis units and the labelled ticks.
fn y_axis(
    scale: Scale,
    vmin: f64,
    vmax: f64,
    tick_fmt: Option<&dyn Fn(f64) -> String>,
) -> (f64, f64, Vec<(f64, String)>) {
    match scale {
        Scale::Log => {
            let mut a = vmin.log10().floor() as i32;
            let mut b = vmax.log10().ceil() as i32;
            if a == b {
                a -= 1;
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
    }
}

/// Gap between groups, in bar slots.
const GROUP_GAP: f64 = 0.9;

/// Groups of consecutive bars as (name, first, last), the x of each bar's slot, and the slot
/// width: slots with a gap between groups.
fn x_layout(bars: &[Bar], ml: f64, pw: f64) -> (Vec<(String, usize, usize)>, Vec<f64>, f64) {
    let mut groups: Vec<(String, usize, usize)> = vec![];
    for (i, b) in bars.iter().enumerate() {
        match groups.last_mut() {
            Some(g) if g.0 == b.group => g.2 = i,
            _ => groups.push((b.group.clone(), i, i)),
        }
    }
    let slots = bars.len() as f64 + GROUP_GAP * (groups.len().saturating_sub(1)) as f64;
    let slot = pw / slots;
    let mut xs = Vec::with_capacity(bars.len());
    let mut x = ml;
    let mut gi = 0;
    for i in 0..bars.len() {
        if gi + 1 < groups.len() && i == groups[gi + 1].1 {
            gi += 1;
            x += GROUP_GAP * slot;
        }
        xs.push(x);
        x += slot;
    }
    (groups, xs, slot)
}

/// Alternating bands under the groups, with the group names below the bar labels.
fn draw_groups(
    s: &mut String,
    f: &Frame,
    groups: &[(String, usize, usize)],
    xs: &[f64],
    slot: f64,
) {
    let (mt, ph) = (f.mt, f.ph);
    for (gi, (name, a, b)) in groups.iter().enumerate() {
        let x0 = xs[*a] - 0.45 * GROUP_GAP * slot;
        let x1 = xs[*b] + slot + 0.45 * GROUP_GAP * slot;
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
            mt + ph + f.label_h + 16.0,
            esc(&gl)
        );
    }
}

/// Grid lines with their tick labels; minor ticks at 2..9 × 10^k on a log scale.
fn draw_y_ticks(s: &mut String, f: &Frame, ticks: &[(f64, String)]) {
    let ml = f.ml;
    for (t, lab) in ticks {
        let y = f.tick_y(*t);
        let _ = write!(
            s,
            "<line class=\"grid\" x1=\"{ml}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"11\">{}</text>",
            ml + f.pw,
            ml - 6.0,
            y + 4.0,
            esc(lab)
        );
    }
    if f.scale == Scale::Log {
        let (a, b) = (f.lo as i32, f.hi as i32);
        for e in a..b {
            for m in 2..10 {
                let y = f.y(m as f64 * 10f64.powi(e));
                let _ = write!(
                    s,
                    "<line class=\"axis\" x1=\"{:.1}\" x2=\"{ml}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>",
                    ml - 3.0
                );
            }
        }
    }
}

/// The bars (a hollow marker on the axis where a bar has no value, or no positive value on a
/// log axis), with their rotated labels when `show_labels`.
fn draw_bars(s: &mut String, f: &Frame, bars: &[Bar], xs: &[f64], slot: f64, show_labels: bool) {
    let (mt, ph) = (f.mt, f.ph);
    let base_y = f.base_y();
    let bw = (slot * 0.78).max(1.0);
    for (i, b) in bars.iter().enumerate() {
        let x = xs[i] + (slot - bw) / 2.0;
        if let Some(v) = b.value.filter(|v| f.scale == Scale::Linear || *v > 0.0) {
            let y = f.y(v).clamp(mt, mt + ph);
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
}

/// The two axes and their titles.
fn draw_axes(s: &mut String, f: &Frame, y_label: &str, x_label: &str) {
    let (ml, mt, pw, ph) = (f.ml, f.mt, f.pw, f.ph);
    let base_y = f.base_y();
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
        f.h - 6.0,
        esc(x_label)
    );
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
    let (lo, hi, ticks) = y_axis(scale, vmin, vmax, tick_fmt);
    let frame = Frame {
        h,
        ml,
        mt,
        pw,
        ph,
        label_h,
        scale,
        lo,
        hi,
    };
    let (groups, xs, slot) = x_layout(bars, ml, pw);
    draw_groups(&mut s, &frame, &groups, &xs, slot);
    draw_y_ticks(&mut s, &frame, &ticks);
    draw_bars(&mut s, &frame, bars, &xs, slot, show_labels);
    draw_axes(&mut s, &frame, y_label, x_label);
    s.push_str("</svg>");
    s
}

// ------------------------------------------------------------------------------------------
// Horizontal bar chart
// ------------------------------------------------------------------------------------------

/// Horizontal bar chart of labelled values (e.g. seconds per stage).
pub(super) fn hbar_chart_svg(
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
// Per-linear figures
// ------------------------------------------------------------------------------------------

/// One per-linear quantity charted per pass.
struct Metric {
    title: &'static str,
    y_label: &'static str,
    /// Where the value sits in a layer record (shown in the hover text).
    path: &'static str,
    value: fn(&LinearRecord) -> Option<f64>,
    /// None: log when all values are positive and span more than 50×, else linear.
    scale: Option<Scale>,
    fmt: fn(f64) -> String,
    caption: &'static str,
}

fn note(l: &LinearRecord, key: &str) -> Option<f64> {
    finite_opt(l.notes.get(key).and_then(|v| v.as_f64()))
}

fn sci(v: f64) -> String {
    format!("{v:.3e}")
}

fn frac_pct(v: f64) -> String {
    format!("{:.2} %", if v <= 1.0 { 100.0 * v } else { v })
}

const METRICS: [Metric; 5] = [
    Metric {
        title: "Relative output error per linear",
        y_label: "‖(W−Ŵ)X‖² / ‖WX‖² (log)",
        path: "rel_output_error",
        value: |l| finite_opt(l.rel_output_error),
        scale: Some(Scale::Log),
        fmt: sci,
        caption: "Relative output reconstruction error on the calibration inputs, log scale; grouped by layer. Hover a bar for its value.",
    },
    Metric {
        title: "GPTQ loss per linear",
        y_label: "loss",
        path: "loss",
        value: |l| finite_opt(l.loss),
        scale: None,
        fmt: sci,
        caption: "Σ((w−q)/[H⁻¹]ⱼⱼ)² per linear; grouped by layer. Hover a bar for its value.",
    },
    Metric {
        title: "Sparsity per linear",
        y_label: "sparsity",
        path: "notes.sparsity",
        value: |l| note(l, "sparsity"),
        scale: Some(Scale::Linear),
        fmt: frac_pct,
        caption: "Fraction of weights pruned per linear (notes.sparsity).",
    },
    Metric {
        title: "Stored bits per weight per linear (size budget)",
        y_label: "bits per weight",
        path: "notes.bits_per_weight",
        value: |l| note(l, "bits_per_weight"),
        scale: Some(Scale::Linear),
        fmt: |v| format!("{v:.3}"),
        caption: "The allocation of a size budget: the stored bits per weight (codes, scales, zero points) of the grid each linear got; hover a bar for the grid (notes.candidate).",
    },
    Metric {
        title: "Rank per linear",
        y_label: "rank",
        path: "notes.rank",
        value: |l| note(l, "rank"),
        scale: Some(Scale::Linear),
        fmt: fmt_int,
        caption: "Rank kept per linear (notes.rank).",
    },
];

/// Distinct values in first-seen order.
fn distinct<'a>(it: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = vec![];
    for x in it {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

/// Colours per linear name, and the legend that names them.
struct Legend<'a> {
    names: Vec<&'a str>,
    html: String,
}

impl<'a> Legend<'a> {
    fn new(layers: &'a [LinearRecord]) -> Self {
        let names = distinct(layers.iter().map(|l| l.linear.as_str()));
        let mut html = String::from("<div class=\"legend\">");
        for (i, n) in names.iter().enumerate() {
            let _ = write!(
                html,
                "<span><span class=\"sw\" style=\"background:{}\"></span>{}</span>",
                PALETTE[i % PALETTE.len()],
                esc(n)
            );
        }
        html.push_str("</div>");
        Legend { names, html }
    }

    fn color(&self, linear: &str) -> &'static str {
        let i = self.names.iter().position(|x| *x == linear).unwrap_or(0);
        PALETTE[i % PALETTE.len()]
    }
}

/// One figure per metric and pass that has any value: relative output error, loss, sparsity,
/// rank.
pub(super) fn layer_charts(b: &mut String, layers: &[LinearRecord]) {
    let legend = Legend::new(layers);
    let passes = distinct(layers.iter().map(|l| l.pass.as_str()));
    for m in &METRICS {
        for pass in &passes {
            let recs: Vec<&LinearRecord> = layers.iter().filter(|l| l.pass == *pass).collect();
            if recs.iter().any(|l| (m.value)(l).is_some()) {
                layer_chart(b, m, pass, passes.len() > 1, &recs, &legend);
            }
        }
    }
}

/// Log when the metric asks for it, or (no preference) when all values are positive and span
/// more than 50×.
fn choose_scale(m: &Metric, vals: &[f64]) -> Scale {
    m.scale.unwrap_or_else(|| {
        let pos: Vec<f64> = vals.iter().cloned().filter(|v| *v > 0.0).collect();
        let mx = pos.iter().cloned().fold(f64::MIN, f64::max);
        let mn = pos.iter().cloned().fold(f64::MAX, f64::min);
        if pos.len() == vals.len() && !pos.is_empty() && mx / mn > 50.0 {
            Scale::Log
        } else {
            Scale::Linear
        }
    })
}

fn layer_chart(
    b: &mut String,
    m: &Metric,
    pass: &str,
    several_passes: bool,
    recs: &[&LinearRecord],
    legend: &Legend,
) {
    let vals: Vec<f64> = recs.iter().filter_map(|l| (m.value)(l)).collect();
    let scale = choose_scale(m, &vals);
    let frac = m.path == "notes.sparsity" && vals.iter().all(|v| *v <= 1.0);
    let bars: Vec<Bar> = recs
        .iter()
        .map(|l| {
            let v = (m.value)(l);
            let shown = v.map(m.fmt).unwrap_or_else(|| "no value".into());
            Bar {
                group: format!("layer {}", l.layer),
                label: short_linear(&l.linear),
                value: v.map(|v| if frac { 100.0 * v } else { v }),
                color: legend.color(&l.linear),
                title: format!(
                    "layer {} · {} · {pass}\n{}: {shown}",
                    l.layer, l.linear, m.path
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
    let title = if several_passes {
        format!("{} — pass {}", m.title, pass)
    } else {
        m.title.to_string()
    };
    let missing = recs.len() - vals.len();
    let _ = writeln!(
        b,
        "<figure>\n<h3>{}</h3>\n{}\n{}\n<figcaption>{}{}</figcaption>\n</figure>",
        esc(&title),
        bar_chart_svg(&y_label, "layer · linear", &bars, scale, tick),
        legend.html,
        esc(m.caption),
        if missing > 0 {
            esc(&format!(
                " {missing} records carry no value (hollow markers)."
            ))
        } else {
            String::new()
        }
    );
}
