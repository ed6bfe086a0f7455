//! `stateset-hooks new`: write a ready-to-build plugin project.
//!
//! One project per language, each handling one event type, with the WIT it
//! builds against copied in (so it builds outside this repository), a
//! manifest, a build script, one test case
//! (`cases/example.json`, which the build script runs with `stateset-hooks
//! test`) and a short README. A Rust project also gets the
//! SDK (`plugins/sdk`, which is not published) copied into `sdk/`, pointed at
//! the project's WIT. The templates live in `cli/templates/`; `{{name}}`,
//! `{{event}}`, `{{lang}}` and `{{source}}` are filled in.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The WIT new plugins build against: the newest released version.
const WIT: &str = include_str!("../../wit/v0.3.0/world.wit");

/// The SDK's sources, copied into a Rust project as they are, except for
/// where its bindings find the WIT.
const SDK: [(&str, &str); 4] = [
    (
        "sdk/src/lib.rs",
        include_str!("../../plugins/sdk/src/lib.rs"),
    ),
    (
        "sdk/src/http.rs",
        include_str!("../../plugins/sdk/src/http.rs"),
    ),
    ("sdk/src/kv.rs", include_str!("../../plugins/sdk/src/kv.rs")),
    (
        "sdk/src/models.rs",
        include_str!("../../plugins/sdk/src/models.rs"),
    ),
];
/// The SDK's WIT path in this repository, and in a project.
const SDK_WIT_PATH: (&str, &str) = (r#"path: "../../wit/v0.3.0""#, r#"path: "../wit""#);

/// A language `new` can write a plugin in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

/// Write the project for plugin `name` into `dir` (which must not exist yet);
/// returns the files written.
pub fn new_plugin(dir: &Path, name: &str, lang: Lang, event: &str) -> anyhow::Result<Vec<PathBuf>> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.starts_with(|c: char| c.is_ascii_lowercase());
    if !valid {
        bail!(
            "plugin name {name:?}: use lower-case letters, digits and '-', starting with a letter"
        );
    }
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let (files, source): (&[(&str, &str)], &str) = match lang {
        Lang::Rust => (
            &[
                ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
                ("src/lib.rs", include_str!("../templates/rust/lib.rs")),
                ("build.sh", include_str!("../templates/rust/build.sh")),
                (
                    ".cargo/config.toml",
                    include_str!("../templates/rust/cargo-config.toml"),
                ),
                (
                    "sdk/Cargo.toml",
                    include_str!("../templates/rust/sdk/Cargo.toml"),
                ),
                (".gitignore", "/target\n*.wasm\n"),
            ],
            "src/lib.rs",
        ),
        Lang::Python => (
            &[
                ("app.py", include_str!("../templates/python/app.py")),
                ("build.sh", include_str!("../templates/python/build.sh")),
                (".gitignore", ".venv/\n__pycache__/\n*.wasm\n"),
            ],
            "app.py",
        ),
        Lang::Js => (
            &[
                ("plugin.js", include_str!("../templates/js/plugin.js")),
                ("build.mjs", include_str!("../templates/js/build.mjs")),
                ("package.json", include_str!("../templates/js/package.json")),
                ("build.sh", include_str!("../templates/js/build.sh")),
                (".npmrc", "omit-lockfile-registry-resolved=true\n"),
                (".gitignore", "node_modules/\n*.wasm\n"),
            ],
            "plugin.js",
        ),
    };
    let lang_name = match lang {
        Lang::Rust => "Rust",
        Lang::Python => "Python",
        Lang::Js => "JavaScript",
    };
    let case_event = example_type(event);
    let fill = |text: &str| {
        text.replace("{{case_event}}", &case_event)
            .replace("{{name}}", name)
            .replace("{{event}}", event)
            .replace("{{lang}}", lang_name)
            .replace("{{source}}", source)
    };
    let manifest = format!("{name}.toml");
    let common = [
        ("wit/world.wit", WIT),
        (
            manifest.as_str(),
            include_str!("../templates/manifest.toml"),
        ),
        ("README.md", include_str!("../templates/README.md")),
        (
            "cases/example.json",
            include_str!("../templates/cases/example.json"),
        ),
    ];
    let sdk = SDK
        .iter()
        .filter(|_| lang == Lang::Rust)
        .map(|(file, text)| {
            let (from, to) = SDK_WIT_PATH;
            (*file, text.replace(from, to))
        });
    let templates = files
        .iter()
        .chain(common.iter())
        .map(|(f, t)| (*f, fill(t)));
    let mut written = Vec::new();
    for (file, text) in templates.chain(sdk) {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().expect("a file in the project"))?;
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        if file.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        written.push(path);
    }
    Ok(written)
}

/// An event type a subscription `pattern` takes, for the example case:
/// the pattern itself, or a glob's `*` filled in.
fn example_type(pattern: &str) -> String {
    match pattern {
        "*" => "order.created".to_owned(),
        p if p.ends_with('*') => p.replacen('*', "created", 1),
        p => p.replace('*', "order"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_filled_in_project_and_refuses_bad_names() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("refund-check");
        let files = new_plugin(&dir, "refund-check", Lang::Js, "return.created").unwrap();
        assert!(files.iter().any(|f| f.ends_with("refund-check.toml")));
        let manifest = std::fs::read_to_string(dir.join("refund-check.toml")).unwrap();
        assert!(
            manifest.contains(r#"subscriptions = ["return.created"]"#),
            "{manifest}"
        );
        let source = std::fs::read_to_string(dir.join("plugin.js")).unwrap();
        assert!(!source.contains("{{"), "{source}");
        assert!(
            std::fs::read_to_string(dir.join("wit/world.wit"))
                .unwrap()
                .contains("interface kv")
        );
        assert!(!dir.join("sdk").exists(), "the SDK is for Rust projects");
        let case = std::fs::read_to_string(dir.join("cases/example.json")).unwrap();
        assert!(
            case.contains(r#""type": "return.created""#)
                && case.contains("refund-check handled return.created"),
            "{case}"
        );
        assert_eq!(example_type("order.*"), "order.created");
        assert_eq!(example_type("*.created"), "order.created");
        assert!(
            new_plugin(&dir, "refund-check", Lang::Js, "return.created").is_err(),
            "exists"
        );
        assert!(
            new_plugin(
                &tmp.path().join("x"),
                "Bad_Name",
                Lang::Rust,
                "order.created"
            )
            .is_err()
        );
    }

    #[test]
    fn a_rust_project_gets_the_sdk_pointed_at_its_own_wit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("counter");
        new_plugin(&dir, "counter", Lang::Rust, "order.*").unwrap();
        let lib = std::fs::read_to_string(dir.join("sdk/src/lib.rs")).unwrap();
        assert!(lib.contains(SDK_WIT_PATH.1), "{lib}");
        assert!(!lib.contains(SDK_WIT_PATH.0));
        for (file, _) in SDK {
            assert!(dir.join(file).exists(), "{file}");
        }
    }
}
