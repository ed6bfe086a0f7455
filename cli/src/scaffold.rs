//! `stateset-hooks new`: write a ready-to-build plugin project.
//!
//! One project per language, each handling one event type, with the WIT it
//! builds against copied in (so it builds outside this repository), a
//! manifest, a build script and a short README. The templates live in
//! `cli/templates/`; `{{name}}`, `{{event}}`, `{{lang}}` and `{{source}}` are
//! filled in.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// The WIT new plugins build against: the newest released version.
const WIT: &str = include_str!("../../wit/v0.2.0/world.wit");

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
    let fill = |text: &str| {
        text.replace("{{name}}", name)
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
    ];
    let mut written = Vec::new();
    for (file, text) in files.iter().chain(common.iter()) {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().expect("a file in the project"))?;
        std::fs::write(&path, fill(text))
            .with_context(|| format!("cannot write {}", path.display()))?;
        if file.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        }
        written.push(path);
    }
    Ok(written)
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
                .contains("config-get")
        );
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
}
