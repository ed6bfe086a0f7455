//! The deliveries queued or running, so none is queued twice.
//!
//! A delivery enters when `accept` or the poller queues it and leaves when
//! its outcome is recorded (or it is handed back unrun). The poller reads the
//! store without a lock on this set, so a delivery released while it reads
//! would look pending in its stale rows; those are remembered for the length
//! of the poll and not queued again.

use std::collections::HashSet;
use std::sync::Mutex;

use crate::store::DeliveryId;

#[derive(Debug, Default)]
pub(super) struct InFlight(Mutex<Sets>);

#[derive(Debug, Default)]
struct Sets {
    running: HashSet<DeliveryId>,
    /// Released while the poller was reading: its rows for these are stale.
    released_during_poll: Option<HashSet<DeliveryId>>,
}

impl InFlight {
    pub(super) fn claim(&self, id: DeliveryId) -> bool {
        self.0.lock().expect("in-flight lock").running.insert(id)
    }

    pub(super) fn release(&self, ids: impl IntoIterator<Item = DeliveryId>) {
        let mut sets = self.0.lock().expect("in-flight lock");
        let Sets {
            running,
            released_during_poll,
        } = &mut *sets;
        for id in ids {
            running.remove(&id);
            if let Some(released) = released_during_poll {
                released.insert(id);
            }
        }
    }

    pub(super) fn begin_poll(&self) {
        self.0.lock().expect("in-flight lock").released_during_poll = Some(HashSet::new());
    }

    /// Claim a delivery the poller read, unless its outcome was recorded
    /// after the read began (the row said pending; it no longer is).
    pub(super) fn claim_polled(&self, id: DeliveryId) -> bool {
        let mut sets = self.0.lock().expect("in-flight lock");
        if sets
            .released_during_poll
            .as_ref()
            .is_some_and(|r| r.contains(&id))
        {
            return false;
        }
        sets.running.insert(id)
    }

    pub(super) fn end_poll(&self) {
        self.0.lock().expect("in-flight lock").released_during_poll = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_is_claimed_once_and_stale_poll_rows_are_skipped() {
        let in_flight = InFlight::default();
        assert!(in_flight.claim(1));
        assert!(!in_flight.claim(1), "already queued");
        in_flight.begin_poll();
        in_flight.release([1]);
        assert!(!in_flight.claim_polled(1), "recorded while the poll read");
        in_flight.end_poll();
        assert!(in_flight.claim_polled(1));
    }
}
