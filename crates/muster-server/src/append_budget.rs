//! How many bytes one append to a peer may carry.
//!
//! openraft gives every append the heartbeat interval (50 ms by default) to be
//! answered, whatever it carries, and sends up to `max_payload_entries` entries at
//! once. A follower catching up over a slow link (2 MB/s carries 100 KB in 50 ms)
//! would be sent batches of hundreds of kilobytes that can never arrive in time: each
//! is cut off at its deadline, the same batch is sent again, and the follower stays
//! behind for good. So each connection to a peer learns a budget from the appends
//! that missed their deadline, and a batch over it is refused before it is sent with
//! openraft's `PayloadTooLarge`, whose entry count hint makes openraft send the
//! entries that fit first.
//!
//! The budget starts unlimited (a link is assumed fast until an append says
//! otherwise) and halves from the size of an append that missed its deadline, never
//! below [`SMALLEST_BUDGET_BYTES`]. It doubles after an append that used at least
//! half of it arrived within half its deadline, and is unlimited again once it
//! passes [`UNLIMITED_ABOVE_BYTES`]. An append smaller than the smallest budget
//! that misses its deadline says nothing about the link (the peer or this node was
//! busy) and leaves the budget alone.

use std::time::Duration;

/// The smallest budget: an append this small that misses its deadline was not held
/// up by its size.
pub const SMALLEST_BUDGET_BYTES: u64 = 16 * 1024;

/// A budget grown past this is lifted.
pub const UNLIMITED_ABOVE_BYTES: u64 = 8 * 1024 * 1024;

/// The most bytes an append to one peer may carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppendBudget {
    /// `None` while no append has said the link is slow.
    limit: Option<u64>,
}

impl AppendBudget {
    /// The current limit in bytes, `None` when appends are not limited.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// An append of `sent` bytes missed its deadline.
    pub fn missed(&mut self, sent: u64) {
        if sent <= SMALLEST_BUDGET_BYTES {
            return;
        }
        let halved = (sent / 2).max(SMALLEST_BUDGET_BYTES);
        self.limit = Some(self.limit.map_or(halved, |limit| limit.min(halved)));
    }

    /// An append of `sent` bytes was answered `took` after it was sent, with
    /// `deadline` to be answered in.
    pub fn delivered(&mut self, sent: u64, took: Duration, deadline: Duration) {
        let Some(limit) = self.limit else { return };
        if sent.saturating_mul(2) >= limit && took.saturating_mul(2) <= deadline {
            let doubled = limit.saturating_mul(2);
            self.limit = (doubled <= UNLIMITED_ABOVE_BYTES).then_some(doubled);
        }
    }

    /// How many entries, of an append of `total` bytes whose entries take `entry_sizes`
    /// bytes each in order, should go in this append: `None` when the whole append is
    /// within the budget (or carries a single entry, which has to go alone whatever
    /// its size), else the most leading entries that fit, at least one.
    pub fn entries_within(&self, total: u64, entry_sizes: impl IntoIterator<Item = u64>) -> Option<u64> {
        let limit = self.limit?;
        if total <= limit {
            return None;
        }
        let mut entries = entry_sizes.into_iter();
        let first = entries.next()?;
        // What the append carries besides its entries (vote, commit index, framing).
        let mut used = first;
        let mut fitting = 1;
        for size in entries {
            used = used.saturating_add(size);
            if used > limit {
                return Some(fitting);
            }
            fitting += 1;
        }
        // Every entry fits; the rest of the message took it over.
        (fitting > 1).then_some(fitting - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEADLINE: Duration = Duration::from_millis(50);
    const KB: u64 = 1024;

    #[test]
    fn appends_are_not_limited_until_one_misses_its_deadline() {
        let budget = AppendBudget::default();
        assert_eq!(budget.limit(), None);
        assert_eq!(budget.entries_within(64 * 1024 * 1024, [KB; 512]), None);
    }

    #[test]
    fn a_large_append_that_missed_its_deadline_halves_the_budget_from_its_size() {
        let mut budget = AppendBudget::default();
        budget.missed(600 * KB);
        assert_eq!(budget.limit(), Some(300 * KB));
        budget.missed(300 * KB);
        assert_eq!(budget.limit(), Some(150 * KB));
        // A late answer to a larger append sent before the budget shrank does not
        // raise it.
        budget.missed(600 * KB);
        assert_eq!(budget.limit(), Some(150 * KB));
    }

    #[test]
    fn a_small_append_that_missed_its_deadline_says_nothing_about_the_link() {
        let mut budget = AppendBudget::default();
        budget.missed(200);
        budget.missed(SMALLEST_BUDGET_BYTES);
        assert_eq!(budget.limit(), None);
        budget.missed(SMALLEST_BUDGET_BYTES + 1);
        assert_eq!(budget.limit(), Some(SMALLEST_BUDGET_BYTES));
    }

    #[test]
    fn the_budget_grows_back_only_from_appends_that_used_it_and_arrived_early() {
        let mut budget = AppendBudget::default();
        budget.missed(200 * KB);
        assert_eq!(budget.limit(), Some(100 * KB));
        // Small appends, however fast, say nothing about what a full one would do.
        budget.delivered(10 * KB, Duration::from_millis(1), DEADLINE);
        assert_eq!(budget.limit(), Some(100 * KB));
        // A full append that only just made it: the budget is about right.
        budget.delivered(90 * KB, Duration::from_millis(40), DEADLINE);
        assert_eq!(budget.limit(), Some(100 * KB));
        budget.delivered(60 * KB, Duration::from_millis(10), DEADLINE);
        assert_eq!(budget.limit(), Some(200 * KB));
    }

    #[test]
    fn a_budget_grown_past_the_ceiling_is_lifted() {
        let mut budget = AppendBudget::default();
        budget.missed(UNLIMITED_ABOVE_BYTES);
        assert_eq!(budget.limit(), Some(UNLIMITED_ABOVE_BYTES / 2));
        budget.delivered(UNLIMITED_ABOVE_BYTES / 2, Duration::from_millis(5), DEADLINE);
        assert_eq!(budget.limit(), Some(UNLIMITED_ABOVE_BYTES));
        budget.delivered(UNLIMITED_ABOVE_BYTES, Duration::from_millis(5), DEADLINE);
        assert_eq!(budget.limit(), None);
    }

    #[test]
    fn an_append_over_the_budget_is_cut_to_the_entries_that_fit() {
        let mut budget = AppendBudget::default();
        budget.missed(200 * KB);
        assert_eq!(budget.entries_within(100 * KB, [KB; 90]), None);
        assert_eq!(budget.entries_within(512 * KB + 100, [KB; 512]), Some(100));
        // One entry goes alone whatever its size.
        assert_eq!(budget.entries_within(300 * KB, [300 * KB]), None);
        assert_eq!(budget.entries_within(400 * KB, [300 * KB, KB]), Some(1));
        // Entries that fit with a message that does not: one entry fewer.
        assert_eq!(budget.entries_within(100 * KB + 1, [50 * KB, 50 * KB]), Some(1));
    }

    proptest! {
        #[test]
        fn a_cut_append_keeps_at_least_one_entry_and_fits_unless_that_one_does_not(
            limit_from in (SMALLEST_BUDGET_BYTES + 1)..(4 * 1024 * 1024),
            sizes in prop::collection::vec(1u64..(256 * 1024), 1..600),
            overhead in 0u64..64,
        ) {
            let mut budget = AppendBudget::default();
            budget.missed(limit_from);
            let limit = budget.limit().expect("limited");
            let total = sizes.iter().sum::<u64>() + overhead;
            match budget.entries_within(total, sizes.iter().copied()) {
                None => prop_assert!(total <= limit || sizes.len() == 1),
                Some(n) => {
                    prop_assert!(n >= 1 && (n as usize) < sizes.len());
                    let carried: u64 = sizes[..n as usize].iter().sum();
                    prop_assert!(carried <= limit || n == 1);
                    // No more entries would have fitted.
                    let one_more: u64 = sizes[..=n as usize].iter().sum();
                    prop_assert!(one_more > limit || one_more + overhead > limit);
                }
            }
        }
    }
}
