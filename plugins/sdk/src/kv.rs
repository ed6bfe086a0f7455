//! The plugin's own key-value state: no other plugin sees it.
//!
//! A call's writes are held aside and committed with the delivery, in the
//! same transaction that records it as succeeded. A call that fails, traps,
//! times out or dies with the host leaves nothing behind, so a retried event
//! never applies its writes twice. Reads see what is committed plus this
//! call's own writes.
//!
//! Keys are at most 256 bytes, values at most 64 KiB; the plugin's total is
//! capped by the manifest's `[kv] quota_kib` (1 MiB unless set). An error
//! names the cap that was hit.
//!
//! ```ignore
//! use stateset_hooks_sdk::kv;
//! let seen = kv::incr(&format!("customer/{id}/orders"), 1)?;
//! ```

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::bindings::stateset::webhooks::kv as wit;

/// The value under `key`, or `None`.
pub fn get(key: &str) -> Option<Vec<u8>> {
    wit::get(key)
}

/// The value under `key` read as JSON: `Ok(None)` when absent, an error when
/// it is not the `T` expected.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, String> {
    get(key)
        .map(|bytes| {
            serde_json::from_slice(&bytes)
                .map_err(|e| format!("kv {key:?} is not the JSON expected: {e}"))
        })
        .transpose()
}

/// Set `key` to `value`.
pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<(), String> {
    wit::set(key, value.as_ref(), None)
}

/// Set `key` to `value` as JSON.
pub fn set_json(key: &str, value: &impl Serialize) -> Result<(), String> {
    let bytes = serde_json::to_vec(value).map_err(|e| format!("cannot encode kv {key:?}: {e}"))?;
    set(key, bytes)
}

/// Set `key` to `value` for `ttl`: after that, it is gone.
pub fn set_with_ttl(key: &str, value: impl AsRef<[u8]>, ttl: Duration) -> Result<(), String> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    wit::set(key, value.as_ref(), Some(ms.max(1)))
}

/// Remove `key`; nothing happens if it is absent.
pub fn delete(key: &str) {
    wit::delete(key)
}

/// The keys starting with `prefix`, in order, at most `limit` of them.
pub fn keys(prefix: &str, limit: u32) -> Vec<String> {
    wit::keys(prefix, limit)
}

/// Add `delta` to the integer under `key` (absent counts as 0) and return
/// the new value. Committed as an addition, so concurrent deliveries never
/// lose one another's increments.
pub fn incr(key: &str, delta: i64) -> Result<i64, String> {
    wit::increment(key, delta)
}

/// Set `key` to `new` if it now holds `expected` (`None`: absent); `true`
/// if it did. Checked again at commit: when another delivery changed the
/// key meanwhile, this delivery fails and runs again, and then sees the
/// new value.
pub fn compare_and_swap(
    key: &str,
    expected: Option<&[u8]>,
    new: impl AsRef<[u8]>,
) -> Result<bool, String> {
    wit::compare_and_swap(key, expected, new.as_ref())
}
