//! No two top-level modules of the library import each other, directly or through others.
//!
//! The graph is read from the source: every `crate::NAME` path (also inside `use crate::{A,
//! B::c}` groups, and `crate::info!`-style macros, attributed to the module that defines the
//! macro) in a file under `src/NAME/` or `src/NAME.rs` is an edge from that file's top-level
//! module to NAME; comment lines are skipped. `src/main.rs`, `src/lib.rs` and `src/bin/` are
//! the crate's roots and binaries, not modules. `cargo test --release --test module_graph --
//! --nocapture` prints the edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module of a file under `src/` (None for the crate roots and binaries).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_string();
    (!matches!(name.as_str(), "main" | "lib" | "bin")).then_some(name)
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level names a piece of code reaches through `crate::`: (name, is_macro).
fn crate_refs(code: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::{c, d}, e}`: the identifiers at depth 1 right after `{` or `,`
            let mut depth = 1;
            let mut expect = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => expect = true,
                    c if c.is_whitespace() => {}
                    _ if expect && depth == 1 => {
                        let id = ident(&group[j..]);
                        if !id.is_empty() {
                            out.push((id.to_string(), false));
                        }
                        expect = false;
                    }
                    _ => {}
                }
            }
        } else {
            let id = ident(rest);
            if !id.is_empty() {
                let is_macro = rest[id.len()..].starts_with('!');
                out.push((id.to_string(), is_macro));
            }
        }
    }
    out
}

fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let code = |f: &Path| -> String {
        std::fs::read_to_string(f)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // `#[macro_export]` macros live at the crate root: attribute them to their file's module
    let mut macros = BTreeMap::new();
    for f in &files {
        let Some(m) = top_module(src, f) else {
            continue;
        };
        for (i, _) in code(f).match_indices("macro_rules!") {
            let name = ident(code(f)[i + "macro_rules!".len()..].trim_start()).to_string();
            macros.insert(name, m.clone());
        }
    }
    let g_modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(src, f)).collect();
    let mut g = Graph::new();
    for f in &files {
        let Some(m) = top_module(src, f) else {
            continue;
        };
        let deps = g.entry(m.clone()).or_default();
        for (name, is_macro) in crate_refs(&code(f)) {
            // `use crate::{info}` names a macro as a group member
            let target = if is_macro || !g_modules.contains(&name) {
                macros.get(&name).cloned().unwrap_or(name)
            } else {
                name
            };
            if target != m {
                deps.insert(target);
            }
        }
    }
    g
}

/// One cycle of `g` (its modules in order), if there is any.
fn find_cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &Graph,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let at = path.iter().position(|p| p == n).unwrap();
                let mut c = path[at..].to_vec();
                c.push(n.to_string());
                return Some(c);
            }
            _ => {}
        }
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_parser_sees_groups_macros_and_plain_paths() {
    let refs = crate_refs(
        "use crate::{calib, info};\nuse crate::model::{Checkpoint, layer::X};\n\
         crate::info!(\"x\"); let y = crate::quant::f(); use crate::{a::{b, c}, d};",
    );
    let names: Vec<(&str, bool)> = refs.iter().map(|(n, m)| (n.as_str(), *m)).collect();
    assert_eq!(
        names,
        [
            ("calib", false),
            ("info", false),
            ("model", false),
            ("info", true),
            ("quant", false),
            ("a", false),
            ("d", false)
        ]
    );
    let mut g = Graph::new();
    for (a, b) in [("x", "y"), ("y", "z"), ("z", "x"), ("z", "w")] {
        g.entry(a.into()).or_default().insert(b.into());
    }
    assert_eq!(
        find_cycle(&g),
        Some(vec!["x".into(), "y".into(), "z".into(), "x".into()])
    );
    g.get_mut("z").unwrap().remove("x");
    assert_eq!(find_cycle(&g), None);
}

#[test]
fn top_level_modules_import_each_other_without_cycles() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let g = graph(&src);
    for (m, deps) in &g {
        println!(
            "{m} -> {}",
            deps.iter().cloned().collect::<Vec<_>>().join(" ")
        );
    }
    if let Some(c) = find_cycle(&g) {
        panic!("modules import each other in a cycle: {}", c.join(" -> "));
    }
    // edges the layering depends on are seen (the reader works on this tree)
    for (a, b) in [
        ("model", "formats"),
        ("formats", "quant"),
        ("export", "formats"),
        ("passes", "engine"),
        ("engine", "model"),
        ("formats", "safetensors_file"),
    ] {
        assert!(g[a].contains(b), "expected an import {a} -> {b}");
    }
    assert!(g.len() >= 15, "modules found: {:?}", g.keys());
}
