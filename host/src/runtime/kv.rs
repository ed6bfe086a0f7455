//! A plugin's key-value state as one call sees it (WIT `kv`, version 0.3.0).
//!
//! Reads go to the committed state through [`KvRead`] (the store implements
//! it) overlaid with the call's own writes; writes are only recorded, as
//! [`KvOp`]s, and leave with the call's outcome. The dispatcher hands them to
//! the store with the delivery's record, which applies them in the same
//! transaction (increments as additions, compare-and-swaps checked again), so
//! a failed or repeated call leaves nothing behind. Owns the caps; knows
//! nothing of SQL.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Longest key: keys are names, not data.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest value.
pub const MAX_VALUE_BYTES: usize = 64 << 10;
/// Writes one call may make.
pub const MAX_OPS_PER_CALL: usize = 1_000;
/// Default total of a plugin's keys and values (`[kv] quota_kib`).
pub const DEFAULT_KV_QUOTA_BYTES: u64 = 1 << 20;
/// The most a manifest may ask for unless the operator says otherwise.
pub const DEFAULT_MAX_KV_QUOTA_BYTES: u64 = 64 << 20;

/// The operator's bound on every plugin's `[kv]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvPolicy {
    /// The largest `[kv] quota_kib` a manifest may ask for, in bytes. A
    /// default above it is lowered to it.
    pub max_quota_bytes: u64,
}

impl Default for KvPolicy {
    fn default() -> Self {
        Self {
            max_quota_bytes: DEFAULT_MAX_KV_QUOTA_BYTES,
        }
    }
}

/// One write, applied when the delivery commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    Set {
        key: String,
        value: Vec<u8>,
        /// Unix ms after which the key is gone.
        expires_at: Option<i64>,
    },
    Delete {
        key: String,
    },
    /// Add to the decimal integer under `key` (absent: 0).
    Increment {
        key: String,
        delta: i64,
    },
    /// Set `new` if the key still holds `expected`, else the delivery fails.
    CompareAndSwap {
        key: String,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
    },
}

/// The committed state, read by plugin name. Errors are messages.
pub trait KvRead: Send + Sync {
    fn kv_get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, String>;
    /// Keys of `plugin` starting with `prefix`, in order, at most `limit`.
    fn kv_keys(&self, plugin: &str, prefix: &str, limit: usize) -> Result<Vec<String>, String>;
    /// Bytes of `plugin`'s keys and values.
    fn kv_usage(&self, plugin: &str) -> Result<u64, String>;

    /// Whether a read answers at once, never waiting on a lock or a
    /// network: then a call reads in place. Otherwise (the default) it
    /// reads on tokio's blocking pool and awaits the answer under the
    /// call's deadline, which costs a thread hand-off per read.
    fn reads_in_place(&self) -> bool {
        false
    }
}

/// No committed state at all: what `stateset-hooks run` reads without a
/// database, and what a plugin sees on its first event.
#[derive(Debug)]
pub struct EmptyKv;

impl KvRead for EmptyKv {
    fn reads_in_place(&self) -> bool {
        true
    }

    fn kv_get(&self, _plugin: &str, _key: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(None)
    }

    fn kv_keys(&self, _plugin: &str, _prefix: &str, _limit: usize) -> Result<Vec<String>, String> {
        Ok(Vec::new())
    }

    fn kv_usage(&self, _plugin: &str) -> Result<u64, String> {
        Ok(0)
    }
}

/// One plugin's state in memory, with no expiry: what a plugin test case
/// (`stateset-hooks test`) starts from, and where its writes are applied
/// to check the state after.
#[derive(Debug, Default)]
pub struct MemoryKv(std::sync::Mutex<BTreeMap<String, Vec<u8>>>);

impl MemoryKv {
    pub fn new(entries: impl IntoIterator<Item = (String, Vec<u8>)>) -> Self {
        Self(std::sync::Mutex::new(entries.into_iter().collect()))
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commit a call's writes as a store does, all or none: a
    /// compare-and-swap that no longer holds, or an increment of a value
    /// that is not an integer, refuses the lot.
    pub fn apply(&self, ops: &[KvOp]) -> Result<(), String> {
        let mut map = self.map();
        let mut next = map.clone();
        for op in ops {
            match op {
                KvOp::Set { key, value, .. } => {
                    next.insert(key.clone(), value.clone());
                }
                KvOp::Delete { key } => {
                    next.remove(key);
                }
                KvOp::Increment { key, delta } => {
                    let current = match next.get(key) {
                        Some(bytes) => parse_integer(key, bytes)?,
                        None => 0,
                    };
                    let new = current
                        .checked_add(*delta)
                        .ok_or_else(|| format!("kv key {key:?}: {current} + {delta} overflows"))?;
                    next.insert(key.clone(), new.to_string().into_bytes());
                }
                KvOp::CompareAndSwap { key, expected, new } => {
                    if next.get(key) != expected.as_ref() {
                        return Err(format!("kv key {key:?} no longer holds what was expected"));
                    }
                    next.insert(key.clone(), new.clone());
                }
            }
        }
        *map = next;
        Ok(())
    }

    /// Every key and its value.
    pub fn entries(&self) -> BTreeMap<String, Vec<u8>> {
        self.map().clone()
    }
}

impl KvRead for MemoryKv {
    fn reads_in_place(&self) -> bool {
        true
    }

    fn kv_get(&self, _plugin: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(self.map().get(key).cloned())
    }

    fn kv_keys(&self, _plugin: &str, prefix: &str, limit: usize) -> Result<Vec<String>, String> {
        let map = self.map();
        Ok(map
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, _)| k.clone())
            .collect())
    }

    fn kv_usage(&self, _plugin: &str) -> Result<u64, String> {
        let map = self.map();
        Ok(map.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum())
    }
}

/// A manifest's `[kv]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvManifest {
    pub quota_kib: Option<u64>,
}

impl KvManifest {
    /// The plugin's quota in bytes under the operator's `policy`, refused
    /// above its maximum.
    pub fn quota(&self, policy: &KvPolicy) -> Result<u64, String> {
        let max_kib = policy.max_quota_bytes >> 10;
        match self.quota_kib {
            Some(kib) if kib > max_kib => Err(format!(
                "kv.quota_kib = {kib} is above the maximum, {max_kib}"
            )),
            Some(kib) => Ok(kib << 10),
            None => Ok(DEFAULT_KV_QUOTA_BYTES.min(policy.max_quota_bytes)),
        }
    }
}

/// Why a kv call did not do what it asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KvError {
    /// A cap, the quota or the value held: the plugin's answer (`err`).
    Refused(String),
    /// The store failed: the host's problem, a trap, not an answer.
    Store(String),
}

impl From<String> for KvError {
    /// A message is a refusal; store failures are made explicitly.
    fn from(message: String) -> Self {
        Self::Refused(message)
    }
}

/// One call's view of its plugin's state.
pub(crate) struct KvSession {
    plugin: Arc<str>,
    reader: Option<Arc<dyn KvRead>>,
    quota: u64,
    /// What this call wrote: `None` is deleted.
    overlay: BTreeMap<String, Option<Vec<u8>>>,
    ops: Vec<KvOp>,
    /// Committed usage when first needed, plus what this call added.
    usage: Option<u64>,
}

impl KvSession {
    pub(crate) fn new(plugin: Arc<str>, reader: Option<Arc<dyn KvRead>>, quota: u64) -> Self {
        Self {
            plugin,
            reader,
            quota,
            overlay: BTreeMap::new(),
            ops: Vec::new(),
            usage: None,
        }
    }

    /// A session for the next call of the same plugin: nothing written yet.
    pub(crate) fn fresh(&self) -> Self {
        Self::new(self.plugin.clone(), self.reader.clone(), self.quota)
    }

    /// The writes, for the outcome.
    pub(crate) fn into_ops(self) -> Vec<KvOp> {
        self.ops
    }

    /// Read the committed state: in place when the store answers at once,
    /// else on tokio's blocking pool, awaited like any host future, so a
    /// slow store cannot hold a call past its deadline (the call's deadline
    /// timer abandons the wait).
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&dyn KvRead, &str) -> Result<T, String> + Send + 'static,
    ) -> Result<T, KvError> {
        let reader = self
            .reader
            .clone()
            .ok_or_else(|| KvError::Store("no key-value store in this host".to_owned()))?;
        let plugin = self.plugin.clone();
        let answer = if reader.reads_in_place() {
            read(&*reader, &plugin)
        } else {
            tokio::task::spawn_blocking(move || read(&*reader, &plugin))
                .await
                .map_err(|e| KvError::Store(format!("the store read failed: {e}")))?
        };
        answer.map_err(KvError::Store)
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        match self.overlay.get(key) {
            Some(value) => Ok(value.clone()),
            None => {
                let key = key.to_owned();
                self.read(move |reader, plugin| reader.kv_get(plugin, &key))
                    .await
            }
        }
    }

    pub(crate) async fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, KvError> {
        let (owned, wanted) = (prefix.to_owned(), limit + self.overlay.len());
        let committed = self
            .read(move |reader, plugin| reader.kv_keys(plugin, &owned, wanted))
            .await?;
        let mut keys: std::collections::BTreeSet<String> = committed.into_iter().collect();
        for (key, value) in self.overlay.range(prefix.to_owned()..) {
            if !key.starts_with(prefix) {
                break;
            }
            match value {
                Some(_) => keys.insert(key.clone()),
                None => keys.remove(key),
            };
        }
        Ok(keys.into_iter().take(limit).collect())
    }

    pub(crate) async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        expires_at: Option<i64>,
    ) -> Result<(), KvError> {
        self.write_check(&key, value.len()).await?;
        self.overlay.insert(key.clone(), Some(value.clone()));
        self.ops.push(KvOp::Set {
            key,
            value,
            expires_at,
        });
        Ok(())
    }

    /// Deleting frees space: it is never refused for the quota.
    pub(crate) fn delete(&mut self, key: String) -> Result<(), KvError> {
        self.caps(&key, 0)?;
        self.overlay.insert(key.clone(), None);
        self.ops.push(KvOp::Delete { key });
        Ok(())
    }

    pub(crate) async fn increment(&mut self, key: String, delta: i64) -> Result<i64, KvError> {
        let current = match self.get(&key).await? {
            None => 0,
            Some(bytes) => parse_integer(&key, &bytes)?,
        };
        let new = current
            .checked_add(delta)
            .ok_or_else(|| format!("kv key {key:?}: {current} + {delta} overflows"))?;
        let text = new.to_string().into_bytes();
        self.write_check(&key, text.len()).await?;
        self.overlay.insert(key.clone(), Some(text));
        self.ops.push(KvOp::Increment { key, delta });
        Ok(new)
    }

    pub(crate) async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        new: Vec<u8>,
    ) -> Result<bool, KvError> {
        if self.get(&key).await? != expected {
            return Ok(false);
        }
        self.write_check(&key, new.len()).await?;
        self.overlay.insert(key.clone(), Some(new.clone()));
        self.ops.push(KvOp::CompareAndSwap { key, expected, new });
        Ok(true)
    }

    /// Refuse a write past a cap.
    fn caps(&self, key: &str, value_bytes: usize) -> Result<(), KvError> {
        if key.is_empty() || key.len() > MAX_KEY_BYTES {
            return Err(format!("kv keys are 1 to {MAX_KEY_BYTES} bytes").into());
        }
        // No store keeps text with NUL in it alike (PostgreSQL refuses it).
        if key.contains('\0') {
            return Err(String::from("kv keys may not contain NUL").into());
        }
        if value_bytes > MAX_VALUE_BYTES {
            return Err(format!("kv values are at most {MAX_VALUE_BYTES} bytes").into());
        }
        if self.ops.len() >= MAX_OPS_PER_CALL {
            return Err(format!("at most {MAX_OPS_PER_CALL} kv writes per call").into());
        }
        Ok(())
    }

    /// Refuse a write past a cap, counting it against the quota if not.
    async fn write_check(&mut self, key: &str, value_bytes: usize) -> Result<(), KvError> {
        self.caps(key, value_bytes)?;
        let usage = match self.usage {
            Some(usage) => usage,
            None => self.read(|reader, plugin| reader.kv_usage(plugin)).await?,
        };
        // Counted as if every write added a key: a bound, not a ledger.
        let after = usage + (key.len() + value_bytes) as u64;
        if after > self.quota {
            return Err(format!(
                "kv quota of {} bytes reached (set [kv] quota_kib in the manifest)",
                self.quota
            )
            .into());
        }
        self.usage = Some(after);
        Ok(())
    }
}

/// When a key set now with `ttl_ms` is gone (unix ms).
pub(crate) fn expires_at(ttl_ms: u64) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    now.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX))
}

/// The integer stored under `key` (decimal text).
pub fn parse_integer(key: &str, bytes: &[u8]) -> Result<i64, String> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| format!("kv key {key:?} does not hold a decimal integer"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(committed: &[(&str, &str)], quota: u64) -> KvSession {
        let store = MemoryKv::new(
            committed
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec())),
        );
        KvSession::new("p".into(), Some(Arc::new(store)), quota)
    }

    #[tokio::test]
    async fn reads_see_committed_state_plus_own_writes() {
        let mut kv = session(&[("a", "1"), ("b", "2"), ("c", "3")], 1 << 20);
        kv.set("d".into(), b"4".to_vec(), None).await.unwrap();
        kv.delete("b".into()).unwrap();
        assert_eq!(kv.get("a").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(kv.get("b").await.unwrap(), None);
        assert_eq!(kv.keys("", 10).await.unwrap(), ["a", "c", "d"]);
        assert_eq!(kv.keys("", 2).await.unwrap(), ["a", "c"]);
        assert_eq!(kv.increment("a".into(), 41).await.unwrap(), 42);
        assert_eq!(kv.increment("new".into(), -2).await.unwrap(), -2);
        assert!(kv.increment("d".into(), 1).await.is_ok());
        assert!(
            !kv.compare_and_swap("c".into(), Some(b"9".to_vec()), b"x".to_vec())
                .await
                .unwrap()
        );
        assert!(
            kv.compare_and_swap("c".into(), Some(b"3".to_vec()), b"x".to_vec())
                .await
                .unwrap()
        );
        assert!(
            kv.compare_and_swap("z".into(), None, b"y".to_vec())
                .await
                .unwrap()
        );
        assert_eq!(kv.into_ops().len(), 7);
    }

    #[tokio::test]
    async fn writes_applied_in_memory_match_what_the_call_read_back() {
        let state = Arc::new(MemoryKv::new([
            ("n".to_owned(), b"1".to_vec()),
            ("old".to_owned(), b"x".to_vec()),
        ]));
        let mut kv = KvSession::new("p".into(), Some(state.clone()), 1 << 20);
        kv.increment("n".into(), 2).await.unwrap();
        kv.delete("old".into()).unwrap();
        assert!(
            kv.compare_and_swap("c".into(), None, b"y".to_vec())
                .await
                .unwrap()
        );
        kv.set("s".into(), b"v".to_vec(), None).await.unwrap();
        state.apply(&kv.into_ops()).unwrap();
        let after: Vec<_> = state.entries().into_iter().collect();
        assert_eq!(
            after,
            [
                ("c".to_owned(), b"y".to_vec()),
                ("n".to_owned(), b"3".to_vec()),
                ("s".to_owned(), b"v".to_vec()),
            ]
        );
        let stale = KvOp::CompareAndSwap {
            key: "c".into(),
            expected: None,
            new: b"z".to_vec(),
        };
        let set = KvOp::Set {
            key: "t".into(),
            value: vec![],
            expires_at: None,
        };
        assert!(state.apply(&[set, stale]).is_err());
        assert!(!state.entries().contains_key("t"), "all or none");
    }

    #[tokio::test]
    async fn caps_and_quota() {
        let mut kv = session(&[("k", "vvvv")], 20);
        assert!(
            kv.set("x".repeat(MAX_KEY_BYTES + 1), vec![], None)
                .await
                .is_err()
        );
        assert!(
            kv.set("big".into(), vec![0; MAX_VALUE_BYTES + 1], None)
                .await
                .is_err()
        );
        kv.set("a".into(), vec![0; 10], None).await.unwrap(); // 5 + 11 = 16
        let err = kv.set("b".into(), vec![0; 10], None).await.unwrap_err();
        assert!(
            matches!(&err, KvError::Refused(m) if m.contains("quota")),
            "{err:?}"
        );
        // Deleting frees space: never refused for the quota.
        kv.delete("k".into()).unwrap();
        let mut text = session(&[("name", "bob")], 1 << 20);
        let err = text.increment("name".into(), 1).await.unwrap_err();
        assert!(
            matches!(&err, KvError::Refused(m) if m.contains("decimal")),
            "{err:?}"
        );
        // No store at all is the host's failure, not the plugin's answer.
        let mut none = KvSession::new("p".into(), None, 1 << 20);
        assert!(matches!(none.get("k").await, Err(KvError::Store(_))));
        let set = none.set("k".into(), vec![1], None).await;
        assert!(matches!(set, Err(KvError::Store(_))), "{set:?}");
    }
}
