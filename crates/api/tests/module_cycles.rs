//! No two modules of a crate depend on each other, directly or around a
//! circle. A cycle means a type lives in the wrong module (it belongs below
//! both users), and cycles make modules impossible to read or move one at a
//! time.
//!
//! A text scan of every crate under crates/: each `crate::…`, `super::…` and
//! `self::…` path outside comments and `#[cfg(test)]` modules is an edge from
//! the module it appears in to the module it names (brace groups such as
//! `use crate::{a, b::c}` included). Two graphs per crate are checked:
//! - the top-level modules (`src/x.rs`, `src/x/`);
//! - inside each top-level module with a directory, its direct submodules
//!   (`live::hub` → `live::gql`, `ingest::access` → `ingest::members`).
//!
//! A parent naming its own children (declarations, re-exports) is
//! containment, not a dependency, and makes no edge. Items reached only
//! through a re-export at the crate root (`crate::AppState`) are not traced
//! to the module that defines them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Edges between module paths of one crate, with a witness file for each.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a source file relative to `src/` (`live/hub.rs` →
/// `[live, hub]`, `graphql/mod.rs` → `[graphql]`, `lib.rs` → `[]`).
fn module_path(rel: &Path) -> Vec<String> {
    let mut segs: Vec<String> = rel
        .iter()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let last = segs.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    let root = segs.is_empty() && matches!(stem, "lib" | "main");
    if !root && stem != "mod" {
        segs.push(stem.to_string());
    }
    segs
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Paths named at `text[pos..]` (just after `crate::`/`super::`/`self::`),
/// each as segments after `prefix`. Handles nested brace groups.
fn parse_paths(text: &[char], mut pos: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    loop {
        while pos < text.len() && text[pos].is_whitespace() {
            pos += 1;
        }
        if pos < text.len() && text[pos] == '{' {
            // Split the group at depth-1 commas; each element continues `path`.
            let mut depth = 0;
            let mut start = pos + 1;
            let mut i = pos;
            while i < text.len() {
                match text[i] {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            parse_paths(text, start, path.clone(), out);
                            return;
                        }
                    }
                    ',' if depth == 1 => {
                        parse_paths(text, start, path.clone(), out);
                        start = i + 1;
                    }
                    _ => {}
                }
                i += 1;
            }
            return;
        }
        let begin = pos;
        while pos < text.len() && is_ident(text[pos]) {
            pos += 1;
        }
        if pos == begin {
            break;
        }
        path.push(text[begin..pos].iter().collect());
        if pos + 1 < text.len() && text[pos] == ':' && text[pos + 1] == ':' {
            pos += 2;
        } else {
            break;
        }
    }
    out.push(path);
}

/// Absolute paths (from the crate root) that `source`, a file at module path
/// `here`, refers to. Comments and `#[cfg(test)]` modules are skipped;
/// inline `mod x { … }` blocks shift what `super`/`self` mean.
fn references(source: &str, here: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    // Inline modules: (name, brace depth at which it closes).
    let mut inline: Vec<(String, i32)> = Vec::new();
    let mut depth = 0i32;
    let mut skip_until: Option<i32> = None;
    let mut test_attr = false;
    for raw in source.lines() {
        let line = match raw.find("//") {
            Some(i) => &raw[..i],
            None => raw,
        };
        let trimmed = line.trim();
        let opens = line.matches('{').count() as i32;
        let closes = line.matches('}').count() as i32;
        if skip_until.is_none() {
            let decl = trimmed
                .trim_start_matches("pub(crate) ")
                .trim_start_matches("pub(super) ")
                .trim_start_matches("pub ");
            if let Some(rest) = decl.strip_prefix("mod ") {
                if let Some(name) = rest.strip_suffix('{') {
                    if test_attr {
                        skip_until = Some(depth);
                    } else {
                        inline.push((name.trim().to_string(), depth));
                    }
                }
            }
        }
        test_attr = trimmed.starts_with("#[cfg(test)]");
        if skip_until.is_none() {
            let mut module: Vec<String> = here.to_vec();
            module.extend(inline.iter().map(|(n, _)| n.clone()));
            let chars: Vec<char> = line.chars().collect();
            let mut i = 0;
            while i < chars.len() {
                let prev_ident = i > 0 && (is_ident(chars[i - 1]) || chars[i - 1] == ':');
                let at = |kw: &str| chars[i..].iter().take(kw.len()).copied().eq(kw.chars());
                if !prev_ident && (at("crate::") || at("super::") || at("self::")) {
                    let mut base: Vec<String> = module.clone();
                    let mut j = i;
                    if at("crate::") {
                        base.clear();
                        j += "crate::".len();
                    } else if at("self::") {
                        j += "self::".len();
                    } else {
                        while chars[j..].iter().take(7).copied().eq("super::".chars()) {
                            base.pop();
                            j += "super::".len();
                        }
                    }
                    parse_paths(&chars, j, base, &mut out);
                    i = j;
                } else {
                    i += 1;
                }
            }
        }
        depth += opens - closes;
        if let Some(d) = skip_until {
            if depth <= d {
                skip_until = None;
            }
        }
        while inline.last().is_some_and(|(_, d)| depth <= *d) {
            inline.pop();
        }
    }
    out
}

/// The module graphs of one crate: top level, and one per top-level module
/// that has a directory of submodules.
fn crate_graphs(src: &Path) -> Vec<(String, Graph)> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let rel_paths: Vec<(PathBuf, Vec<String>)> = files
        .iter()
        .filter_map(|f| f.strip_prefix(src).ok().map(|r| (f.clone(), r.to_path_buf())))
        .map(|(f, r)| (f, module_path(&r)))
        .collect();
    let top: BTreeSet<String> = rel_paths
        .iter()
        .filter_map(|(_, m)| m.first().cloned())
        .collect();
    let children = |parent: &str| -> BTreeSet<String> {
        rel_paths
            .iter()
            .filter(|(_, m)| m.len() >= 2 && m[0] == parent)
            .map(|(_, m)| m[1].clone())
            .collect()
    };
    let mut graphs: Vec<(String, Graph)> = vec![("top level".to_string(), Graph::new())];
    let nested: Vec<(String, BTreeSet<String>)> = top
        .iter()
        .map(|t| (t.clone(), children(t)))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    for (parent, _) in &nested {
        graphs.push((parent.clone(), Graph::new()));
    }
    for (file, here) in &rel_paths {
        let Ok(source) = fs::read_to_string(file) else {
            continue;
        };
        let witness = file
            .strip_prefix(crates_dir())
            .unwrap_or(file)
            .display()
            .to_string();
        for target in references(&source, here) {
            let (Some(from), Some(to)) = (here.first(), target.first()) else {
                continue;
            };
            if from != to && top.contains(to) {
                graphs[0]
                    .1
                    .entry(from.clone())
                    .or_default()
                    .entry(to.clone())
                    .or_insert_with(|| witness.clone());
            }
            for (k, (parent, kids)) in nested.iter().enumerate() {
                if from != parent || to != parent || here.len() < 2 || target.len() < 2 {
                    continue;
                }
                let (a, b) = (&here[1], &target[1]);
                if a != b && kids.contains(b) {
                    graphs[k + 1]
                        .1
                        .entry(format!("{parent}::{a}"))
                        .or_default()
                        .entry(format!("{parent}::{b}"))
                        .or_insert_with(|| witness.clone());
                }
            }
        }
    }
    graphs
}

/// Every elementary cycle found by a depth-first search, each once, as
/// `a -> b (file) -> a (file)`.
fn cycles(graph: &Graph) -> Vec<String> {
    fn visit(
        graph: &Graph,
        node: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        seen: &mut BTreeSet<Vec<String>>,
        out: &mut Vec<String>,
    ) {
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(i) = stack.iter().position(|n| n == next) {
                let ring: Vec<String> = stack[i..].to_vec();
                let mut key = ring.clone();
                key.sort();
                if seen.insert(key) {
                    let mut text = ring[0].clone();
                    for (k, n) in ring.iter().enumerate() {
                        let to = ring.get(k + 1).unwrap_or(&ring[0]);
                        let via = graph
                            .get(n)
                            .and_then(|e| e.get(to))
                            .cloned()
                            .unwrap_or_default();
                        text.push_str(&format!(" -> {to} ({via})"));
                    }
                    out.push(text);
                }
            } else if !done.contains(next) {
                visit(graph, next, stack, done, seen, out);
            }
        }
        stack.pop();
        done.insert(node.to_string());
    }
    let mut out = Vec::new();
    let mut done = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for node in graph.keys() {
        if !done.contains(node) {
            visit(graph, node, &mut Vec::new(), &mut done, &mut seen, &mut out);
        }
    }
    out
}

fn all_cycles() -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(crates_dir()) else {
        return found;
    };
    let mut crates: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    crates.sort();
    for krate in crates {
        let src = krate.join("src");
        if !src.is_dir() {
            continue;
        }
        let name = krate
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (scope, graph) in crate_graphs(&src) {
            for c in cycles(&graph) {
                found.push(format!("{name} ({scope}): {c}"));
            }
        }
    }
    found
}

#[test]
fn no_module_cycles() {
    let found = all_cycles();
    assert!(
        found.is_empty(),
        "modules depend on each other in a circle:\n{}",
        found.join("\n")
    );
}

#[test]
fn scanner_sees_the_paths_it_must() {
    let here = vec!["live".to_string(), "conn".to_string()];
    let src = "use crate::graphql::Viewer;\n\
               use super::{hub::Hub, gql};\n\
               // use crate::metrics::Ignored;\n\
               fn f() { crate::state::AppState::new(); }\n\
               #[cfg(test)]\n\
               mod tests {\n    use crate::pages::X;\n}\n\
               pub mod inner {\n    use super::super::ws::Y;\n}\n";
    let refs: BTreeSet<String> = references(src, &here)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    let want: BTreeSet<String> = [
        "graphql::Viewer",
        "live::hub::Hub",
        "live::gql",
        "state::AppState::new",
        "live::ws::Y",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(refs, want);

    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into(), "x.rs".into());
    g.entry("b".into()).or_default().insert("c".into(), "y.rs".into());
    g.entry("c".into()).or_default().insert("a".into(), "z.rs".into());
    assert_eq!(
        cycles(&g),
        vec!["a -> b (x.rs) -> c (y.rs) -> a (z.rs)".to_string()]
    );
}
