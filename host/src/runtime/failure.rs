//! What went wrong in a plugin call, classified so callers can branch on it.
//!
//! Owns the failure kinds and the mapping from wasmtime errors to them. It does
//! not decide what happens next (retry, quarantine): the dispatcher does.

use std::fmt;

use wasmtime::Trap;

use super::limits::MemoryLimitExceeded;

/// The kind of a failed call. The `Display` form (`out-of-fuel`, ...) is what
/// logs, counters and the CLI show.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The call used all its fuel.
    OutOfFuel,
    /// The call passed its wall-clock deadline.
    Timeout,
    /// The call tried to grow memory past its limit.
    OutOfMemory,
    /// The wasm stack was exhausted (deep recursion).
    StackOverflow,
    /// Any other trap: `unreachable`, a panic, an out-of-bounds access, ...
    Trap,
    /// The plugin returned `Err` from `on-event`.
    PluginError,
    /// The component could not be instantiated for this call.
    LoadError,
    /// The host failed, not the plugin: a panic while handling the delivery,
    /// a stored event that cannot be handed to a plugin, or the store
    /// failing a kv read during the call.
    HostError,
}

impl FailureKind {
    /// Every kind, in a fixed order (for counters indexed by kind).
    pub const ALL: [FailureKind; 8] = [
        Self::OutOfFuel,
        Self::Timeout,
        Self::OutOfMemory,
        Self::StackOverflow,
        Self::Trap,
        Self::PluginError,
        Self::LoadError,
        Self::HostError,
    ];

    /// This kind's position in [`FailureKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The kind named `name` (as [`FailureKind::as_str`] writes it).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The stable, kebab-case name used in logs and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfFuel => "out-of-fuel",
            Self::Timeout => "timeout",
            Self::OutOfMemory => "out-of-memory",
            Self::StackOverflow => "stack-overflow",
            Self::Trap => "trap",
            Self::PluginError => "plugin-error",
            Self::LoadError => "load-error",
            Self::HostError => "host-error",
        }
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a call ended without an outcome of the plugin's making: the host's
/// doing, so it is not an attempt and is never counted against the plugin.
/// The delivery stays as it was and runs again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotRun {
    /// The host is shutting down and cut the call short.
    #[error("the host is shutting down: the call was cut short")]
    Cancelled,
    /// The instance pool had no room. Calls wait for a slot first, so this
    /// means the pool was sized wrong, not that the plugin misbehaved.
    #[error("the instance pool is exhausted")]
    PoolExhausted,
}

/// A failed call: its kind and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

/// An error of the host's own inside a call (the store failed a kv read):
/// the call fails as [`FailureKind::HostError`], which is not the plugin's
/// doing and does not count towards its quarantine.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct HostFault(pub String);

impl Failure {
    /// As a comparison of outcomes shows it: `failed (kind): message`.
    pub fn described(&self) -> String {
        format!("failed ({}): {}", self.kind, self.message)
    }

    pub(crate) fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// Classify an error from instantiating or calling a component.
    pub(crate) fn from_wasmtime(error: &wasmtime::Error) -> Self {
        if let Some(limit) = error.downcast_ref::<MemoryLimitExceeded>() {
            return Self::new(FailureKind::OutOfMemory, limit.to_string());
        }
        if let Some(fault) = error.downcast_ref::<HostFault>() {
            return Self::new(FailureKind::HostError, fault.to_string());
        }
        match error.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => Self::new(FailureKind::OutOfFuel, "all fuel consumed"),
            Some(Trap::Interrupt) => Self::new(FailureKind::Timeout, "deadline exceeded"),
            Some(Trap::StackOverflow) => {
                Self::new(FailureKind::StackOverflow, "wasm call stack exhausted")
            }
            Some(trap) => {
                let message = trap.to_string();
                let message = message.strip_prefix("wasm trap: ").unwrap_or(&message);
                Self::new(FailureKind::Trap, message)
            }
            // Not a trap: a host function failed, or a WASI stream trapped.
            None => Self::new(FailureKind::Trap, format!("{:#}", error.root_cause())),
        }
    }
}
