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
    let base_len = path.len();
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
        let segment: String = text[begin..pos].iter().collect();
        if segment != "self" {
            path.push(segment);
        }
        if pos + 1 < text.len() && text[pos] == ':' && text[pos + 1] == ':' {
            pos += 2;
        } else {
            break;
        }
    }
    // An empty group element (`{a, b,}`) names nothing.
    if path.len() > base_len {
        out.push(path);
    }
}

/// Absolute paths (from the crate root) that `source`, a file at module path
/// `here` whose child modules are `children`, refers to: `crate::`,
/// `super::` and `self::` paths, and bare paths that start with a child
/// (`query::Query` in `graphql/mod.rs`). Skipped: comments, `#[cfg(test)]`
/// modules and re-exports (`pub use`: a facade, not a dependency). Inline
/// `mod x { … }` blocks shift what `super`/`self` mean.
fn references(source: &str, here: &[String], children: &BTreeSet<String>) -> Vec<Vec<String>> {
    // Pass 1: per line, the code that counts and the module it is in.
    let mut lines: Vec<(String, Vec<String>)> = Vec::new();
    let mut inline: Vec<(String, i32)> = Vec::new();
    let mut depth = 0i32;
    let mut skip_until: Option<i32> = None;
    let mut test_attr = false;
    let mut in_reexport = false;
    for raw in source.lines() {
        let code = match raw.find("//") {
            Some(i) => &raw[..i],
            None => raw,
        };
        let trimmed = code.trim();
        let opens = code.matches('{').count() as i32;
        let closes = code.matches('}').count() as i32;
        let decl = trimmed
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub(super) ")
            .trim_start_matches("pub ");
        if skip_until.is_none() {
            if let Some(name) = decl.strip_prefix("mod ").and_then(|r| r.strip_suffix('{')) {
                if test_attr {
                    skip_until = Some(depth);
                } else {
                    inline.push((name.trim().to_string(), depth));
                }
            }
        }
        test_attr = trimmed.starts_with("#[cfg(test)]");
        if decl != trimmed && decl.starts_with("use ") {
            in_reexport = true;
        }
        let mut module: Vec<String> = here.to_vec();
        module.extend(inline.iter().map(|(n, _)| n.clone()));
        let counts = skip_until.is_none() && !in_reexport;
        lines.push((
            if counts {
                code.to_string()
            } else {
                String::new()
            },
            module,
        ));
        if in_reexport && code.contains(';') {
            in_reexport = false;
        }
        depth += opens - closes;
        if skip_until.is_some_and(|d| depth <= d) {
            skip_until = None;
        }
        while inline.last().is_some_and(|(_, d)| depth <= *d) {
            inline.pop();
        }
    }
    // Pass 2: the paths, over the joined text (use groups span lines).
    let mut chars: Vec<char> = Vec::new();
    let mut line_of: Vec<usize> = Vec::new();
    for (n, (code, _)) in lines.iter().enumerate() {
        chars.extend(code.chars());
        chars.push('\n');
        line_of.resize(chars.len(), n);
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let boundary = i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':');
        if !boundary || !is_ident(chars[i]) {
            i += 1;
            continue;
        }
        let mut end = i;
        while end < chars.len() && is_ident(chars[end]) {
            end += 1;
        }
        let word: String = chars[i..end].iter().collect();
        let path_follows = chars.get(end) == Some(&':') && chars.get(end + 1) == Some(&':');
        if !path_follows {
            i = end;
            continue;
        }
        let module = &lines[line_of[i]].1;
        let mut base: Vec<String> = module.clone();
        let mut j = end + 2;
        match word.as_str() {
            "crate" => base.clear(),
            "self" => {}
            "super" => {
                base.pop();
                while chars[j..].iter().take(7).copied().eq("super::".chars()) {
                    base.pop();
                    j += "super::".len();
                }
            }
            w if module.len() == here.len() && children.contains(w) => j = i,
            _ => {
                i = end;
                continue;
            }
        }
        parse_paths(&chars, j, base, &mut out);
        i = j.max(i + 1);
    }
    out
}

/// The module graph of one crate. Nodes are its top-level modules, except
/// that a top-level module with a directory is split: its own file is one
/// node (`graphql`) and each direct submodule another (`graphql::types`);
/// deeper modules belong to their second-level ancestor.
fn crate_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let modules: Vec<(PathBuf, Vec<String>)> = files
        .iter()
        .filter_map(|f| {
            f.strip_prefix(src)
                .ok()
                .map(|r| (f.clone(), module_path(r)))
        })
        .collect();
    let known: BTreeSet<Vec<String>> = modules.iter().map(|(_, m)| m.clone()).collect();
    let children = |parent: &[String]| -> BTreeSet<String> {
        known
            .iter()
            .filter(|m| m.len() == parent.len() + 1 && m.starts_with(parent))
            .map(|m| m[parent.len()].clone())
            .collect()
    };
    let node = |path: &[String]| -> Option<String> {
        let top = path.first()?;
        if !known.contains(&vec![top.clone()]) {
            return None;
        }
        match path.get(1) {
            Some(second) if known.contains(&vec![top.clone(), second.clone()]) => {
                Some(format!("{top}::{second}"))
            }
            _ => Some(top.clone()),
        }
    };
    let mut graph = Graph::new();
    for (file, here) in &modules {
        let Ok(source) = fs::read_to_string(file) else {
            continue;
        };
        let Some(from) = node(here) else { continue };
        let witness = file
            .strip_prefix(crates_dir())
            .unwrap_or(file)
            .display()
            .to_string();
        for target in references(&source, here, &children(here)) {
            if let Some(to) = node(&target).filter(|to| *to != from) {
                graph
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_insert_with(|| witness.clone());
            }
        }
    }
    graph
}

/// Nodes reachable from `start` (itself included).
fn reachable(graph: &Graph, start: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::from([start.to_string()]);
    let mut todo = vec![start.to_string()];
    while let Some(n) = todo.pop() {
        for next in graph.get(&n).into_iter().flat_map(|e| e.keys()) {
            if seen.insert(next.clone()) {
                todo.push(next.clone());
            }
        }
    }
    seen
}

/// The strongly connected components with more than one module: each is a
/// set of modules that all depend on each other, directly or around.
fn tangles(graph: &Graph) -> Vec<BTreeSet<String>> {
    let nodes: BTreeSet<&String> = graph
        .keys()
        .chain(graph.values().flat_map(|e| e.keys()))
        .collect();
    let reach: BTreeMap<&String, BTreeSet<String>> =
        nodes.iter().map(|n| (*n, reachable(graph, n))).collect();
    let mut out: Vec<BTreeSet<String>> = Vec::new();
    for n in &nodes {
        let scc: BTreeSet<String> = reach[n]
            .iter()
            .filter(|m| reach.get(m).is_some_and(|r| r.contains(*n)))
            .cloned()
            .collect();
        if scc.len() > 1 && !out.contains(&scc) {
            out.push(scc);
        }
    }
    out
}

/// Cycles found by a depth-first search (at least one per tangle), each as
/// `a -> b (file with the edge a->b) ... -> a`.
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

/// Tangles in code this check does not own yet, by crate: each one is a
/// known debt, named so that no *new* cycle hides behind it. Remove an entry
/// when its tangle is gone (the test says so).
const KNOWN: &[(&str, &[&str])] = &[];

struct Found {
    krate: String,
    tangle: BTreeSet<String>,
    cycles: Vec<String>,
}

fn all_tangles() -> Vec<Found> {
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
        let graph = crate_graph(&src);
        let cycles = cycles(&graph);
        for tangle in tangles(&graph) {
            let within: Vec<String> = cycles
                .iter()
                .filter(|c| {
                    c.split(" -> ")
                        .map(|part| part.split(' ').next().unwrap_or_default())
                        .all(|n| tangle.contains(n))
                })
                .cloned()
                .collect();
            found.push(Found {
                krate: name.clone(),
                tangle,
                cycles: within,
            });
        }
    }
    found
}

fn is_known(f: &Found) -> bool {
    KNOWN.iter().any(|(k, nodes)| {
        *k == f.krate && nodes.iter().map(|n| n.to_string()).collect::<BTreeSet<_>>() == f.tangle
    })
}

#[test]
fn no_module_cycles() {
    let found = all_tangles();
    for (k, nodes) in KNOWN {
        let gone = !found
            .iter()
            .any(|f| f.krate == *k && f.tangle == nodes.iter().map(|n| n.to_string()).collect());
        if gone {
            panic!("{k}: {nodes:?} no longer form a cycle: remove it from KNOWN");
        }
    }
    let new: Vec<String> = found
        .iter()
        .filter(|f| !is_known(f))
        .map(|f| format!("{}: {:?}\n  {}", f.krate, f.tangle, f.cycles.join("\n  ")))
        .collect();
    assert!(
        new.is_empty(),
        "modules depend on each other in a circle (move the shared type below \
         both users):\n{}",
        new.join("\n")
    );
}

#[test]
fn scanner_sees_the_paths_it_must() {
    let here = vec!["graphql".to_string()];
    let children: BTreeSet<String> = ["query", "types"].into_iter().map(String::from).collect();
    let src = "use crate::viewer::Viewer;\n\
               use crate::live::{\n    hub::Hub,\n    gql,\n};\n\
               pub use types::Reexported;\n\
               pub use crate::state::{\n    Facade,\n};\n\
               // use crate::metrics::Ignored;\n\
               type S = Schema<query::Query>;\n\
               fn f() { crate::ratelimit::limit(); }\n\
               #[cfg(test)]\n\
               mod tests {\n    use crate::pages::X;\n}\n\
               pub mod inner {\n    use super::super::login::Y;\n    use self::z::W;\n}\n";
    let refs: BTreeSet<String> = references(src, &here, &children)
        .into_iter()
        .map(|p| p.join("::"))
        .collect();
    let want: BTreeSet<String> = [
        "viewer::Viewer",
        "live::hub::Hub",
        "live::gql",
        "graphql::query::Query",
        "ratelimit::limit",
        "login::Y",
        "graphql::inner::z::W",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(refs, want);

    let mut g = Graph::new();
    g.entry("a".into())
        .or_default()
        .insert("b".into(), "x.rs".into());
    g.entry("b".into())
        .or_default()
        .insert("c".into(), "y.rs".into());
    g.entry("c".into())
        .or_default()
        .insert("a".into(), "z.rs".into());
    g.entry("c".into())
        .or_default()
        .insert("d".into(), "w.rs".into());
    assert_eq!(
        cycles(&g),
        vec!["a -> b (x.rs) -> c (y.rs) -> a (z.rs)".to_string()]
    );
    let abc: BTreeSet<String> = ["a", "b", "c"].into_iter().map(String::from).collect();
    assert_eq!(tangles(&g), vec![abc]);
}
