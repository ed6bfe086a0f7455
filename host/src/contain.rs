//! Keeping a long-lived thread alive through a panic in one unit of its work.
//!
//! The workers, the poller, the recorder and the store writer each run a loop
//! for the life of the host; a panic in one delivery or one batch must cost
//! that delivery or batch, never the thread (and with it every later
//! delivery). This module only catches and describes the panic; what the
//! caller records for the lost work is its own business.

use std::panic::{AssertUnwindSafe, catch_unwind};

/// Run `f`; a panic in it comes back as its message instead of unwinding
/// further. The state `f` touched is the caller's to distrust: callers give
/// up the unit of work and keep only what outlives it (queues, counters).
pub(crate) fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_the_thread_goes_on() {
        assert_eq!(contain(|| 7), Ok(7));
        assert_eq!(contain(|| panic!("static")), Err::<(), _>("static".into()));
        let n = 3;
        assert_eq!(
            contain(|| panic!("formatted {n}")),
            Err::<(), _>("formatted 3".into())
        );
    }
}
