//! Number and text formatting shared by every view of a report (Markdown, HTML, comparison).

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

pub(crate) fn esc(s: &str) -> String {
    escape_html(s)
}

/// Markdown table cell: escape pipes and fold newlines.
pub(crate) fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// The placeholder of a missing value.
pub(crate) fn dash() -> String {
    "—".to_string()
}

/// A JSON value as text (strings as they are, everything else as JSON).
pub(crate) fn value_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Bytes in MiB with two decimals (the Markdown report's unit).
pub(crate) fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Bytes in the largest binary unit that keeps the number at or above 1.
pub(crate) fn fmt_bytes(b: f64) -> String {
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

pub(crate) fn fmt_secs(s: f64) -> String {
    if s >= 100.0 {
        format!("{s:.1} s")
    } else if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{s:.3} s")
    }
}

/// An integer with thousands separators (`8916224` → `8,916,224`).
pub(crate) fn fmt_int(n: f64) -> String {
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

pub(crate) fn fmt_ppl(p: f64) -> String {
    format!("{p:.4}")
}

pub(crate) fn fmt_pct_signed(p: f64) -> String {
    format!("{p:+.3} %")
}

/// Compact general number: fixed for "ordinary" magnitudes, scientific otherwise.
pub(crate) fn fmt_num(v: f64) -> String {
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

/// A sparsity stored as a fraction, as a percentage (percentages are tolerated).
pub(crate) fn fmt_sparsity(s: f64) -> String {
    let p = if s <= 1.0 { 100.0 * s } else { s };
    format!("{p:.2} %")
}

pub(crate) fn is_lower_better_metric(metric: &str) -> bool {
    let m = metric.to_ascii_lowercase();
    m.contains("perplexity") || m.contains("ppl") || m.contains("loss") || m.contains("nll")
}

/// Accuracy-like metrics in [0, 1] are shown as percentages.
pub(crate) fn is_fraction_metric(metric: &str) -> bool {
    !is_lower_better_metric(metric)
}

/// A zero-shot score with its standard error: accuracies as percentages, the rest as numbers.
pub(crate) fn fmt_task_value(metric: &str, value: f64, stderr: Option<f64>) -> String {
    if is_fraction_metric(metric) {
        match stderr {
            Some(e) => format!("{:.2} ± {:.2} %", 100.0 * value, 100.0 * e),
            None => format!("{:.2} %", 100.0 * value),
        }
    } else {
        let f = |v: f64| {
            if metric.contains("perplexity") {
                fmt_ppl(v)
            } else {
                fmt_num(v)
            }
        };
        match stderr {
            Some(e) => format!("{} ± {}", f(value), f(e)),
            None => f(value),
        }
    }
}

/// Bits of one element of a checkpoint dtype (`BF16` → 16).
pub(crate) fn dtype_bits(dtype: &str) -> Option<f64> {
    let d = dtype.to_ascii_uppercase();
    let digits: String = d.chars().filter(|c| c.is_ascii_digit()).collect();
    let b: f64 = digits.get(..digits.len().min(2))?.parse().ok()?;
    if d.starts_with("F") || d.starts_with("BF") || d.starts_with("I") || d.starts_with("U") {
        Some(b)
    } else {
        None
    }
}
