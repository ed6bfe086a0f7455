//! Reading files from the plugin directory, which are untrusted: the
//! component, its manifest and every other file there are the plugin
//! author's, and may be anything a file name can point at.
//!
//! Only regular files are read: a symbolic link is not followed (it could
//! lend one plugin another's manifest, or a file outside the directory), and
//! a FIFO, socket, device or directory is refused without being read. Each
//! file is read under a size cap, and
//! a manifest that does not parse is reported by line, column and the
//! parser's reason, never with the file's text. Owns the caps and the
//! messages; what a loaded file becomes is `loader.rs`'s business.

use std::io::Read as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use crate::manifest::Manifest;
use crate::text::escape_controls;

/// The largest component read: three times the largest interpreter-based
/// component we build (CPython via componentize-py, about 18 MiB). A bigger
/// file is refused before it is read into memory.
pub const MAX_COMPONENT_BYTES: u64 = 64 << 20;

/// The largest manifest read: a manifest is a few lines of TOML.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 10;

/// The longest parser message repeated from a manifest error.
const MAX_REASON_CHARS: usize = 200;

/// Why a file in the plugin directory was not read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: not a regular file (a link, directory, FIFO, socket or device); refused", .0.display())]
    NotRegular(PathBuf),
    #[error("{}: larger than {max} bytes; refused", path.display())]
    TooLarge { path: PathBuf, max: u64 },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl FileError {
    fn is_not_found(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A component's bytes.
pub fn read_component(path: &Path) -> Result<Vec<u8>, FileError> {
    read_capped(path, MAX_COMPONENT_BYTES)
}

/// `NAME.toml` parsed, or the empty manifest when there is none.
pub fn read_manifest(path: &Path) -> anyhow::Result<Manifest> {
    let bytes = match read_capped(path, MAX_MANIFEST_BYTES) {
        Ok(bytes) => bytes,
        Err(error) if error.is_not_found() => return Ok(Manifest::default()),
        Err(error) => return Err(error.into()),
    };
    let invalid = |reason: String| anyhow::anyhow!("invalid manifest {}: {reason}", path.display());
    let text = String::from_utf8(bytes).map_err(|e| {
        invalid(format!(
            "not UTF-8 text (at byte {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    Manifest::parse(&text).map_err(|error| {
        let at = error.span().map_or(0, |span| span.start);
        let line = text[..at].matches('\n').count() + 1;
        let column = text[..at].rfind('\n').map_or(at, |nl| at - nl - 1) + 1;
        let mut reason: String = error.message().chars().take(MAX_REASON_CHARS).collect();
        reason = escape_controls(&reason).into_owned();
        invalid(format!("line {line}, column {column}: {reason}"))
    })
}

/// Read a regular file of at most `max` bytes, not through a link. Opened
/// without blocking or following a link, and checked on the open file, so a
/// FIFO or link swapped in after a look at the path is still refused rather
/// than waited on or followed.
fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let io = |source| FileError::Io {
        path: path.to_owned(),
        source,
    };
    if !std::fs::symlink_metadata(path).map_err(io)?.is_file() {
        return Err(FileError::NotRegular(path.to_owned()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // A link swapped in after the look above.
            Some(libc::ELOOP) => FileError::NotRegular(path.to_owned()),
            _ => io(e),
        })?;
    let metadata = file.metadata().map_err(io)?;
    if !metadata.is_file() {
        return Err(FileError::NotRegular(path.to_owned()));
    }
    let too_large = || FileError::TooLarge {
        path: path.to_owned(),
        max,
    };
    if metadata.len() > max {
        return Err(too_large());
    }
    // The size on disk can lie (files in /proc say 0): the cap is on what
    // is read.
    let mut bytes = Vec::with_capacity(metadata.len() as usize);
    file.take(max + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_cap_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ok.toml");
        std::fs::write(&file, "subscriptions = [\"order.*\"]").unwrap();
        assert!(read_manifest(&file).unwrap().subscribes_to("order.created"));
        assert_eq!(
            read_manifest(&dir.path().join("none.toml")).unwrap(),
            Manifest::default()
        );

        let other = dir.path().join("other.toml");
        std::fs::write(&other, "[config]\ntoken = \"theirs\"").unwrap();
        let borrowed = dir.path().join("borrowed.toml");
        std::os::unix::fs::symlink(&other, &borrowed).unwrap();
        let fifo = dir.path().join("fifo.toml");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.unwrap().success());
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&fifo, &link).unwrap();
        let device = dir.path().join("zero.wasm");
        std::os::unix::fs::symlink("/dev/zero", &device).unwrap();
        for path in [&borrowed, &fifo, &link, &device, &dir.path().to_owned()] {
            let err = read_capped(path, 10).unwrap_err();
            assert!(matches!(err, FileError::NotRegular(_)), "{err}");
        }

        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_MANIFEST_BYTES as usize + 1]).unwrap();
        let err = read_manifest(&big).unwrap_err().to_string();
        assert!(err.contains("larger than 65536 bytes"), "{err}");
    }

    #[test]
    fn a_manifest_error_names_the_place_not_the_contents() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "# ok\nsecret_value_here here\n").unwrap();
        let err = format!("{:#}", read_manifest(&file).unwrap_err());
        assert!(err.contains("line 2, column"), "{err}");
        assert!(!err.contains("secret_value_here"), "{err}");

        // A manifest that is a link to the host's environment.
        let environ = dir.path().join("environ.toml");
        std::os::unix::fs::symlink("/proc/self/environ", &environ).unwrap();
        let err = format!("{:#}", read_manifest(&environ).unwrap_err());
        let path = std::env::var("PATH").unwrap();
        assert!(!err.contains(&path), "{err}");
        assert!(!err.contains("PATH="), "{err}");
    }
}
