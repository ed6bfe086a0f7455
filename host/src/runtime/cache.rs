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

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

const CHECKSUM_BYTES: usize = 32;

#[derive(Debug)]
pub(crate) struct CompileCache {
    dir: PathBuf,
    engine_hash: u64,
}

impl CompileCache {
    pub(crate) fn open(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        env!("CARGO_PKG_VERSION").hash(&mut hasher);
        Ok(Self {
            dir: dir.to_owned(),
            engine_hash: hasher.finish(),
        })
    }

    fn path(&self, component_bytes: &[u8]) -> PathBuf {
        let digest = hex::encode(Sha256::digest(component_bytes));
        self.dir
            .join(format!("{digest}-{:016x}.cwasm", self.engine_hash))
    }

    /// Whether an entry exists for these bytes (not yet checked for soundness).
    pub(crate) fn contains(&self, component_bytes: &[u8]) -> bool {
        self.path(component_bytes).exists()
    }

    /// The cached component for these bytes, if a sound entry exists.
    pub(crate) fn get(&self, engine: &Engine, component_bytes: &[u8]) -> Option<Component> {
        let path = self.path(component_bytes);
        let file = std::fs::read(&path).ok()?;
        let sound = file.len() > CHECKSUM_BYTES
            && Sha256::digest(&file[CHECKSUM_BYTES..])[..] == file[..CHECKSUM_BYTES];
        if !sound {
            tracing::warn!(path = %path.display(), "corrupt compile cache entry: compiling again");
            let _ = std::fs::remove_file(&path);
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
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Store a component this engine just compiled from `component_bytes`.
    pub(crate) fn put(&self, component_bytes: &[u8], component: &Component) {
        let Ok(payload) = component.serialize() else {
            return;
        };
        let path = self.path(component_bytes);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut file = Vec::with_capacity(CHECKSUM_BYTES + payload.len());
        file.extend_from_slice(&Sha256::digest(&payload));
        file.extend_from_slice(&payload);
        // Write then rename, so a reader never sees half an entry.
        let written = std::fs::write(&tmp, &file).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "could not write compile cache entry");
            let _ = std::fs::remove_file(&tmp);
        }
    }
}
