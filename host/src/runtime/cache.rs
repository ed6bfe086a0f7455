//! The compile cache: machine code for components this host compiled, kept on
//! disk so a restart does not compile again.
//!
//! An entry is named by the SHA-256 of the component's bytes, this crate's
//! version and the engine's compatibility hash (wasmtime version and every
//! setting that changes code), so a stale entry is never found. Each file
//! starts with the SHA-256 of its payload; one that does not match (a torn
//! write, a flipped bit) is deleted and the component compiled again. Only
//! this module writes entries, only from components it compiled: bytes a user
//! supplied are never deserialized.
//!
//! An entry is native code the host will run, so the directory is guarded:
//! created `0700`, and refused (the host compiles every start instead) when
//! another user owns it or group or others may write to it. Its size is
//! capped: past the cap, entries no loaded plugin uses are deleted, oldest
//! first.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

const CHECKSUM_BYTES: usize = 32;

/// The compile cache's default size cap: room for a few dozen compiled Rust
/// plugins and a handful of interpreter-based ones (a compiled CPython
/// component is about 60 MB).
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 1 << 30;

/// Where compiled components are kept, and how much of it they may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

#[derive(Debug)]
pub(crate) struct CompileCache {
    dir: PathBuf,
    max_bytes: u64,
    engine_hash: u64,
}

/// Why a cache directory is not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot create or inspect it: {0}")]
    Io(#[from] std::io::Error),
    #[error("it is owned by uid {owner}, not this process's uid {uid}")]
    NotOwned { owner: u32, uid: u32 },
    #[error("group or others may write to it (mode {mode:o}); it must be 0700")]
    Writable { mode: u32 },
}

impl CompileCache {
    pub(crate) fn open(config: &CacheConfig, engine: &Engine) -> Result<Self, CacheError> {
        let dir = &config.dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let metadata = std::fs::metadata(dir)?;
        // SAFETY: `geteuid` has no preconditions and cannot fail.
        #[allow(unsafe_code)]
        let uid = unsafe { libc::geteuid() };
        if metadata.uid() != uid {
            return Err(CacheError::NotOwned {
                owner: metadata.uid(),
                uid,
            });
        }
        let mode = metadata.mode() & 0o777;
        if mode & 0o022 != 0 {
            return Err(CacheError::Writable { mode });
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        Ok(Self {
            dir: dir.to_owned(),
            max_bytes: config.max_bytes,
            engine_hash: hasher.finish(),
        })
    }

    /// Delete entries not in `in_use` (those of the plugins loaded now),
    /// oldest first, until the cache fits its cap.
    pub(crate) fn evict(&self, in_use: &HashSet<&Path>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let metadata = entry.metadata().ok()?;
                let path = entry.path();
                let cwasm = path.extension().is_some_and(|ext| ext == "cwasm");
                let modified = metadata.modified().ok()?;
                (metadata.is_file() && cwasm).then_some((modified, metadata.len(), path))
            })
            .collect();
        let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
        files.sort();
        for (_, len, path) in files {
            if total <= self.max_bytes {
                break;
            }
            if in_use.contains(path.as_path()) {
                continue;
            }
            if std::fs::remove_file(&path).is_ok() {
                tracing::info!(path = %path.display(), bytes = len, "compile cache over its cap: entry evicted");
                total -= len;
            }
        }
    }

    /// The entry for a component whose bytes hash to `digest` (SHA-256),
    /// whether it exists or not.
    pub(crate) fn path(&self, digest: &[u8; 32]) -> PathBuf {
        let digest = hex::encode(digest);
        self.dir
            .join(format!("{digest}-{:016x}.cwasm", self.engine_hash))
    }

    /// Whether an entry exists for that digest (not yet checked for soundness).
    pub(crate) fn contains(&self, digest: &[u8; 32]) -> bool {
        self.path(digest).exists()
    }

    /// The component cached at `path` (see [`CompileCache::path`]), if a
    /// sound entry exists.
    pub(crate) fn get(&self, engine: &Engine, path: &Path) -> Option<Component> {
        let file = std::fs::read(path).ok()?;
        let sound = file.len() > CHECKSUM_BYTES
            && Sha256::digest(&file[CHECKSUM_BYTES..])[..] == file[..CHECKSUM_BYTES];
        if !sound {
            tracing::warn!(path = %path.display(), "corrupt compile cache entry: compiling again");
            let _ = std::fs::remove_file(path);
            return None;
        }
        // SAFETY: `deserialize` trusts its input to be wasmtime's own output.
        // This file is: only `put` writes into the cache directory, from
        // `Component::serialize` of a component this engine compiled, and the
        // checksum above proves the bytes are the ones it wrote.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine, &file[CHECKSUM_BYTES..]) };
        match component {
            Ok(component) => Some(component),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "unusable compile cache entry: compiling again");
                let _ = std::fs::remove_file(path);
                None
            }
        }
    }

    /// Store at `path` a component this engine just compiled.
    pub(crate) fn put(&self, path: &Path, component: &Component) {
        let Ok(payload) = component.serialize() else {
            return;
        };
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = Vec::with_capacity(CHECKSUM_BYTES + payload.len());
        file.extend_from_slice(&Sha256::digest(&payload));
        file.extend_from_slice(&payload);
        // Write then rename, so a reader never sees half an entry.
        let written = std::fs::write(&tmp, &file).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "could not write compile cache entry");
            let _ = std::fs::remove_file(&tmp);
        }
    }
}
