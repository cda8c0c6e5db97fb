//! No two top-level modules of the library import each other, directly or through others.
//!
//! The graph is read from the source: every `crate::NAME` path (also inside `use crate::{A,
//! B::c}` groups, and `crate::info!`-style macros, attributed to the module that defines the
//! macro) in a file under `src/NAME/` or `src/NAME.rs` is an edge from that file's top-level
//! module to NAME; comment lines are skipped. `src/main.rs`, `src/lib.rs` and `src/bin/` are
//! the crate's roots and binaries, not modules. `cargo test --release --test cli module_graph:: --
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

// ---- circles inside a module: sibling files of one folder -------------------------------

/// A module path from the crate root (`["model", "layer"]`).
type ModPath = Vec<String>;

/// The module path of a file under `src/` (None for the binaries).
fn file_module(src: &Path, file: &Path) -> Option<ModPath> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    let last = parts.pop()?;
    match last.trim_end_matches(".rs") {
        "mod" | "lib" | "main" => {}
        name => parts.push(name.to_string()),
    }
    Some(parts)
}

/// Every path written with `crate::`, `$crate::`, `super::` or `self::` in `line`, made
/// absolute from `at` (the module the line is in), groups `{a, b::c}` expanded.
fn absolute_paths(line: &str, at: &[String]) -> Vec<ModPath> {
    // segments of a path starting at `s`, expanding one `{...}` group recursively
    fn expand(s: &str, prefix: &[String], out: &mut Vec<ModPath>) {
        let mut segs = prefix.to_vec();
        let mut rest = s;
        loop {
            if let Some(g) = rest.strip_prefix('{') {
                // split the group's members at depth 0
                let mut depth = 0;
                let mut start = 0;
                for (i, c) in g.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            expand(g[start..i].trim(), &segs, out);
                            return;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            expand(g[start..i].trim(), &segs, out);
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
                return;
            }
            let id = ident(rest);
            if id.is_empty() {
                break;
            }
            segs.push(id.to_string());
            rest = &rest[id.len()..];
            match rest.strip_prefix("::") {
                Some(r) => rest = r,
                None => break,
            }
        }
        if segs.len() > prefix.len() {
            out.push(segs);
        }
    }
    let mut out = Vec::new();
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < line.len() {
        if !line.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &line[i..];
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let after_colons = i >= 2 && &bytes[i - 2..i] == b"::";
        if !boundary || after_colons {
            i += 1;
            continue;
        }
        let (base, len): (ModPath, usize) = if rest.starts_with("crate::") {
            (Vec::new(), "crate::".len())
        } else if rest.starts_with("self::") {
            (at.to_vec(), "self::".len())
        } else if rest.starts_with("super::") {
            let mut base = at.to_vec();
            let mut len = 0;
            while rest[len..].starts_with("super::") {
                base.pop();
                len += "super::".len();
            }
            (base, len)
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
            continue;
        };
        expand(&rest[len..], &base, &mut out);
        i += len;
    }
    out
}

struct Tree {
    /// Every module: from files and inline `mod x {` blocks.
    modules: BTreeSet<ModPath>,
    /// Per module, what its `use` lines bring in by name (re-exports): name -> absolute path.
    reexports: BTreeMap<ModPath, BTreeMap<String, ModPath>>,
    /// (module a line is in, absolute path it names)
    refs: Vec<(ModPath, ModPath)>,
}

fn tree(src: &Path) -> Tree {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut t = Tree {
        modules: BTreeSet::new(),
        reexports: BTreeMap::new(),
        refs: Vec::new(),
    };
    for f in &files {
        let Some(module) = file_module(src, f) else {
            continue;
        };
        t.modules.insert(module.clone());
        // inline modules end at the first `}` at their own indentation (the code is rustfmt'd)
        let mut stack: Vec<(String, usize)> = Vec::new();
        for line in std::fs::read_to_string(f).unwrap().lines() {
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            if let Some((_, at)) = stack.last() {
                if trimmed == "}" && indent == *at {
                    stack.pop();
                    continue;
                }
            }
            if trimmed.starts_with("//") {
                continue;
            }
            let mut at = module.clone();
            at.extend(stack.iter().map(|(n, _)| n.clone()));
            let decl = trimmed
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub(super) ")
                .trim_start_matches("pub ");
            if let Some(m) = decl.strip_prefix("mod ") {
                let name = ident(m).to_string();
                let mut child = at.clone();
                child.push(name.clone());
                t.modules.insert(child);
                if m[name.len()..].trim_start().starts_with('{') {
                    stack.push((name, indent));
                }
                continue;
            }
            let paths = if let Some(u) = decl.strip_prefix("use ") {
                // `use x::y` inside a module may start at a child (uniform paths)
                let u = u.trim_end_matches(';');
                let first = ident(u);
                let mut child = at.clone();
                child.push(first.to_string());
                let mut ps = absolute_paths(u, &at);
                if !matches!(first, "crate" | "self" | "super")
                    && t.modules.contains(&child)
                    && ps.is_empty()
                {
                    let mut v = Vec::new();
                    let prefixed = format!("self::{u}");
                    v.extend(absolute_paths(&prefixed, &at));
                    ps = v;
                }
                let names = t.reexports.entry(at.clone()).or_default();
                for p in &ps {
                    if let Some(last) = p.last() {
                        names.insert(last.clone(), p.clone());
                    }
                }
                ps
            } else {
                absolute_paths(trimmed, &at)
            };
            for p in paths {
                t.refs.push((at.clone(), p));
            }
        }
    }
    t
}

impl Tree {
    /// `p` with re-exports followed (`crate::model::Site` -> `crate::model::arch::Site`).
    fn resolve(&self, mut p: ModPath) -> ModPath {
        for _ in 0..8 {
            let mut changed = false;
            for k in 0..p.len() {
                let (head, name) = (&p[..k], &p[k]);
                let child: ModPath = p[..=k].to_vec();
                if self.modules.contains(&child) {
                    continue;
                }
                if let Some(target) = self.reexports.get(head).and_then(|m| m.get(name)) {
                    if target != &child {
                        let mut q = target.clone();
                        q.extend_from_slice(&p[k + 1..]);
                        p = q;
                        changed = true;
                    }
                }
                break;
            }
            if !changed {
                break;
            }
        }
        p
    }

    /// Edges between sibling modules, per parent module (the root excluded: the test above).
    fn sibling_graphs(&self) -> BTreeMap<ModPath, Graph> {
        let mut out: BTreeMap<ModPath, Graph> = BTreeMap::new();
        for (from, to) in &self.refs {
            let to = self.resolve(to.clone());
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == 0 || common >= from.len() || common >= to.len() {
                continue;
            }
            let parent = from[..common].to_vec();
            let (a, b) = (&from[common], &to[common]);
            let mut bm = parent.clone();
            bm.push(b.clone());
            if !self.modules.contains(&bm) {
                continue; // an item of the parent itself
            }
            out.entry(parent)
                .or_default()
                .entry(a.clone())
                .or_default()
                .insert(b.clone());
        }
        out
    }
}

#[test]
fn the_inner_reader_resolves_super_self_groups_and_reexports() {
    let at: ModPath = vec!["model".into(), "packed_int".into(), "tests".into()];
    assert_eq!(
        absolute_paths("use super::super::bf16::{PackedBf16, x::Y};", &at),
        vec![
            vec!["model", "bf16", "PackedBf16"],
            vec!["model", "bf16", "x", "Y"]
        ]
        .into_iter()
        .map(|v| v.into_iter().map(String::from).collect::<ModPath>())
        .collect::<Vec<_>>()
    );
    let p = absolute_paths("let a = crate::model::layer::f(self::g::h);", &at);
    assert_eq!(p.len(), 2, "{p:?}");
    assert_eq!(p[1][..3], ["model", "packed_int", "tests"]);
    // the real tree: model's layer reads the checkpoint
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let t = tree(&src);
    assert!(t
        .modules
        .contains(&vec!["model".to_string(), "layer".to_string()]));
    let g = t.sibling_graphs();
    let model = &g[&vec!["model".to_string()]];
    assert!(
        model["layer"].contains("checkpoint"),
        "model's sibling graph: {model:?}"
    );
    // a re-export is followed to its module (`crate::model::Checkpoint` is checkpoint's)
    assert_eq!(
        t.resolve(vec!["model".into(), "Checkpoint".into()]),
        vec![
            "model".to_string(),
            "checkpoint".into(),
            "Checkpoint".into()
        ]
    );
}

#[test]
fn sibling_files_inside_every_module_import_each_other_without_cycles() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let t = tree(&src);
    let mut cycles = Vec::new();
    for (parent, g) in t.sibling_graphs() {
        for (m, deps) in &g {
            println!(
                "{}: {m} -> {}",
                parent.join("::"),
                deps.iter().cloned().collect::<Vec<_>>().join(" ")
            );
        }
        if let Some(c) = find_cycle(&g) {
            cycles.push(format!("in {}: {}", parent.join("::"), c.join(" -> ")));
        }
    }
    assert!(
        cycles.is_empty(),
        "modules import each other in a cycle:\n{}",
        cycles.join("\n")
    );
}

// ---- module names live in the architecture tables ----------------------------------------

/// Files allowed to spell a decoder module's name: the architecture tables, and the GGUF name
/// table that maps them to llama.cpp's names.
const NAME_TABLES: [&str; 2] = ["model/arch.rs", "formats/gguf/names.rs"];

/// Every decoder-layer module name of the tables, its last component and its parent's prefix
/// (`self_attn.q_proj`, `q_proj`, `self_attn.`).
fn module_name_tokens() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for block in [&compress::model::arch::LLAMA, &compress::model::arch::QWEN3] {
        let names = block
            .linears
            .iter()
            .map(|l| l.name)
            .chain(block.norms.iter().map(|(n, _)| *n));
        for n in names {
            out.insert(n.to_string());
            if let Some((parent, last)) = n.rsplit_once('.') {
                out.insert(last.to_string());
                out.insert(format!("{parent}."));
            }
        }
    }
    out
}

/// The string literals of a line (roughly: text between unescaped double quotes).
fn string_literals(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    let mut escaped = false;
    for c in line.chars() {
        match (&mut cur, c) {
            (Some(s), _) if escaped => {
                s.push(c);
                escaped = false;
            }
            (Some(_), '\\') => escaped = true,
            (Some(s), '"') => {
                out.push(std::mem::take(s));
                cur = None;
            }
            (Some(s), _) => s.push(c),
            (None, '"') => cur = Some(String::new()),
            (None, _) => {}
        }
    }
    out
}

#[test]
fn no_module_name_literal_outside_the_architecture_tables() {
    let tokens = module_name_tokens();
    assert!(tokens.contains("q_proj") && tokens.contains("self_attn.") && tokens.len() > 15);
    assert_eq!(
        string_literals(r#"f("self_attn.o_proj", "a\"b", x)"#),
        ["self_attn.o_proj", "a\"b"]
    );
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut found = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if NAME_TABLES.contains(&rel.as_str()) || rel.ends_with("/tests.rs") {
            continue; // (a `tests.rs` is a unit-test module: fixtures built by name)
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim_start();
            if t.starts_with("#[cfg(test)]") {
                break; // unit tests build fixtures by name
            }
            if t.starts_with("//") {
                continue;
            }
            for lit in string_literals(line) {
                if let Some(tok) = tokens.iter().find(|tok| lit.contains(tok.as_str())) {
                    found.push(format!("src/{rel}:{}: `{tok}` in \"{lit}\"", i + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "module names belong in model/arch.rs (the block's parts and sites):\n{}",
        found.join("\n")
    );
}

/// One concern per file: none in `src/` over 800 lines (issue #37; split by concern, as
/// `engine/`, `runner/`, `export/`, `bench/` were).
#[test]
fn no_source_file_over_800_lines() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let long: Vec<String> = files
        .iter()
        .map(|f| (f, std::fs::read_to_string(f).unwrap().lines().count()))
        .filter(|(_, n)| *n > 800)
        .map(|(f, n)| format!("{} ({n} lines)", f.display()))
        .collect();
    assert!(files.len() > 100, "files found: {}", files.len());
    assert!(long.is_empty(), "split by concern: {}", long.join(", "));
}
