//! A linearizability checker for concurrent histories, after Wing & Gong with the
//! memoisation of Lowe and of Porcupine: search for an order of the operations that
//! respects real time (an operation that returned before another was called comes
//! first) and that a sequential model accepts, caching `(linearized set, state)`
//! pairs so equivalent prefixes are explored once.
//!
//! Histories are checked per partition (for a registry, per instance key), which is
//! sound for models whose operations touch one partition each.

use std::collections::HashSet;
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    /// The model's state.
    type State: Clone + Eq + Hash;
    /// An operation's input.
    type Input;
    /// An operation's observed output.
    type Output;

    /// The initial state.
    fn init(&self) -> Self::State;

    /// Applies `input` to `state`; `Some(next)` when `output` is what the model
    /// answers, `None` when the operation cannot have produced `output` here.
    fn step(&self, state: &Self::State, input: &Self::Input, output: &Self::Output) -> Option<Self::State>;
}

/// One completed operation: when it was called and when it returned (any clock
/// shared by all clients, e.g. nanoseconds since the test started).
#[derive(Clone, Debug)]
pub struct Operation<I, O> {
    /// The client that ran it (for reports).
    pub client: usize,
    /// Call time.
    pub call: u64,
    /// Return time (>= call).
    pub ret: u64,
    /// Input.
    pub input: I,
    /// Output.
    pub output: O,
}

/// The verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A valid linearization exists.
    Linearizable,
    /// None exists; `longest` is the longest prefix (operation indices) the search
    /// could linearize, to help read the failure.
    NotLinearizable {
        /// Operation indices of the longest linearizable prefix found.
        longest: Vec<usize>,
    },
    /// The search gave up after `steps` without a verdict.
    Unknown {
        /// Search steps taken.
        steps: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    op: usize,
    is_call: bool,
    /// Index of the matching return entry (for calls).
    matching: usize,
}

/// Checks one history against `model`, giving up after `max_steps` search steps.
pub fn check<M: Model>(model: &M, history: &[Operation<M::Input, M::Output>], max_steps: u64) -> Verdict {
    let n = history.len();
    if n == 0 {
        return Verdict::Linearizable;
    }
    // Events sorted by time; at equal times calls come before returns, so operations
    // that touch at one instant count as concurrent.
    let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in history.iter().enumerate() {
        events.push((op.call, true, i));
        events.push((op.ret.max(op.call), false, i));
    }
    events.sort_by_key(|(t, is_call, i)| (*t, !*is_call, *i));
    let mut ret_pos = vec![0usize; n];
    for (pos, (_, is_call, i)) in events.iter().enumerate() {
        if !*is_call {
            ret_pos[*i] = pos;
        }
    }
    let entries: Vec<Entry> = events
        .iter()
        .map(|(_, is_call, i)| Entry {
            op: *i,
            is_call: *is_call,
            matching: ret_pos[*i],
        })
        .collect();

    // A doubly linked list over the entries, so entries can be lifted and put back.
    let len = entries.len();
    let mut next: Vec<usize> = (1..=len).collect(); // len = end
    let mut prev: Vec<usize> = (0..len).map(|i| if i == 0 { usize::MAX } else { i - 1 }).collect();
    let mut head = 0usize;

    let lift = |pos: usize, head: &mut usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        // Remove `pos` and its matching return.
        for p in [pos, entries[pos].matching] {
            let (pr, nx) = (prev[p], next[p]);
            if pr == usize::MAX {
                *head = nx;
            } else {
                next[pr] = nx;
            }
            if nx < len {
                prev[nx] = pr;
            }
        }
    };
    let unlift = |pos: usize, head: &mut usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        for p in [entries[pos].matching, pos] {
            let (pr, nx) = (prev[p], next[p]);
            if pr == usize::MAX {
                *head = p;
            } else {
                next[pr] = p;
            }
            if nx < len {
                prev[nx] = p;
            }
        }
    };

    let mut linearized = vec![false; n];
    let mut cache: HashSet<(Vec<u64>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut cursor = head;
    let mut steps = 0u64;
    let mut longest: Vec<usize> = Vec::new();
    let bits = |linearized: &[bool]| -> Vec<u64> {
        let mut b = vec![0u64; linearized.len().div_ceil(64)];
        for (i, l) in linearized.iter().enumerate() {
            if *l {
                b[i / 64] |= 1 << (i % 64);
            }
        }
        b
    };

    while head < len {
        steps += 1;
        if steps > max_steps {
            return Verdict::Unknown { steps };
        }
        if cursor < len && entries[cursor].is_call {
            let op = entries[cursor].op;
            let h = &history[op];
            let mut advanced = false;
            if let Some(next_state) = model.step(&state, &h.input, &h.output) {
                linearized[op] = true;
                let key = (bits(&linearized), next_state.clone());
                if cache.insert(key) {
                    stack.push((cursor, state.clone()));
                    state = next_state;
                    lift(cursor, &mut head, &mut next, &mut prev);
                    if stack.len() > longest.len() {
                        longest = stack.iter().map(|(c, _)| entries[*c].op).collect();
                    }
                    cursor = head;
                    advanced = true;
                } else {
                    linearized[op] = false;
                }
            }
            if !advanced {
                cursor = next[cursor];
            }
        } else {
            // A return reached: the operations called so far cannot all be ordered
            // here. Backtrack.
            let Some((pos, previous)) = stack.pop() else {
                return Verdict::NotLinearizable { longest };
            };
            state = previous;
            linearized[entries[pos].op] = false;
            unlift(pos, &mut head, &mut next, &mut prev);
            cursor = next[pos];
        }
    }
    Verdict::Linearizable
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A single register: write(v) -> (), read() -> v.
    struct Register;

    #[derive(Clone, Debug)]
    enum In {
        Write(u32),
        Read,
    }

    impl Model for Register {
        type State = u32;
        type Input = In;
        type Output = Option<u32>;
        fn init(&self) -> u32 {
            0
        }
        fn step(&self, state: &u32, input: &In, output: &Option<u32>) -> Option<u32> {
            match input {
                In::Write(v) => Some(*v),
                In::Read => (*output == Some(*state)).then_some(*state),
            }
        }
    }

    fn op(client: usize, call: u64, ret: u64, input: In, output: Option<u32>) -> Operation<In, Option<u32>> {
        Operation {
            client,
            call,
            ret,
            input,
            output,
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(0, 0, 1, In::Write(1), None),
            op(0, 2, 3, In::Read, Some(1)),
            op(0, 4, 5, In::Write(2), None),
            op(0, 6, 7, In::Read, Some(2)),
        ];
        assert_eq!(check(&Register, &h, 10_000), Verdict::Linearizable);
    }

    #[test]
    fn a_concurrent_read_may_see_either_value() {
        let h = vec![
            op(0, 0, 10, In::Write(1), None),
            op(1, 1, 2, In::Read, Some(0)),
            op(2, 3, 4, In::Read, Some(1)),
        ];
        assert_eq!(check(&Register, &h, 10_000), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_after_a_completed_write_is_rejected() {
        let h = vec![op(0, 0, 1, In::Write(1), None), op(1, 2, 3, In::Read, Some(0))];
        assert!(matches!(check(&Register, &h, 10_000), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn reads_going_back_in_time_are_rejected() {
        // Write 1 and write 2 overlap with two reads; once a read sees 2, a later
        // read cannot see 1 unless write 1 could be ordered after write 2 — here it
        // completed before write 2 started.
        let h = vec![
            op(0, 0, 1, In::Write(1), None),
            op(0, 2, 10, In::Write(2), None),
            op(1, 3, 4, In::Read, Some(2)),
            op(2, 5, 6, In::Read, Some(1)),
        ];
        assert!(matches!(check(&Register, &h, 10_000), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn a_value_never_written_is_rejected() {
        let h = vec![op(0, 0, 5, In::Write(1), None), op(1, 1, 2, In::Read, Some(7))];
        assert!(matches!(check(&Register, &h, 10_000), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn many_concurrent_writers_are_checked_quickly() {
        let mut h = Vec::new();
        for c in 0..8u32 {
            h.push(op(c as usize, 0, 100, In::Write(c + 1), None));
        }
        h.push(op(9, 101, 102, In::Read, Some(5)));
        h.push(op(9, 103, 104, In::Read, Some(5)));
        assert_eq!(check(&Register, &h, 1_000_000), Verdict::Linearizable);
    }
}
