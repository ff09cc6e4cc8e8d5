//! The shape of the source, as ARCHITECTURE.md states it: within each crate, modules import
//! downward only (no cycle of `crate::…` / `super::…` edges), and no source file outside the
//! tests is over 700 lines. And of the tests: a test is ignored only because it needs root.
//!
//! A module here is a file. An edge is a path in non-test code that starts with `crate::`,
//! `super::` or `self::` and names another file's module (a path that ends in an item names the
//! module that holds it). A child module declared by `mod x;` is not an edge of its parent: a
//! parent may re-export what its children define, and the children may not import the parent
//! back.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates whose modules are checked (folders at the workspace root with a `src/`).
const CRATES: &[&str] = &[
    "config-errors",
    "packaging",
    "proxy",
    "restart-protocol",
    "shm-stats",
    "supervisor",
    "tests",
];

/// The longest a source file may be, outside the tests.
const MAX_LINES: usize = 700;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A file's module path within its crate: `src/lib.rs` is `[]`, `src/http/mod.rs` and
/// `src/http.rs` are `["http"]`, `src/http/body.rs` is `["http", "body"]`. Each binary's root
/// (`src/main.rs`, `src/bin/x.rs`) is a crate of its own, named by a first segment `#bin:x`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs").to_owned();
    if parts.first().is_some_and(|p| p == "bin") {
        return vec![format!("#bin:{stem}")];
    }
    match stem.as_str() {
        "lib" if parts.is_empty() => {}
        "main" if parts.is_empty() => parts = vec!["#bin:main".to_owned()],
        "mod" => {}
        _ => parts.push(stem),
    }
    parts
}

/// The non-test code of a file: everything before its `#[cfg(test)]` module.
fn non_test_code(text: &str) -> &str {
    let mut at = 0;
    while let Some(i) = text[at..].find("#[cfg(test)]") {
        let start = at + i;
        let after = text[start + "#[cfg(test)]".len()..].trim_start();
        if after.starts_with("mod ") || after.starts_with("pub mod ") {
            return &text[..start];
        }
        at = start + 1;
    }
    text
}

/// Drops comments (line and block) so that paths written in docs are not edges.
fn without_comments(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The paths in `code` that start with `crate::`, `super::` or `self::`, each as its segments
/// (with `use a::{b, c::d}` groups expanded to their first segment after the brace).
fn paths(code: &str) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let mut found = Vec::new();
    for start_word in ["crate::", "super::", "self::"] {
        let mut at = 0;
        while let Some(i) = code[at..].find(start_word) {
            let start = at + i;
            at = start + start_word.len();
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            if start > 0 && bytes[start - 1] == b':' {
                continue; // the tail of a longer path (`super::super::x` is read whole)
            }
            let mut segments = vec![start_word.trim_end_matches("::").to_owned()];
            let mut j = at;
            loop {
                let word: String = code[j..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if word.is_empty() {
                    // `{a, b::c}`: each branch is a path of its own.
                    if code[j..].starts_with('{') {
                        let end = code[j..].find('}').map_or(code.len(), |e| j + e);
                        for branch in code[j + 1..end].split(',') {
                            let first: String = branch
                                .trim()
                                .chars()
                                .take_while(|c| c.is_alphanumeric() || *c == '_')
                                .collect();
                            if !first.is_empty() {
                                let mut s = segments.clone();
                                s.push(first);
                                found.push(s);
                            }
                        }
                    }
                    break;
                }
                j += word.len();
                segments.push(word);
                if code[j..].starts_with("::") {
                    j += 2;
                } else {
                    break;
                }
            }
            if code[j..].starts_with('{') {
                continue; // pushed per branch above
            }
            found.push(segments);
        }
    }
    found
}

/// The module that `path`, written in module `from`, names: the longest prefix that is a known
/// module.
fn resolve(
    from: &[String],
    path: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<Vec<String>> {
    let (mut base, mut rest): (Vec<String>, &[String]) = match path[0].as_str() {
        "crate" => (
            from.first()
                .filter(|f| f.starts_with("#bin:"))
                .map(|f| vec![f.clone()])
                .unwrap_or_default(),
            &path[1..],
        ),
        "self" => (from.to_vec(), &path[1..]),
        _ => (from.to_vec(), path),
    };
    while rest.first().is_some_and(|s| s == "super") {
        base.pop()?;
        rest = &rest[1..];
    }
    let mut best = base.clone();
    let mut candidate = base;
    for segment in rest {
        candidate.push(segment.clone());
        if modules.contains(&candidate) {
            best = candidate.clone();
        }
    }
    modules.contains(&best).then_some(best)
}

/// The strongly connected components of more than one module (Tarjan's algorithm).
fn cycles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<Vec<String>>> {
    struct State<'a> {
        graph: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on_stack: BTreeSet<&'a Vec<String>>,
        out: Vec<Vec<Vec<String>>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Vec<String>) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let Some((w, _)) = s.graph.get_key_value(w) else {
                continue;
            };
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                component.push(w.clone());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    state.out
}

fn is_test_file(file: &Path) -> bool {
    file.file_name().is_some_and(|n| n == "tests.rs")
        || file.iter().any(|p| p == "tests" || p == "benches")
}

fn show(module: &[String]) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

#[test]
fn modules_import_downward_only() {
    let mut problems = Vec::new();
    for krate in CRATES {
        let src = root().join(krate).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        files.retain(|f| !is_test_file(f.strip_prefix(&src).unwrap()));
        assert!(!files.is_empty(), "{krate} has sources");
        let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
        let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
        for file in &files {
            let from = module_of(&src, file);
            let text = std::fs::read_to_string(file).unwrap();
            let code = without_comments(non_test_code(&text));
            let edges = graph.entry(from.clone()).or_default();
            for path in paths(&code) {
                if let Some(to) = resolve(&from, &path, &modules)
                    && to != from
                {
                    edges.insert(to);
                }
            }
        }
        for component in cycles(&graph) {
            let names: Vec<String> = component.iter().map(|m| show(m)).collect();
            let mut detail = String::new();
            for m in &component {
                let inside: Vec<String> = graph[m]
                    .iter()
                    .filter(|t| component.contains(t))
                    .map(|t| show(t))
                    .collect();
                detail.push_str(&format!("\n    {} -> {}", show(m), inside.join(", ")));
            }
            problems.push(format!(
                "{krate}: an import cycle among {}:{detail}",
                names.join(", ")
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn no_source_file_outside_the_tests_is_over_700_lines() {
    let mut long = Vec::new();
    for krate in CRATES {
        let src = root().join(krate).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files {
            if is_test_file(file.strip_prefix(&src).unwrap()) {
                continue;
            }
            let lines = std::fs::read_to_string(&file).unwrap().lines().count();
            let name = format!("{krate}/src/{}", file.strip_prefix(&src).unwrap().display());
            if lines > MAX_LINES {
                long.push(format!("{name}: {lines} lines"));
            }
        }
    }
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines (split them along their ideas):\n{}",
        long.join("\n")
    );
}

/// A test is ignored only because it needs root, and says so: `.ci/system-tests` runs the
/// ignored tests as root (`-- --ignored`), so one ignored for another reason would run there
/// unasked, and one that needs root but returns early without it would pass without running.
#[test]
fn every_ignored_test_is_ignored_because_it_needs_root() {
    let mut files = Vec::new();
    rust_files(&root().join("tests/tests"), &mut files);
    for krate in CRATES {
        rust_files(&root().join(krate).join("src"), &mut files);
    }
    let mut wrong = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.starts_with("#[ignore") && !line.starts_with("#[ignore = \"needs root: ") {
                let name = file
                    .strip_prefix(root())
                    .unwrap_or(&file)
                    .display()
                    .to_string();
                wrong.push(format!("{name}:{}: {line}", n + 1));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "tests ignored for another reason than `needs root: ...` (run them, or give them a feature or a test binary of their own):\n{}",
        wrong.join("\n")
    );
}

/// The checker finds a cycle where there is one, and none where the imports point one way.
#[test]
fn the_checker_sees_a_cycle() {
    let modules: BTreeSet<Vec<String>> = [vec![], vec!["a".into()], vec!["a".into(), "b".into()]]
        .into_iter()
        .collect();
    let a = vec!["a".to_owned()];
    let ab = vec!["a".to_owned(), "b".to_owned()];
    let up = paths("use super::Thing;");
    assert_eq!(resolve(&ab, &up[0], &modules), Some(a.clone()));
    let down = paths("use crate::a::{b::Item, Other};");
    let targets: Vec<_> = down
        .iter()
        .filter_map(|p| resolve(&a, p, &modules))
        .collect();
    assert_eq!(targets, vec![ab.clone(), a.clone()]);
    let mut graph = BTreeMap::new();
    graph.insert(a.clone(), BTreeSet::from([ab.clone()]));
    graph.insert(ab.clone(), BTreeSet::new());
    assert!(cycles(&graph).is_empty());
    graph.get_mut(&ab).unwrap().insert(a.clone());
    assert_eq!(cycles(&graph), vec![vec![a, ab]]);
    assert!(
        paths("// crate::a::b in a comment").len() == 1,
        "comments are dropped by the caller"
    );
    assert!(paths(&without_comments("// crate::a::b\n")).is_empty());
}
