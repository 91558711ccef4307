//! Every GraphQL error code the API can emit is documented in the crate
//! README, and every code is set through `observer_api::error::Code`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use observer_api::error::Code;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The codes in the first column of the README's `## Errors` table.
fn documented() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(crate_dir().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## Errors")
        .nth(1)
        .expect("README has an Errors section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| {
            let cell = l.trim_start_matches('|').split('|').next()?.trim();
            Some(cell.trim_matches('`').to_owned())
        })
        .collect()
}

#[test]
fn every_code_is_documented_and_nothing_else() {
    let documented = documented();
    let codes: BTreeSet<String> = Code::ALL.iter().map(|c| c.as_str().to_owned()).collect();
    let missing: Vec<_> = codes.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "codes missing from the README's error table: {missing:?}"
    );
    let unknown: Vec<_> = documented.difference(&codes).collect();
    assert!(
        unknown.is_empty(),
        "README documents codes the API never emits: {unknown:?}"
    );
    assert_eq!(codes.len(), Code::ALL.len(), "two variants share a code");
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A code set from a string literal would bypass the enum (and this table).
#[test]
fn codes_are_only_set_through_the_enum() {
    let mut files = Vec::new();
    rust_files(&crate_dir().join("src"), &mut files);
    let mut offenders = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("source file");
        for (i, line) in text.lines().enumerate() {
            let compact: String = line.chars().filter(|c| !c.is_whitespace()).collect();
            let literal_set = compact.contains("set(\"code\",\"");
            let literal_const = compact.contains(":&str=\"")
                && Code::ALL
                    .iter()
                    .any(|c| compact.contains(&format!("\"{}\"", c.as_str())));
            if literal_set || literal_const {
                offenders.push(format!("{}:{}: {}", file.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "set extensions.code through observer_api::error::Code:\n{}",
        offenders.join("\n")
    );
}
