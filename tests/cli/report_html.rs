//! The HTML / Markdown views of a [`Report`] (`compress::report::html`): self-contained pages
//! (no external references), escaped text, one SVG per chart, reports without the optional
//! fields render, `compress.report/1` files still read, the comparison marks a best value per
//! row.
//!
//! `REPORT_HTML_DUMP=/some/dir cargo test --release --test cli report_html::` also writes the pages
//! (report.html, report_full.html, compare.html) there, for a look in a browser (see the doc
//! comment of src/report/html/mod.rs for the headless screenshot command; not part of the
//! tests).

use compress::report::html::{render_compare_html, render_compare_markdown, render_html};
use compress::report::Report;
use serde_json::{json, Value};

/// `out/quickstart/report.json` of a GPTQ W4 g128 run on the reference model (copied here so
/// the test does not depend on files outside the crate). Schema `compress.report/1`: no
/// `summary`, `tasks`, `output.sparsity` or task timings.
const EXAMPLE: &str = r#"{
  "schema": "compress.report/1",
  "tool_version": "0.1.0",
  "model": {
    "path": "../shared/models/ref-llama-9m",
    "architecture": "llama",
    "num_layers": 6,
    "parameters": 8916224,
    "dtype": "BF16",
    "size_bytes": 17838656
  },
  "pipeline": {
    "model": "../shared/models/ref-llama-9m",
    "output": "out/quickstart",
    "device": "cpu",
    "calibration": {
      "path": "../shared/data/calib/c4_calib.jsonl",
      "field": "text",
      "samples": 128,
      "seq_len": 512,
      "seed": 0,
      "batch": 8
    },
    "passes": [
      {
        "gptq": {
          "bits": 4,
          "strategy": "group",
          "group_size": 128,
          "sym": true,
          "observer": "minmax",
          "targets": [
            "Linear"
          ],
          "ignore": [
            "lm_head"
          ],
          "damp": 0.01,
          "block_size": 128,
          "act_order": false,
          "static_groups": false,
          "true_sequential": true
        }
      }
    ],
    "export": {
      "format": "compressed-tensors",
      "max_shard_bytes": null
    },
    "eval": {
      "datasets": [
        "../shared/data/eval/wikitext2/wiki.test.raw"
      ],
      "seq_len": 512,
      "baseline": true,
      "batch": 4
    }
  },
  "output": {
    "path": "out/quickstart",
    "format": "compressed-tensors",
    "size_bytes": 10844440,
    "compression_ratio": 1.6449587069502898,
    "bits_per_weight": 4.126139322916667,
    "files": [
      "model.safetensors",
      "config.json",
      "tokenizer.json",
      "tokenizer_config.json",
      "generation_config.json"
    ],
    "identical_to_input": null
  },
  "eval_seq_len": 512,
  "eval": {
    "wiki.test.raw": {
      "file": "../shared/data/eval/wikitext2/wiki.test.raw",
      "before": {
        "perplexity": 208.59727750690655,
        "tokens": 342955,
        "windows": 669,
        "nll": 5.340405491220269
      },
      "after": {
        "perplexity": 208.69903285352922,
        "tokens": 342955,
        "windows": 669,
        "nll": 5.340893179925456
      },
      "delta_pct": 0.048780764465776984
    }
  },
  "layers": [
    {"layer": 0, "linear": "self_attn.q_proj", "pass": "gptq", "rel_output_error": 0.000997641005686851, "loss": 0.6596099895257099, "seconds": 3.87715818, "notes": {"damp": 0.01}},
    {"layer": 0, "linear": "self_attn.k_proj", "pass": "gptq", "rel_output_error": 0.0008058269043753037, "loss": 0.27006800185003216, "seconds": 0.00572579, "notes": {"damp": 0.01}},
    {"layer": 0, "linear": "self_attn.v_proj", "pass": "gptq", "rel_output_error": 0.0013852038168016107, "loss": 0.19697801023681857, "seconds": 0.005690779, "notes": {"damp": 0.01}},
    {"layer": 0, "linear": "self_attn.o_proj", "pass": "gptq", "rel_output_error": 0.0007576109985291089, "loss": 0.08031591870559988, "seconds": 3.529357121, "notes": {"damp": 0.01}},
    {"layer": 0, "linear": "mlp.gate_proj", "pass": "gptq", "rel_output_error": 7.120034127810382e-05, "loss": 0.46077493836365024, "seconds": 3.184882901, "notes": {"damp": 0.01}},
    {"layer": 0, "linear": "mlp.up_proj", "pass": "gptq", "rel_output_error": 8.269261947520742e-05, "loss": 0.4074190269598554, "seconds": 0.014641568, "notes": {"damp": 0.01}},
    {"layer": 0, "linear": "mlp.down_proj", "pass": "gptq", "rel_output_error": 0.00043165361892072776, "loss": 3.9262168548382883, "seconds": 3.365854129, "notes": {"damp": 0.01}},
    {"layer": 1, "linear": "self_attn.q_proj", "pass": "gptq", "rel_output_error": 0.00014106325486749893, "loss": 0.22726253666405655, "seconds": 3.319889345, "notes": {"damp": 0.01}},
    {"layer": 1, "linear": "self_attn.k_proj", "pass": "gptq", "rel_output_error": 0.00021941367260338456, "loss": 0.1022921432550158, "seconds": 0.006443941, "notes": {"damp": 0.01}},
    {"layer": 1, "linear": "self_attn.v_proj", "pass": "gptq", "rel_output_error": 0.0004248583724109307, "loss": 0.09612492778486932, "seconds": 0.00629956, "notes": {"damp": 0.01}},
    {"layer": 1, "linear": "self_attn.o_proj", "pass": "gptq", "rel_output_error": 0.00016375759025592088, "loss": 0.10223915132557372, "seconds": 3.168500752, "notes": {"damp": 0.01}},
    {"layer": 1, "linear": "mlp.gate_proj", "pass": "gptq", "rel_output_error": 0.00029713784180975016, "loss": 1.018623690123622, "seconds": 3.132428101, "notes": {"damp": 0.01}},
    {"layer": 1, "linear": "mlp.up_proj", "pass": "gptq", "rel_output_error": 0.0004533502427783906, "loss": 0.7219116182034374, "seconds": 0.017480804, "notes": {"damp": 0.01}},
    {"layer": 1, "linear": "mlp.down_proj", "pass": "gptq", "rel_output_error": 0.001673570904354602, "loss": 0.5742892777649802, "seconds": 3.264701922, "notes": {"damp": 0.01}},
    {"layer": 2, "linear": "self_attn.q_proj", "pass": "gptq", "rel_output_error": 0.000365431113422327, "loss": 0.2778971448228984, "seconds": 3.299719598, "notes": {"damp": 0.01}},
    {"layer": 2, "linear": "self_attn.k_proj", "pass": "gptq", "rel_output_error": 0.00047561278111810774, "loss": 0.12859294388830303, "seconds": 0.006460326, "notes": {"damp": 0.01}},
    {"layer": 2, "linear": "self_attn.v_proj", "pass": "gptq", "rel_output_error": 0.000682787758910328, "loss": 0.12100202210823967, "seconds": 0.005507339, "notes": {"damp": 0.01}},
    {"layer": 2, "linear": "self_attn.o_proj", "pass": "gptq", "rel_output_error": 8.0176104839801e-05, "loss": 0.02285833760697268, "seconds": 3.222021959, "notes": {"damp": 0.01}},
    {"layer": 2, "linear": "mlp.gate_proj", "pass": "gptq", "rel_output_error": 0.0003652382441073481, "loss": 1.2578441156320126, "seconds": 3.236492959, "notes": {"damp": 0.01}},
    {"layer": 2, "linear": "mlp.up_proj", "pass": "gptq", "rel_output_error": 0.0006018385055131798, "loss": 0.9095498642126859, "seconds": 0.01278351, "notes": {"damp": 0.01}},
    {"layer": 2, "linear": "mlp.down_proj", "pass": "gptq", "rel_output_error": 0.0020608279734031214, "loss": 0.5692059673577532, "seconds": 3.267474024, "notes": {"damp": 0.01}},
    {"layer": 3, "linear": "self_attn.q_proj", "pass": "gptq", "rel_output_error": 0.00033397244493062607, "loss": 0.32804360165224433, "seconds": 3.202248765, "notes": {"damp": 0.01}},
    {"layer": 3, "linear": "self_attn.k_proj", "pass": "gptq", "rel_output_error": 0.0003595606322308477, "loss": 0.14930658036852062, "seconds": 0.004568275, "notes": {"damp": 0.01}},
    {"layer": 3, "linear": "self_attn.v_proj", "pass": "gptq", "rel_output_error": 0.00067689481811108, "loss": 0.20344562943041783, "seconds": 0.004597896, "notes": {"damp": 0.01}},
    {"layer": 3, "linear": "self_attn.o_proj", "pass": "gptq", "rel_output_error": 0.00010590637124905656, "loss": 0.10399205676823539, "seconds": 3.204486562, "notes": {"damp": 0.01}},
    {"layer": 3, "linear": "mlp.gate_proj", "pass": "gptq", "rel_output_error": 0.00043032598097070534, "loss": 1.7153241319664363, "seconds": 3.128993176, "notes": {"damp": 0.01}},
    {"layer": 3, "linear": "mlp.up_proj", "pass": "gptq", "rel_output_error": 0.0006667987358074429, "loss": 1.2643454317334468, "seconds": 0.014681982, "notes": {"damp": 0.01}},
    {"layer": 3, "linear": "mlp.down_proj", "pass": "gptq", "rel_output_error": 0.002099979945246558, "loss": 0.8853607011777822, "seconds": 3.231322357, "notes": {"damp": 0.01}},
    {"layer": 4, "linear": "self_attn.q_proj", "pass": "gptq", "rel_output_error": 0.00048521588505183097, "loss": 0.39403010994851434, "seconds": 3.195224766, "notes": {"damp": 0.01}},
    {"layer": 4, "linear": "self_attn.k_proj", "pass": "gptq", "rel_output_error": 0.0004384348661618111, "loss": 0.1679700473754849, "seconds": 0.00459685, "notes": {"damp": 0.01}},
    {"layer": 4, "linear": "self_attn.v_proj", "pass": "gptq", "rel_output_error": 0.0007457603527712652, "loss": 0.26332535176888544, "seconds": 0.004501766, "notes": {"damp": 0.01}},
    {"layer": 4, "linear": "self_attn.o_proj", "pass": "gptq", "rel_output_error": 0.00012069998521371916, "loss": 0.1261836942968415, "seconds": 3.134623178, "notes": {"damp": 0.01}},
    {"layer": 4, "linear": "mlp.gate_proj", "pass": "gptq", "rel_output_error": 0.0005317500384753914, "loss": 2.2627423161224636, "seconds": 3.114328778, "notes": {"damp": 0.01}},
    {"layer": 4, "linear": "mlp.up_proj", "pass": "gptq", "rel_output_error": 0.0007345465240873061, "loss": 1.7924913553040924, "seconds": 0.011820959, "notes": {"damp": 0.01}},
    {"layer": 4, "linear": "mlp.down_proj", "pass": "gptq", "rel_output_error": 0.002257341479555072, "loss": 1.5751532452604529, "seconds": 3.221080025, "notes": {"damp": 0.01}},
    {"layer": 5, "linear": "self_attn.q_proj", "pass": "gptq", "rel_output_error": 0.0005265513878089488, "loss": 0.5000777856238328, "seconds": 3.266505952, "notes": {"damp": 0.01}},
    {"layer": 5, "linear": "self_attn.k_proj", "pass": "gptq", "rel_output_error": 0.0004682624408671436, "loss": 0.2209748681193754, "seconds": 0.004480877, "notes": {"damp": 0.01}},
    {"layer": 5, "linear": "self_attn.v_proj", "pass": "gptq", "rel_output_error": 0.0011342256230002532, "loss": 0.3290637172535948, "seconds": 0.004334671, "notes": {"damp": 0.01}},
    {"layer": 5, "linear": "self_attn.o_proj", "pass": "gptq", "rel_output_error": 0.00013341831546398106, "loss": 0.1793339074409334, "seconds": 3.307471596, "notes": {"damp": 0.01}},
    {"layer": 5, "linear": "mlp.gate_proj", "pass": "gptq", "rel_output_error": 0.0006452502424075744, "loss": 2.639201135744551, "seconds": 3.287535287, "notes": {"damp": 0.01}},
    {"layer": 5, "linear": "mlp.up_proj", "pass": "gptq", "rel_output_error": 0.0007755963060157708, "loss": 2.2207009730312706, "seconds": 0.01497161, "notes": {"damp": 0.01}},
    {"layer": 5, "linear": "mlp.down_proj", "pass": "gptq", "rel_output_error": 0.0015698828601315082, "loss": 2.3772799985183104, "seconds": 3.445285877, "notes": {"damp": 0.01}}
  ],
  "warnings": [],
  "timing": {
    "total_seconds": 291.859992815,
    "calibration_seconds": 0.751593969,
    "compress_seconds": 92.794668802,
    "eval_before_seconds": 93.932948486,
    "eval_after_seconds": 104.379809945
  },
  "peak_rss_bytes": 506343424
}"#;

fn example_json() -> Value {
    serde_json::from_str(EXAMPLE).expect("example report parses")
}

fn report(v: Value) -> Report {
    serde_json::from_value(v).expect("a compress report")
}

fn example() -> Report {
    report(example_json())
}

/// The example plus every optional field the page knows: zero-shot tasks, sparsity / rank
/// notes, `output.sparsity`, `summary.mcr`, and warnings with markup in them.
fn full_json() -> Value {
    let mut r = example_json();
    r["tasks"] = json!({
        "piqa": {
            "before": {"task": "piqa", "metrics": {"acc": 0.6235, "acc_norm": 0.6001}, "stderr": {"acc": 0.0113, "acc_norm": 0.0114}, "n": 1838},
            "after": {"task": "piqa", "metrics": {"acc": 0.6180, "acc_norm": 0.5990}, "stderr": {"acc": 0.0113, "acc_norm": 0.0114}, "n": 1838}
        },
        "lambada": {
            "before": {"task": "lambada", "metrics": {"acc": 0.2104, "perplexity": 301.5}, "stderr": {"acc": 0.0057}, "n": 5153},
            "after": {"task": "lambada", "metrics": {"acc": 0.2011, "perplexity": 322.25}, "stderr": {"acc": 0.0056}, "n": 5153}
        }
    });
    r["output"]["sparsity"] = json!(0.5);
    r["summary"] = json!({"mcr": 1.6123});
    r["warnings"] = json!([
        "layer 3 mlp.down_proj: damping raised to 0.1 <script>alert('x')</script> & \"quotes\"",
        "calibration: 12 samples shorter than seq_len"
    ]);
    r["pipeline"]["note"] = json!("<b>not bold</b>");
    for (i, l) in r["layers"].as_array_mut().unwrap().iter_mut().enumerate() {
        l["notes"]["sparsity"] = json!(0.5 + 0.001 * i as f64);
        l["notes"]["rank"] = json!(32 + i);
    }
    r
}

fn full() -> Report {
    report(full_json())
}

/// Only the fields every report has: the optional ones (`eval_seq_len`, `bits_per_weight`,
/// `sparsity`, `identical_to_input`, `summary`, `tasks`, `peak_rss_bytes`, …) left out.
fn minimal_json() -> Value {
    json!({
        "schema": "compress.report/1",
        "tool_version": "0.1.0",
        "model": {"path": "m<1>", "architecture": "llama", "num_layers": 2, "parameters": 1000,
            "dtype": "weird", "size_bytes": 0},
        "pipeline": null,
        "output": {"path": "o", "format": "fake-quant", "size_bytes": 100,
            "compression_ratio": 0.0, "files": []},
        "eval": {},
        "layers": [],
        "warnings": [],
        "timing": {"total_seconds": 1.5, "calibration_seconds": 0.0, "compress_seconds": 100.0,
            "eval_before_seconds": 0.0, "eval_after_seconds": 0.0}
    })
}

fn assert_self_contained(html: &str) {
    for bad in [
        "http://", "https://", "src=", "<link", "@import", "url(", "<script", "<iframe",
    ] {
        assert!(!html.contains(bad), "output contains {bad:?}");
    }
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.trim_end().ends_with("</html>"));
    assert_eq!(html.matches("<svg").count(), html.matches("</svg>").count());
}

fn dump(name: &str, s: &str) {
    if let Ok(dir) = std::env::var("REPORT_HTML_DUMP") {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(std::path::Path::new(&dir).join(name), s).unwrap();
    }
}

#[test]
fn example_report_page() {
    let html = render_html(&example());
    dump("report.html", &html);
    assert_self_contained(&html);
    // header
    for s in [
        "../shared/models/ref-llama-9m",
        "out/quickstart",
        "compressed-tensors",
        "0.1.0",
        "compress.report/1",
    ] {
        assert!(html.contains(s), "missing {s:?}");
    }
    // perplexity before / after / delta, formatted
    assert!(html.contains("wiki.test.raw"));
    assert!(html.contains("208.5973"));
    assert!(html.contains("208.6990"));
    assert!(html.contains("+0.049 %"));
    // size, bits per weight, ratio, MCR computed from the first data set
    assert!(html.contains("17.01 MiB"));
    assert!(html.contains("10.34 MiB"));
    assert!(html.contains("4.126"));
    assert!(html.contains("1.645×"));
    let mcr = 1.6449587069502898 * 208.59727750690655 / 208.69903285352922;
    assert!(html.contains(&format!("{mcr:.3}")), "MCR {mcr:.3}");
    assert!(html.contains("computed here"));
    // charts: rel_output_error, loss, timing
    assert_eq!(html.matches("<svg").count(), 3);
    assert!(html.contains("Relative output error per linear"));
    assert!(html.contains("GPTQ loss per linear"));
    assert!(html.contains("Wall time per stage"));
    // hover values on bars
    assert!(html
        .contains("<title>layer 0 · self_attn.q_proj · gptq\nrel_output_error: 9.976e-4</title>"));
    // no warnings, peak memory, pipeline
    assert!(html.contains("<p class=\"ok\">none</p>"));
    assert!(html.contains("482.89 MiB"));
    assert!(html.contains("&quot;group_size&quot;: 128"));
}

#[test]
fn full_report_page_escapes_and_charts_everything() {
    let html = render_html(&full());
    dump("report_full.html", &html);
    assert_self_contained(&html);
    // warnings escaped, highlighted
    assert!(
        html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;quotes&quot;")
    );
    assert!(html.contains("<ul class=\"warnings\">"));
    assert!(html.contains("calibration: 12 samples shorter than seq_len"));
    // pipeline text escaped
    assert!(html.contains("&lt;b&gt;not bold&lt;/b&gt;"));
    assert!(!html.contains("<b>not bold"));
    // tasks: acc / acc_norm with stderr, other metrics
    assert!(html.contains("piqa"));
    assert!(html.contains("62.35 ± 1.13 %"));
    assert!(html.contains("59.90 ± 1.14 %"));
    assert!(html.contains("-0.55 pp"));
    assert!(html.contains("322.2500"));
    // sparsity, reported MCR
    assert!(html.contains("50.00 %"));
    assert!(html.contains("1.612"));
    assert!(html.contains("summary.mcr"));
    assert!(!html.contains("computed here"));
    // charts: rel error, loss, sparsity, rank, timing
    assert_eq!(html.matches("<svg").count(), 5);
    assert!(html.contains("Sparsity per linear"));
    assert!(html.contains("Rank per linear"));
}

/// A `compress.report/1` file reads back through `Report::from_file`, the fields v2 added
/// defaulted.
#[test]
fn report_v1_file_reads() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("report.json");
    std::fs::write(&p, EXAMPLE).unwrap();
    let r = Report::from_file(&p).unwrap();
    assert_eq!(r.schema, "compress.report/1");
    assert!(r.summary.mcr.is_none() && r.tasks.is_empty() && r.output.sparsity.is_none());
    assert_eq!(r.layers.len(), 42);
    assert_eq!(render_html(&r), render_html(&example()));
}

#[test]
fn partial_and_odd_reports_render() {
    let mut odd = minimal_json();
    odd["output"]["format"] = json!("gptq");
    odd["eval"] = json!({
        "d.raw": {"file": "d.raw", "before": null, "delta_pct": null,
            "after": {"perplexity": 12.5, "tokens": 100, "windows": 1, "nll": 2.5}},
        "e.raw": {"file": "e.raw", "after": null, "delta_pct": null,
            "before": {"perplexity": 7.25, "tokens": 2000, "windows": 3, "nll": 2.0}}
    });
    odd["layers"] = json!([
        {"layer": 0, "linear": "q_proj", "pass": "gptq", "rel_output_error": 0.0, "seconds": 0.0, "notes": {}},
        {"layer": 0, "linear": "k_proj", "pass": "gptq", "rel_output_error": null, "loss": 3.0, "seconds": 0.0, "notes": {}},
        {"layer": 1, "linear": "q_proj", "pass": "rtn", "rel_output_error": 1e-3, "seconds": 0.1, "notes": {"bits": 4}}
    ]);
    odd["warnings"] = json!(["one string"]);
    odd["pipeline"] = json!("not an object");
    let cases = [report(minimal_json()), report(odd)];
    for r in &cases {
        let html = render_html(r);
        assert_self_contained(&html);
        assert!(html.contains("Warnings"));
    }
    let html = render_html(&cases[1]);
    assert!(html.contains("m&lt;1&gt;"));
    assert!(html.contains("12.5000"));
    assert!(html.contains("one string"));
    assert!(!html.contains("<p class=\"ok\">none</p>"));
    // a data set measured before only shows that measurement's windows, as report.md does
    assert!(html.contains("3 windows, 2,000 tokens"));
    assert!(html.contains("records carry no value (hollow markers)"));
    let html = render_html(&cases[0]);
    assert!(html.contains("<p class=\"ok\">none</p>"));
    assert!(html.contains("MCR not available"));
    assert!(!html.contains("Pipeline as run"));
}

fn runs() -> Vec<(String, Report)> {
    let w4 = example_json();
    let mut w3 = example_json();
    w3["output"]["bits_per_weight"] = json!(3.127);
    w3["output"]["size_bytes"] = json!(8_900_000u64);
    w3["output"]["compression_ratio"] = json!(17838656.0 / 8_900_000.0);
    w3["output"]["format"] = json!("gptq");
    w3["eval"]["wiki.test.raw"]["after"]["perplexity"] = json!(231.5);
    w3["eval"]["wiki.test.raw"]["delta_pct"] = json!(10.98);
    w3["timing"]["compress_seconds"] = json!(80.5);
    w3["warnings"] = json!(["damping raised <x>"]);
    let mut tasks = full_json();
    tasks["output"]["sparsity"] = json!(null);
    vec![
        ("gptq-w4g128".to_string(), report(w4)),
        ("gptq-w3 <b>".to_string(), report(w3)),
        ("with-tasks".to_string(), report(tasks)),
        ("old|partial".to_string(), report(minimal_json())),
    ]
}

#[test]
fn compare_markdown_marks_best() {
    let md = render_compare_markdown(&runs());
    dump("compare.md", &md);
    assert!(md.contains("gptq-w4g128"));
    assert!(md.contains("gptq-w3 <b>"));
    assert!(md.contains("with-tasks"));
    assert!(md.contains("old\\|partial"));
    // lower bits per weight wins, lower perplexity wins, higher accuracy (only one run has it: not marked)
    assert!(md.contains("**3.127**"));
    assert!(md.contains("**208.6990 (+0.049 %)**"));
    assert!(md.contains("231.5000 (+10.980 %)"));
    assert!(!md.contains("**231.5000"));
    assert!(md.contains("| piqa · acc |"));
    assert!(!md.contains("**61.80"));
    // compress seconds: the w3 run is fastest
    assert!(md.contains("**80.50 s**"));
    // every row has one cell per run
    for line in md.lines().filter(|l| l.starts_with("| ")) {
        let cells = line.replace("\\|", "").matches('|').count();
        assert_eq!(cells, 6, "{line}");
    }
}

#[test]
fn compare_html_marks_best_and_is_self_contained() {
    let html = render_compare_html(&runs());
    dump("compare.html", &html);
    assert_self_contained(&html);
    for name in [
        "gptq-w4g128",
        "gptq-w3 &lt;b&gt;",
        "with-tasks",
        "old|partial",
    ] {
        assert!(html.contains(name), "missing run {name}");
    }
    assert!(html.contains("<td class=\"n best\"><strong>3.127</strong></td>"));
    assert!(html.contains("damping raised &lt;x&gt;"));
    assert!(html.contains("wiki.test.raw"));
    assert!(html.contains("piqa · acc_norm"));
}

/// A 32-layer model with two passes (sparsity then quantization): one chart per pass and
/// metric, bar labels dropped for the many bars, layer numbers kept.
#[test]
fn many_layers_two_passes() {
    let linears = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    let mut layers = vec![];
    for l in 0..32 {
        for (i, name) in linears.iter().enumerate() {
            let e = 1e-4 * (1.0 + l as f64 / 4.0) * (1.0 + i as f64);
            layers.push(json!({"layer": l, "linear": name, "pass": "sparsegpt",
                "rel_output_error": e, "seconds": 0.5, "notes": {"sparsity": 0.5}}));
            layers.push(json!({"layer": l, "linear": name, "pass": "gptq",
                "rel_output_error": 2.0 * e, "loss": 10.0 * e * (l + 1) as f64, "seconds": 0.7,
                "notes": {"damp": 0.01}}));
        }
    }
    let mut r = example_json();
    r["layers"] = Value::Array(layers);
    r["model"]["num_layers"] = json!(32);
    let html = render_html(&report(r));
    dump("report_32.html", &html);
    assert_self_contained(&html);
    // rel error × 2 passes, loss (gptq), sparsity (sparsegpt), timing
    assert_eq!(html.matches("<svg").count(), 5);
    assert!(html.contains("Relative output error per linear — pass sparsegpt"));
    assert!(html.contains("Relative output error per linear — pass gptq"));
    assert!(html.contains("layer 31 · mlp.down_proj · gptq"));
}
