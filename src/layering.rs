//! Tests only: the **Architecture Invariant** of `ARCHITECTURE.md`'s code map, that every
//! module imports only modules below it, checked over the source text.
//!
//! A module is a file `src/NAME.rs` or a folder `src/NAME/`; an import is any `crate::NAME`
//! on a line that is not a comment (doc links name modules without depending on them).

/// The modules, top to bottom, as in `ARCHITECTURE.md`'s code map. A module may import only
/// those after it. A new module goes into both lists.
const LAYERS: &[&str] = &[
    "cli", "daemon", "api", "jobs", "audit", "refresh", "metrics", "serve", "notify", "provider",
    "config", "ledger", "client", "wire", "model", "systemd", "secret", "testpg",
];

/// Files that are not modules of the map.
const NOT_MODULES: &[&str] = &["lib", "main", "layering"];

fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `crate::NAME` modules a source text imports, outside comments; a group
/// `crate::{a::X, b}` (over several lines too) names each of its first segments.
fn imports(text: &str) -> Vec<String> {
    let mut code = String::new();
    for line in text.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        code.push_str(line.split(" //").next().unwrap_or(line));
        code.push('\n');
    }
    let segment = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The group up to its matching brace; its items split at top-level commas.
            let (mut depth, mut start) = (0usize, 0usize);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.push(segment(&group[start..j]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(segment(&group[start..j]));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(segment(rest));
        }
    }
    out.retain(|n| !n.is_empty() && n != "self");
    out
}

#[test]
fn every_module_imports_only_modules_below_it() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if NOT_MODULES.contains(&module.as_str()) {
            continue;
        }
        let Some(at) = LAYERS.iter().position(|m| *m == module) else {
            wrong.push(format!(
                "{}: module {module} is not in the code map (ARCHITECTURE.md, LAYERS)",
                rel.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for dep in imports(&text) {
            if dep == module {
                continue;
            }
            match LAYERS.iter().position(|m| *m == dep) {
                Some(d) if d > at => {}
                Some(_) => wrong.push(format!(
                    "{}: {module} imports {dep}, which is not below it",
                    rel.display()
                )),
                None => wrong.push(format!(
                    "{}: {module} imports {dep}, which is not in the code map",
                    rel.display()
                )),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn imports_are_read_from_code_not_comments() {
    let text =
        "use crate::a::B;\n/// see [`crate::b`]\nlet x = crate::c::f(); // crate::d\nmy_crate::e";
    assert_eq!(imports(text), ["a", "c"]);
    let grouped = "use crate::{\n    refresh::Engine,\n    model::{Site, Time},\n};\nuse crate::{self as x, wire};";
    assert_eq!(imports(grouped), ["refresh", "model", "wire"]);
}
