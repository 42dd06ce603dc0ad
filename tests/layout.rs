//! The house rules, checked: which top-level module of `src/` may import which, and no cycle
//! among them. Every `crate::` path in library code counts (a `use`, a path in an expression, a
//! group `crate::{a, b}`, a name the crate root re-exports, and `super::` that climbs to the
//! root); comments and string literals do not, and neither does test-only code (`tests.rs`
//! files, `#[cfg(test)]` modules and the files they name). `src/cli` and `src/main.rs` are the
//! binary, above everything, and reach the library only as `midcall::`.
//!
//! Also checked: no file in `src/` or `python/src/` over 800 lines and no function over 150
//! (test code exempt), so a file and a function can still be read whole.
//!
//! A module may import only modules of a lower rank. Change a rank only with the reason beside
//! it, and never to make a wrong import pass: give the lower module a trait it owns instead
//! (as `CallCompletion` and `DeliveryTargets` do).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every top-level module of the library: its rank (imports go to lower ranks only) and why
/// it sits there.
const RULES: &[(&str, u8, &str)] = &[
    (
        "state",
        0,
        "a leaf: call facts, conversation state, the transcript",
    ),
    (
        "time",
        0,
        "a leaf: the wall clock as milliseconds and RFC 3339 text",
    ),
    (
        "template",
        1,
        "renders `{{…}}` from call facts and state; knows no config",
    ),
    (
        "jsonpath",
        1,
        "RFC 9535 queries; writes extracted values at state paths",
    ),
    (
        "transport",
        1,
        "enforces an EgressPolicy and a Deadline it is given; never reads config",
    ),
    (
        "config",
        2,
        "compiles templates, queries and the egress policy once, at load",
    ),
    (
        "store",
        3,
        "every SQL statement and record; events and automation call it, never the reverse",
    ),
    (
        "cache",
        3,
        "the response cache; knows budgets only as deadlines; stores nothing durably",
    ),
    (
        "events",
        4,
        "publishes and delivers; reaches other modules' targets only through DeliveryTargets",
    ),
    (
        "exec",
        5,
        "the action path; tells automation a call ended only through CallCompletion",
    ),
    (
        "automation",
        6,
        "runs steps through exec and events; serves no HTTP",
    ),
    (
        "server",
        7,
        "the HTTP front of `serve`: starts automations, reads the store",
    ),
    (
        "demo",
        7,
        "the bundled mock CRM: a server of its own beside the library's",
    ),
    (
        "stack",
        8,
        "assembles everything from agent files: the one builder above all rooms",
    ),
    ("testing", 8, "fuzz bodies that may reach any room; not API"),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rank(module: &str) -> Option<u8> {
    RULES
        .iter()
        .find(|(m, ..)| *m == module)
        .map(|(_, r, _)| *r)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The text without comments, string and char literals (their contents become empty).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').unwrap_or(rest.len());
            i += end;
        } else if rest.starts_with("/*") {
            let end = rest.find("*/").map(|e| e + 2).unwrap_or(rest.len());
            out.extend(rest[..end].chars().filter(|c| *c == '\n'));
            i += end;
        } else if let Some(hashes) = raw_string_start(rest) {
            let close = format!("\"{}", "#".repeat(hashes));
            let body = hashes + 2;
            let end = rest[body..]
                .find(&close)
                .map(|e| body + e + close.len())
                .unwrap_or(rest.len());
            out.push_str("\"\"");
            out.extend(rest[..end].chars().filter(|c| *c == '\n'));
            i += end;
        } else if rest.starts_with('"') {
            let mut j = 1;
            while j < rest.len() {
                match rest.as_bytes()[j] {
                    b'\\' => j += 2,
                    b'"' => break,
                    _ => j += 1,
                }
            }
            let end = (j + 1).min(rest.len());
            out.push_str("\"\"");
            out.extend(rest[..end].chars().filter(|c| *c == '\n'));
            i += end;
        } else if let Some(len) = char_literal(rest) {
            out.push_str("' '");
            i += len;
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// `r"`, `r#"`, `br##"`…: the number of `#`.
fn raw_string_start(s: &str) -> Option<usize> {
    let s = s.strip_prefix('b').unwrap_or(s);
    let s = s.strip_prefix('r')?;
    let hashes = s.bytes().take_while(|c| *c == b'#').count();
    (s.as_bytes().get(hashes) == Some(&b'"')).then_some(hashes)
}

/// The length of a char literal at the start of `s` (`'a'`, `'\n'`, `'"'`), not a lifetime.
fn char_literal(s: &str) -> Option<usize> {
    let rest = s.strip_prefix('\'')?;
    if let Some(esc) = rest.strip_prefix('\\') {
        let end = esc.find('\'')?;
        return (end <= 10).then_some(end + 3);
    }
    let c = rest.chars().next()?;
    rest[c.len_utf8()..]
        .starts_with('\'')
        .then_some(c.len_utf8() + 2)
}

/// The lines of `text` without `#[cfg(test)]` items (a module in braces, or `mod x;`, whose
/// file is then test-only too: its name is returned).
fn without_test_code(text: &str) -> (String, Vec<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let (mut out, mut test_files) = (String::new(), Vec::new());
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim() == "#[cfg(test)]" && i + 1 < lines.len() {
            let next = lines[i + 1];
            let item = next.trim_start();
            let indent = next.len() - item.len();
            if item.ends_with(';') {
                if let Some(name) = item.trim_end_matches(';').split_whitespace().last() {
                    test_files.push(name.to_string());
                }
                i += 2;
                continue;
            }
            if item.ends_with('{') {
                let mut j = i + 2;
                let close = format!("{}}}", " ".repeat(indent));
                while j < lines.len() && !lines[j].starts_with(&close) {
                    j += 1;
                }
                i = j + 1;
                continue;
            }
        }
        out.push_str(lines[i]);
        out.push('\n');
        i += 1;
    }
    (out, test_files)
}

/// The top-level names after `crate::` (each name of a group `crate::{a::x, b}`), and the
/// names after `super::` chains that climb to the crate root from `depth`.
fn root_names(code: &str, depth: usize) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut at = 0;
    while let Some(pos) = code[at..].find("crate::") {
        let start = at + pos;
        at = start + "crate::".len();
        let before = code[..start].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest = &code[at..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut level, mut item) = (0usize, String::new());
            for c in group.chars() {
                match c {
                    '{' => level += 1,
                    '}' if level == 0 => break,
                    '}' => level -= 1,
                    ',' if level == 0 => {
                        names.insert(ident(item.trim()));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            names.insert(ident(item.trim()));
        } else {
            names.insert(ident(rest));
        }
    }
    let climb = "super::".repeat(depth);
    let mut at = 0;
    while let Some(pos) = code[at..].find(&climb) {
        let start = at + pos;
        at = start + climb.len();
        let before = code[..start].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[at..];
        if !rest.starts_with("super::") {
            names.insert(ident(rest));
        }
    }
    names.remove("");
    names
}

/// The names the crate root re-exports (`pub use exec::{Outcome, …}`), with their module.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let code = code_only(lib);
    for stmt in code.split(';') {
        let stmt = stmt.trim();
        let Some(path) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, names)) = path.split_once("::") else {
            continue;
        };
        for name in names
            .trim_matches(|c| c == '{' || c == '}')
            .split(',')
            .map(|n| n.split_whitespace().last().unwrap_or_default())
            .filter(|n| !n.is_empty())
        {
            map.insert(name.to_string(), module.trim().to_string());
        }
    }
    map
}

/// Which top-level module imports which, in the library under `root`.
fn module_graph(root: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let lib = std::fs::read_to_string(root.join("lib.rs")).expect("src/lib.rs");
    let reexports = root_reexports(&lib);
    let mut files = Vec::new();
    rust_files(root, &mut files);
    // Each file's module path (src/a/b.rs is a::b, src/a/mod.rs is a), its folder for the
    // modules it declares, and its code without test-only parts.
    let mut parsed = Vec::new();
    let mut test_only: BTreeSet<PathBuf> = BTreeSet::new();
    for file in &files {
        let rel = file.strip_prefix(root).expect("under src");
        let parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        let name = parts.last().expect("a file name").clone();
        let (depth, dir) = if name == "mod" {
            (
                parts.len() - 1,
                file.parent().expect("a folder").to_path_buf(),
            )
        } else {
            (parts.len(), file.with_extension(""))
        };
        let text = std::fs::read_to_string(file).expect("a source file");
        let (code, test_mods) = without_test_code(&text);
        for m in test_mods {
            test_only.insert(dir.join(format!("{m}.rs")));
            test_only.insert(dir.join(&m).join("mod.rs"));
        }
        parsed.push((file, parts, depth, code));
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (file, parts, depth, code) in parsed {
        let top = parts[0].clone();
        if top == "lib" || top == "main" || top == "cli" {
            continue;
        }
        graph.entry(top.clone()).or_default();
        if parts.last().is_some_and(|n| n == "tests") || test_only.contains(file) {
            continue;
        }
        for n in root_names(&code_only(&code), depth) {
            let target = if rank(&n).is_some() {
                Some(n)
            } else {
                reexports.get(&n).cloned()
            };
            if let Some(t) = target.filter(|t| *t != top) {
                graph.entry(top.clone()).or_default().insert(t);
            }
        }
    }
    graph
}

/// The imports the rules forbid, one line each.
fn violations(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut out = Vec::new();
    for (from, tos) in graph {
        let Some(r) = rank(from) else {
            out.push(format!(
                "src/{from} is not in RULES: give it a rank and the reason in tests/layout.rs"
            ));
            continue;
        };
        for to in tos {
            match rank(to) {
                Some(t) if t < r => {}
                _ => {
                    let why = RULES
                        .iter()
                        .find(|(m, ..)| m == to)
                        .map(|(_, _, w)| *w)
                        .unwrap_or("not in RULES");
                    out.push(format!(
                        "{from} (rank {r}) imports {to} ({why}): a module may import only lower ranks"
                    ));
                }
            }
        }
    }
    out
}

/// A cycle among the modules, as a path, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for next in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, next, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}

#[test]
fn modules_import_only_lower_ranks_and_form_no_cycle() {
    let graph = module_graph(&src());
    let shown: Vec<String> = graph
        .iter()
        .map(|(m, to)| {
            format!(
                "  {m} -> {}",
                to.iter().cloned().collect::<Vec<_>>().join(" ")
            )
        })
        .collect();
    let bad = violations(&graph);
    assert!(
        bad.is_empty(),
        "{}\nthe graph:\n{}",
        bad.join("\n"),
        shown.join("\n")
    );
    assert_eq!(cycle(&graph), None, "the graph:\n{}", shown.join("\n"));
    for (m, ..) in RULES {
        assert!(
            graph.contains_key(*m),
            "RULES names src/{m}, which does not exist"
        );
    }
}

/// The checker itself: a planted wrong import is found, however it is written, and what is
/// not code (a comment, a string, a test module) is not counted.
#[test]
fn the_checker_finds_a_planted_wrong_import() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let root = dir.path();
    let write = |p: &str, text: &str| {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    };
    write(
        "lib.rs",
        "pub mod store;\npub mod events;\npub mod automation;\npub use automation::Automations;\n",
    );
    write(
        "automation/mod.rs",
        "use crate::events::Event;\npub struct Automations;\n",
    );
    write(
        "events/mod.rs",
        "// crate::automation in a comment\nconst S: &str = \"crate::automation\";\n#[cfg(test)]\nmod tests {\n    use crate::automation::Automations;\n}\nuse crate::store::Db;\n",
    );
    write("store/mod.rs", "pub struct Db;\n");
    let graph = module_graph(root);
    assert!(violations(&graph).is_empty(), "{:?}", violations(&graph));

    for planted in [
        "use crate::automation::Automations;",
        "use crate::{store::Db, automation::Automations};",
        "fn f(_: crate::Automations) {}",
        "fn f() { super::super::automation::run(); }",
    ] {
        write("store/x.rs", planted);
        let graph = module_graph(root);
        let bad = violations(&graph);
        assert!(
            bad.iter()
                .any(|v| v.starts_with("store (rank 3) imports automation")),
            "{planted}: {bad:?}"
        );
    }
    write("store/x.rs", "use crate::events::Event;");
    let graph = module_graph(root);
    assert_eq!(
        cycle(&graph),
        Some(vec!["events".into(), "store".into(), "events".into()])
    );
}

/// The longest file and function a newcomer should have to read whole.
const MAX_FILE_LINES: usize = 800;
const MAX_FN_LINES: usize = 150;

/// Functions (of rustfmt-formatted code) longer than `MAX_FN_LINES`, from the `fn` line to
/// the brace that closes it at the same indentation, as `(line, name, length)`.
fn long_functions(code: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let mut rest = trimmed;
        for prefix in [
            "pub(crate) ",
            "pub(super) ",
            "pub ",
            "const ",
            "async ",
            "unsafe ",
        ] {
            rest = rest.strip_prefix(prefix).unwrap_or(rest);
        }
        let Some(sig) = rest.strip_prefix("fn ") else {
            continue;
        };
        let name: String = sig
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // The body opens on the first line that ends with `{` (a declaration ends with `;`).
        let Some(open) = (i..lines.len()).find(|&j| {
            let l = lines[j].trim_end();
            l.ends_with('{') || l.ends_with(';')
        }) else {
            continue;
        };
        if lines[open].trim_end().ends_with(';') {
            continue;
        }
        let close = format!("{}}}", " ".repeat(indent));
        if let Some(end) = (open + 1..lines.len()).find(|&j| lines[j] == close) {
            let len = end - i + 1;
            if len > MAX_FN_LINES {
                out.push((i + 1, name, len));
            }
        }
    }
    out
}

#[test]
fn no_file_over_800_lines_and_no_function_over_150() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("python").join("src"), &mut files);
    let mut bad = Vec::new();
    for file in &files {
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let shown = file
            .strip_prefix(root)
            .unwrap_or(file)
            .display()
            .to_string();
        let text = std::fs::read_to_string(file).expect("a source file");
        let lines = text.lines().count();
        if lines > MAX_FILE_LINES {
            bad.push(format!("{shown}: {lines} lines (at most {MAX_FILE_LINES})"));
        }
        let (code, _) = without_test_code(&text);
        // Line numbers of the code without its test modules are shown as found there.
        for (line, name, len) in long_functions(&code) {
            bad.push(format!(
                "{shown}: fn {name} (near line {line}) is {len} lines (at most {MAX_FN_LINES})"
            ));
        }
    }
    assert!(bad.is_empty(), "split these:\n{}", bad.join("\n"));
}

#[test]
fn the_length_check_finds_a_long_function() {
    let body = "    x();\n".repeat(MAX_FN_LINES);
    let code = format!("fn short() {{\n    y();\n}}\n\npub(crate) async fn long(\n    a: u8,\n) -> u8 {{\n{body}}}\n");
    let found = long_functions(&code);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].1, "long");
    assert_eq!(found[0].2, MAX_FN_LINES + 4);
}
