//! The shape of the code, checked on its `use crate::…` lines: no module
//! imports one above its layer, so the data flow reads bottom to top and no
//! import circle can form.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The library's modules, bottom to top; a module may use its own layer's and
/// those below.
const LAYERS: &[&[&str]] = &[
    &[
        "ident",
        "dsn",
        "record",
        "event",
        "programs",
        "service",
        "metrics",
        "meter",
        "transform",
        "pgoutput",
    ],
    &["config", "tls", "db"],
    &["conflict", "error"],
    &[
        "capture", "batch", "adapt", "slave", "registry", "sequence", "mail", "wal",
    ],
    &["apply", "hub"],
    &["replicate", "status"],
    &["daemon", "clone", "check", "http", "throwaway"],
    &["switchover"],
    &["demo"],
];

/// Each module (a file of `src/`, or a folder with its files) and the modules
/// it names through `crate::`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            for inner in std::fs::read_dir(&path).unwrap() {
                files.push(inner.unwrap().path());
            }
        } else {
            files.push(path);
        }
    }
    for file in files {
        let module = match file.parent().unwrap() == src {
            true => file.file_stem().unwrap().to_string_lossy().to_string(),
            false => file
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string(),
        };
        if ["lib", "main", "cli"].contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let used = graph.entry(module.clone()).or_default();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group[..group.find('}').unwrap()]
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap().trim())
                    .collect(),
                None => vec![
                    rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                        .next()
                        .unwrap(),
                ],
            };
            for name in names.into_iter().filter(|n| !n.is_empty() && *n != "self") {
                if name.chars().next().unwrap().is_lowercase() && name != module {
                    used.insert(name.to_string());
                }
            }
        }
    }
    graph
}

fn layer(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is in no layer of tests/layout.rs: add it"))
}

#[test]
fn no_module_imports_one_above_its_layer() {
    let mut wrong = Vec::new();
    for (module, used) in imports() {
        for other in used {
            if layer(&other) > layer(&module) {
                wrong.push(format!("{module} imports {other}, which sits above it"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn there_is_no_import_circle() {
    let graph = imports();
    // Depth-first search; a module met again on the current path closes a circle.
    fn visit<'a>(
        module: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<String> {
        if let Some(at) = path.iter().position(|m| *m == module) {
            let mut circle = path[at..].to_vec();
            circle.push(module);
            return Some(circle.join(" -> "));
        }
        if !done.insert(module) {
            return None;
        }
        path.push(module);
        for next in graph.get(module).into_iter().flatten() {
            if let Some(circle) = visit(next, graph, path, done) {
                return Some(circle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(circle) = visit(module, &graph, &mut Vec::new(), &mut done) {
            panic!("import circle: {circle}");
        }
    }
}

#[test]
fn files_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut big = Vec::new();
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let lines = std::fs::read_to_string(&path).unwrap().lines().count();
            let limit = if path.ends_with("main.rs") { 350 } else { 800 };
            if lines > limit {
                big.push(format!(
                    "{}: {lines} lines (at most {limit})",
                    path.display()
                ));
            }
        }
    }
    assert!(big.is_empty(), "{}", big.join("\n"));
}
