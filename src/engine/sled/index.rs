//! The in-memory index of which users may have messages.
//!
//! A fixed table of counters indexed by a hash of the user: each counter is
//! at least the number of stored records of all users hashing to it. A zero
//! counter proves the user has nothing queued, so the common request (an
//! empty queue) costs one hash and one atomic load, with no disk access.
//!
//! The invariant is kept by ordering: a sender increments *before* its
//! record becomes visible, a drain decrements *after* its records are
//! removed. Over-counting (a failed send, two users in one slot) only sends
//! a request down the slow path; it never hides a message. The table's size
//! is fixed, so memory does not grow with the number of users. It is
//! rebuilt from the records at open.

use std::sync::atomic::{AtomicU32, Ordering};

pub(crate) struct PendingIndex {
    counters: Box<[AtomicU32]>,
    mask: u64,
}

impl PendingIndex {
    /// A table of `slots` counters, rounded up to a power of two.
    pub(crate) fn new(slots: usize) -> PendingIndex {
        let slots = slots.max(1).next_power_of_two();
        PendingIndex {
            counters: (0..slots).map(|_| AtomicU32::new(0)).collect(),
            mask: (slots - 1) as u64,
        }
    }

    /// The slot of a user prefix.
    pub(crate) fn slot(&self, prefix: &[u8]) -> usize {
        // The mask keeps the value below the table's length, which is a usize.
        usize::try_from(crate::key::prefix_hash(prefix) & self.mask).unwrap_or(0)
    }

    fn counter(&self, slot: usize) -> &AtomicU32 {
        &self.counters[slot & self.mask as usize]
    }

    /// `true` when no user of this slot can have a record.
    pub(crate) fn is_empty(&self, slot: usize) -> bool {
        self.counter(slot).load(Ordering::Acquire) == 0
    }

    /// Call before a record of this slot becomes visible.
    pub(crate) fn add(&self, slot: usize, n: u32) {
        // Saturates: a counter stuck at MAX is never decremented again, which
        // keeps it an upper bound.
        let _ = self
            .counter(slot)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                Some(c.saturating_add(n))
            });
    }

    /// Call after `n` records of this slot have been removed.
    pub(crate) fn sub(&self, slot: usize, n: u32) {
        let _ = self
            .counter(slot)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
                (c != u32::MAX).then(|| c.saturating_sub(n))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_up_and_down() {
        let index = PendingIndex::new(1000);
        let slot = index.slot(b"user");
        assert!(index.is_empty(slot));
        index.add(slot, 2);
        index.sub(slot, 1);
        assert!(!index.is_empty(slot));
        index.sub(slot, 1);
        assert!(index.is_empty(slot));
        index.add(slot, u32::MAX);
        index.sub(slot, 5);
        assert!(!index.is_empty(slot), "a saturated counter stays non-zero");
    }
}
