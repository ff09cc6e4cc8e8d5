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

/// Drops comments (line and block) and blanks the inside of string and character literals, so
/// that paths written in docs or strings are not edges and a `/*` in a string opens nothing.
fn without_comments(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(c) = rest.chars().next() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
        } else if let Some(hashes) = raw_string_start(rest) {
            // r"…", r#"…"#, br#"…"#: to the quote followed by as many hashes.
            let open = rest.find('"').unwrap() + 1;
            let close = format!("\"{}", "#".repeat(hashes));
            let end = rest[open..]
                .find(&close)
                .map_or(rest.len(), |i| open + i + close.len());
            out.push_str("\"\"");
            rest = &rest[end..];
        } else if c == '"' {
            let mut end = 1;
            let bytes = rest.as_bytes();
            while end < bytes.len() && bytes[end] != b'"' {
                end += if bytes[end] == b'\\' { 2 } else { 1 };
            }
            out.push_str("\"\"");
            rest = &rest[(end + 1).min(rest.len())..];
        } else if c == '\'' && char_literal_len(rest) > 0 {
            out.push_str("' '");
            rest = &rest[char_literal_len(rest)..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The number of `#`s of a raw string literal starting here, if one does.
fn raw_string_start(text: &str) -> Option<usize> {
    let after = text.strip_prefix("br").or_else(|| text.strip_prefix('r'))?;
    let hashes = after.chars().take_while(|c| *c == '#').count();
    after[hashes..].starts_with('"').then_some(hashes)
}

/// The length of a character literal starting here (`'a'`, `'\n'`, `'\''`), or 0 for a
/// lifetime (`'a`).
fn char_literal_len(text: &str) -> usize {
    let mut chars = text.char_indices().skip(1);
    match chars.next() {
        Some((_, '\\')) => text[2..].find('\'').map_or(0, |i| i + 3),
        Some((_, c)) => {
            let at = 1 + c.len_utf8();
            if text[at..].starts_with('\'') {
                at + 1
            } else {
                0
            }
        }
        None => 0,
    }
}

/// The modules a file declares as its children (`mod x;`, `pub mod x;`, `pub(crate) mod x;`):
/// inline modules (`mod x { … }`) are part of their file.
fn child_modules(code: &str) -> BTreeSet<String> {
    code.lines()
        .filter_map(|line| {
            let line = line.trim();
            let line = line
                .strip_prefix("pub ")
                .or_else(|| line.strip_prefix("pub(crate) "))
                .or_else(|| line.strip_prefix("pub(super) "))
                .unwrap_or(line);
            let name = line.strip_prefix("mod ")?.strip_suffix(';')?.trim();
            Some(name.to_owned())
        })
        .collect()
}

fn ident_at(code: &str, at: usize) -> &str {
    let len = code[at..]
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(code.len() - at);
    &code[at..at + len]
}

/// Reads the path at `at` (after its first `::`) into `found`, each branch of a `{…}` group a
/// path of its own, nested groups too; returns where it ends.
fn read_path(code: &str, mut at: usize, mut segments: Vec<String>, found: &mut Vec<Vec<String>>) {
    loop {
        let rest = &code[at..];
        let skipped = rest.len() - rest.trim_start().len();
        at += skipped;
        if code[at..].starts_with('{') {
            // A group: split its top level at commas, and read each branch.
            let mut depth = 0;
            let mut branch_start = at + 1;
            for (i, c) in code[at..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        let branch = code[branch_start..at + i].trim_start();
                        let offset = at + i - (code[branch_start..at + i].len());
                        let _ = offset;
                        let begin =
                            branch_start + (code[branch_start..at + i].len() - branch.len());
                        if !branch.is_empty() && branch != "self" {
                            read_path(code, begin, segments.clone(), found);
                        }
                        branch_start = at + i + 1;
                        if c == '}' {
                            return;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            return;
        }
        let word = ident_at(code, at);
        if word.is_empty() {
            found.push(segments);
            return;
        }
        segments.push(word.to_owned());
        at += word.len();
        if code[at..].starts_with("::") {
            at += 2;
        } else {
            found.push(segments);
            return;
        }
    }
}

/// Whether the statement around `at` is a re-export (`pub use …`, `pub(crate) use …`): a
/// parent that re-exports what a child defines does not depend on it.
fn is_reexport(code: &str, at: usize) -> bool {
    let line_start = code[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = code[line_start..].trim_start();
    ["pub use ", "pub(crate) use ", "pub(super) use "]
        .iter()
        .any(|p| line.starts_with(p))
}

/// The paths in `code` that name a module of the crate: those starting with `crate::`,
/// `super::` or `self::`, and those starting with a child module of this file (`child::…`,
/// but not in a re-export). Each as its segments, groups expanded.
fn paths(code: &str, children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let bytes = code.as_bytes();
    let mut found = Vec::new();
    let mut at = 0;
    while let Some(i) = code[at..].find("::") {
        let colons = at + i;
        at = colons + 2;
        let word_start = code[..colons]
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(0, |i| i + 1);
        let word = &code[word_start..colons];
        if word.is_empty() || (word_start > 0 && bytes[word_start - 1] == b':') {
            continue; // `::x` or the middle of a longer path, read from its start
        }
        if word_start > 0 && bytes[word_start - 1] == b'$' {
            // `$crate::…` in a macro: as `crate::…`.
        }
        let counts = match word {
            "crate" | "super" | "self" => true,
            child => children.contains(child) && !is_reexport(code, word_start),
        };
        if counts {
            read_path(code, at, vec![word.to_owned()], &mut found);
        }
    }
    found
}

/// What the checker knows of one crate: its modules (a file each) and which are the binary's.
struct Crate {
    modules: BTreeSet<Vec<String>>,
    /// Top-level modules declared by `lib.rs`; the others belong to the binary (`main.rs`).
    lib_tops: BTreeSet<String>,
    has_lib: bool,
    /// `(module, item)` → the module it is re-exported from (`pub use x::Item;` in `module`).
    reexports: BTreeMap<(Vec<String>, String), Vec<String>>,
}

impl Crate {
    /// The root that `crate::` means in module `from`: the library's or the binary's.
    fn root_of(&self, from: &[String]) -> Vec<String> {
        match from.first() {
            Some(first) if first.starts_with("#bin:") => from[..1].to_vec(),
            Some(first) if self.has_lib && self.lib_tops.contains(first) => vec![],
            None if self.has_lib => vec![],
            _ => vec!["#bin:main".to_owned()],
        }
    }

    /// The module that `path`, written in module `from`, names: the longest prefix that is a
    /// module, followed through a re-export when the next segment is one.
    fn resolve(&self, from: &[String], path: &[String]) -> Option<Vec<String>> {
        // The modules below a binary's root are named without it (`main.rs`'s `mod server;` is
        // `server`).
        let below = |m: &[String]| -> Vec<String> {
            if m.first().is_some_and(|f| f.starts_with("#bin:")) {
                m[1..].to_vec()
            } else {
                m.to_vec()
            }
        };
        let (mut base, mut rest): (Vec<String>, &[String]) = match path[0].as_str() {
            "crate" => (vec![], &path[1..]),
            "self" => (below(from), &path[1..]),
            "super" => (below(from), path),
            _ => (below(from), path),
        };
        while rest.first().is_some_and(|s| s == "super") {
            base.pop()?;
            rest = &rest[1..];
        }
        let root = self.root_of(from);
        let at_root = |m: Vec<String>| if m.is_empty() { root.clone() } else { m };
        let mut best = at_root(base.clone());
        let mut candidate = base;
        for segment in rest {
            candidate.push(segment.clone());
            if self.modules.contains(&candidate) {
                best = candidate.clone();
            } else {
                let holder = at_root(candidate[..candidate.len() - 1].to_vec());
                if holder == best
                    && let Some(target) = self.reexports.get(&(holder, segment.clone()))
                {
                    best = target.clone();
                }
                break;
            }
        }
        self.modules.contains(&best).then_some(best)
    }
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

/// The import graph of one crate: for each module, the modules it names.
fn graph(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.retain(|f| !is_test_file(f.strip_prefix(src).unwrap()));
    assert!(!files.is_empty(), "{} has sources", src.display());
    let code: Vec<(Vec<String>, String)> = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            (module_of(src, f), without_comments(non_test_code(&text)))
        })
        .collect();
    let has_lib = code.iter().any(|(m, _)| m.is_empty());
    let lib_tops = code
        .iter()
        .find(|(m, _)| m.is_empty())
        .map(|(_, c)| child_modules(c))
        .unwrap_or_default();
    let mut krate = Crate {
        modules: code.iter().map(|(m, _)| m.clone()).collect(),
        lib_tops,
        has_lib,
        reexports: BTreeMap::new(),
    };
    // Re-exports first (`pub use child::Item;`), so that a path through one is followed.
    for (from, text) in &code {
        for line in text.lines() {
            let line = line.trim_start();
            let Some(rest) = ["pub use ", "pub(crate) use ", "pub(super) use "]
                .iter()
                .find_map(|p| line.strip_prefix(p))
            else {
                continue;
            };
            let mut found = Vec::new();
            let first = ident_at(rest, 0);
            if first.is_empty() || !rest[first.len()..].starts_with("::") {
                continue;
            }
            read_path(rest, first.len() + 2, vec![first.to_owned()], &mut found);
            for path in found {
                let Some(item) = path.last().cloned() else {
                    continue;
                };
                if let Some(target) = krate.resolve(from, &path)
                    && &target != from
                {
                    let holder = krate.root_of(from);
                    let holder = if from.first().is_some_and(|f| f.starts_with("#bin:")) {
                        holder
                    } else {
                        from.clone()
                    };
                    krate.reexports.insert((holder, item), target);
                }
            }
        }
    }
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (from, text) in &code {
        let children = child_modules(text);
        let edges = graph.entry(from.clone()).or_default();
        for path in paths(text, &children) {
            if let Some(to) = krate.resolve(from, &path)
                && &to != from
            {
                edges.insert(to);
            }
        }
    }
    graph
}

#[test]
fn modules_import_downward_only() {
    let mut problems = Vec::new();
    for krate in CRATES {
        let graph = graph(&root().join(krate).join("src"));
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
        if *krate != "tests" {
            rust_files(&root().join(krate).join("tests"), &mut files);
        }
    }
    let mut wrong = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_start();
            // `#[ignore …]`, or an `ignore` inside `#[cfg_attr(…)]`.
            let ignores = line.starts_with("#[ignore")
                || (line.starts_with("#[cfg_attr") && line.contains("ignore"))
                || line.starts_with("ignore =")
                || line == "ignore,"
                || line == "ignore";
            if ignores && !line.contains("\"needs root: ") {
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
    let dir = tempfile::tempdir().unwrap();
    let write = |path: &str, text: &str| {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    // A binary crate: the parent re-exports a child's item (not an edge), a child uses a
    // sibling through the parent's re-export (an edge to the sibling), and main's constant
    // is used below it.
    write(
        "main.rs",
        "mod a;\nmod env;\nconst X: u8 = 1;\nfn main() { a::run(); }\n",
    );
    write(
        "env.rs",
        "pub const E: &str = \"crate::a::b /* not a comment */\";\n",
    );
    write(
        "a/mod.rs",
        "mod b;\nmod c;\npub use b::{Thing, other::{Deep}};\npub fn run() { let _ = '\"'; }\n",
    );
    write("a/b.rs", "use crate::env::E;\npub struct Thing;\n");
    write("a/c.rs", "use super::Thing;\nuse super::super::env;\n");
    let g = graph(dir.path());
    let m = |s: &str| -> Vec<String> {
        if s == "main" {
            vec!["#bin:main".to_owned()]
        } else {
            s.split("::").map(str::to_owned).collect()
        }
    };
    assert_eq!(
        g[&m("main")],
        BTreeSet::from([m("a")]),
        "a bare child path is an edge"
    );
    assert!(
        g[&m("a")].is_empty(),
        "a re-export is not an edge: {:?}",
        g[&m("a")]
    );
    assert_eq!(g[&m("a::c")], BTreeSet::from([m("a::b"), m("env")]));
    assert_eq!(g[&m("env")], BTreeSet::new(), "strings hold no paths");
    assert!(cycles(&g).is_empty());

    // Now b uses main's constant, and main uses a, which names b: a cycle through the root.
    write("a/b.rs", "use crate::X;\npub struct Thing;\n");
    write(
        "a/mod.rs",
        "mod b;\nmod c;\npub use b::Thing;\npub fn run() { b::go(); }\n",
    );
    let g = graph(dir.path());
    assert_eq!(cycles(&g), vec![vec![m("main"), m("a"), m("a::b")]]);
}
