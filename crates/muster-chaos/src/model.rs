//! The registry as a sequential model for the linearizability checker, partitioned
//! per instance key: each key is an independent register that is absent or holds a
//! value. A discovery (which reads every key of the service at once) is split into
//! one read per key, which is sound because every operation touches one key.
//!
//! Values are unique per write, so a read names the write it saw.
//!
//! Instances attached to a lease may vanish at any moment (the lease may expire); the
//! model allows a read to see such a key gone, but never back again. Whether a lease
//! expired *while its owner kept it alive* is checked separately (see
//! `check::leases`).
//!
//! A registered key may also be in maintenance: set and ended by its own command,
//! kept when the key is registered again, gone with the key. The workload puts only
//! keys without a lease in maintenance (a leased key's maintenance would survive a
//! registration or not depending on whether the lease expired in between, which a
//! read cannot tell).

use muster_testkit::linearizability::{Model, Operation};
use serde::{Deserialize, Serialize};

/// An operation on one key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyInput {
    /// Register (or overwrite) the key with `value`; `leased` when attached to a lease.
    Register {
        /// The unique value written.
        value: String,
        /// Attached to a lease (may vanish on expiry).
        leased: bool,
    },
    /// Deregister the key.
    Deregister,
    /// Revoke the lease the key is attached to.
    Revoke,
    /// Put the key in maintenance (`true`) or end it (`false`).
    SetMaintenance(bool),
    /// Read the key (one key of a linearizable discovery).
    Read,
}

/// A registered key as a read saw it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Held {
    /// The value of the registration.
    pub value: String,
    /// Whether it is in maintenance.
    pub maintenance: bool,
}

/// What the operation answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyOutput {
    /// Done.
    Ok,
    /// Deregister and maintenance: the key was not registered. Revoke: the lease
    /// was not found.
    NotFound,
    /// Revoke: how many instances it removed was > 0 (this key).
    Revoked {
        /// Whether this key was among the removed.
        removed: bool,
    },
    /// What was read, `None` when absent.
    Read(Option<Held>),
    /// No answer (timeout, connection lost after sending): it may or may not have
    /// taken effect. Such an operation is given an infinite return time.
    Unknown,
}

/// One key's state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Not registered.
    Absent,
    /// Registered with `value`.
    Present {
        /// The value.
        value: String,
        /// Attached to a lease.
        leased: bool,
        /// In maintenance.
        maintenance: bool,
    },
}

/// The per-key registry model.
#[derive(Clone, Copy, Debug, Default)]
pub struct RegistryModel;

impl Model for RegistryModel {
    type State = KeyState;
    type Input = KeyInput;
    type Output = KeyOutput;

    fn init(&self) -> KeyState {
        KeyState::Absent
    }

    fn step(&self, state: &KeyState, input: &KeyInput, output: &KeyOutput) -> Option<KeyState> {
        use KeyOutput as O;
        use KeyState::{Absent, Present};
        let leased_present = matches!(state, Present { leased: true, .. });
        match (input, output) {
            // Registering again keeps the key's maintenance.
            (KeyInput::Register { value, leased }, O::Ok | O::Unknown) => Some(Present {
                value: value.clone(),
                leased: *leased,
                maintenance: matches!(state, Present { maintenance: true, .. }),
            }),
            (KeyInput::Register { .. }, _) => None,

            (KeyInput::Deregister, O::Ok) => matches!(state, Present { .. }).then_some(Absent),
            // Absent, or a leased instance whose lease just expired.
            (KeyInput::Deregister, O::NotFound) => (*state == Absent || leased_present).then_some(Absent),
            (KeyInput::Deregister, O::Unknown) => Some(Absent),
            (KeyInput::Deregister, _) => None,

            (KeyInput::Revoke, O::Revoked { removed: true }) => matches!(state, Present { .. }).then_some(Absent),
            // The lease existed but this key was not on it (absent, or re-attached
            // to another lease by an earlier ambiguous registration), or the lease was
            // gone already (expired: the key vanished with it).
            (KeyInput::Revoke, O::Revoked { removed: false }) => Some(state.clone()),
            (KeyInput::Revoke, O::NotFound) => (*state == Absent || leased_present).then_some(Absent),
            (KeyInput::Revoke, O::Unknown) => Some(Absent),
            (KeyInput::Revoke, _) => None,

            (KeyInput::SetMaintenance(on), O::Ok | O::Unknown) => match state {
                Present { value, leased, .. } => Some(Present {
                    value: value.clone(),
                    leased: *leased,
                    maintenance: *on,
                }),
                // Not registered: an unanswered request changed nothing.
                Absent => (*output == O::Unknown).then_some(Absent),
            },
            (KeyInput::SetMaintenance(_), O::NotFound) => (*state == Absent || leased_present).then_some(Absent),
            (KeyInput::SetMaintenance(_), _) => None,

            (KeyInput::Read, O::Read(None)) => (*state == Absent || leased_present).then_some(Absent),
            (KeyInput::Read, O::Read(Some(held))) => match state {
                Present { value, maintenance, .. } if *value == held.value && *maintenance == held.maintenance => {
                    Some(state.clone())
                }
                _ => None,
            },
            (KeyInput::Read, _) => None,
        }
    }
}

/// A per-key operation ready for the checker.
pub type KeyOperation = Operation<KeyInput, KeyOutput>;

/// Return time given to operations whose outcome is unknown.
pub const NEVER: u64 = u64::MAX;

#[cfg(test)]
mod tests {
    use muster_testkit::linearizability::{check, Verdict};

    use super::*;

    fn op(client: usize, call: u64, ret: u64, input: KeyInput, output: KeyOutput) -> KeyOperation {
        Operation {
            client,
            call,
            ret,
            input,
            output,
        }
    }

    fn reg(v: &str) -> KeyInput {
        KeyInput::Register {
            value: v.into(),
            leased: false,
        }
    }

    fn leased(v: &str) -> KeyInput {
        KeyInput::Register {
            value: v.into(),
            leased: true,
        }
    }

    fn read(v: Option<&str>) -> KeyOutput {
        KeyOutput::Read(v.map(|value| Held {
            value: value.into(),
            maintenance: false,
        }))
    }

    fn read_in_maintenance(v: &str) -> KeyOutput {
        KeyOutput::Read(Some(Held {
            value: v.into(),
            maintenance: true,
        }))
    }

    fn ok(h: &[KeyOperation]) -> bool {
        check(&RegistryModel, h, 1_000_000) == Verdict::Linearizable
    }

    fn rejected(h: &[KeyOperation]) -> bool {
        matches!(check(&RegistryModel, h, 1_000_000), Verdict::NotLinearizable { .. })
    }

    #[test]
    fn register_then_read_sees_the_value() {
        assert!(ok(&[
            op(0, 0, 1, reg("a"), KeyOutput::Ok),
            op(1, 2, 3, KeyInput::Read, read(Some("a"))),
        ]));
    }

    #[test]
    fn a_read_after_an_acknowledged_register_that_misses_it_is_rejected() {
        assert!(rejected(&[
            op(0, 0, 1, reg("a"), KeyOutput::Ok),
            op(1, 2, 3, KeyInput::Read, read(None)),
        ]));
    }

    #[test]
    fn an_acknowledged_deregistration_reverted_is_rejected() {
        assert!(rejected(&[
            op(0, 0, 1, reg("a"), KeyOutput::Ok),
            op(0, 2, 3, KeyInput::Deregister, KeyOutput::Ok),
            op(1, 4, 5, KeyInput::Read, read(Some("a"))),
        ]));
    }

    #[test]
    fn deregistering_an_absent_key_answers_not_found() {
        assert!(ok(&[op(0, 0, 1, KeyInput::Deregister, KeyOutput::NotFound)]));
        assert!(rejected(&[op(0, 0, 1, KeyInput::Deregister, KeyOutput::Ok)]));
        assert!(rejected(&[
            op(0, 0, 1, reg("a"), KeyOutput::Ok),
            op(0, 2, 3, KeyInput::Deregister, KeyOutput::NotFound),
        ]));
    }

    #[test]
    fn an_ambiguous_register_may_have_happened_or_not() {
        // Seen by one read...
        assert!(ok(&[
            op(0, 0, NEVER, reg("a"), KeyOutput::Unknown),
            op(1, 5, 6, KeyInput::Read, read(Some("a"))),
        ]));
        // ...or never.
        assert!(ok(&[
            op(0, 0, NEVER, reg("a"), KeyOutput::Unknown),
            op(1, 5, 6, KeyInput::Read, read(None)),
            op(1, 7, 8, KeyInput::Read, read(None)),
        ]));
        // But not seen, then unseen: the write happened once.
        assert!(rejected(&[
            op(0, 0, NEVER, reg("a"), KeyOutput::Unknown),
            op(1, 5, 6, KeyInput::Read, read(Some("a"))),
            op(1, 7, 8, KeyInput::Read, read(None)),
        ]));
    }

    #[test]
    fn reads_must_not_go_back_to_an_older_value() {
        assert!(rejected(&[
            op(0, 0, 1, reg("a"), KeyOutput::Ok),
            op(0, 2, 10, reg("b"), KeyOutput::Ok),
            op(1, 3, 4, KeyInput::Read, read(Some("b"))),
            op(2, 5, 6, KeyInput::Read, read(Some("a"))),
        ]));
    }

    #[test]
    fn concurrent_writes_may_be_seen_in_either_order_but_consistently() {
        let w = [
            op(0, 0, 10, reg("a"), KeyOutput::Ok),
            op(1, 0, 10, reg("b"), KeyOutput::Ok),
        ];
        let mut h = w.to_vec();
        h.push(op(2, 11, 12, KeyInput::Read, read(Some("a"))));
        assert!(ok(&h));
        let mut h = w.to_vec();
        h.push(op(2, 11, 12, KeyInput::Read, read(Some("b"))));
        assert!(ok(&h));
        let mut h = w.to_vec();
        h.push(op(2, 11, 12, KeyInput::Read, read(Some("b"))));
        h.push(op(3, 13, 14, KeyInput::Read, read(Some("a"))));
        assert!(rejected(&h));
    }

    #[test]
    fn a_leased_instance_may_vanish_but_never_come_back() {
        assert!(ok(&[
            op(0, 0, 1, leased("a"), KeyOutput::Ok),
            op(1, 2, 3, KeyInput::Read, read(Some("a"))),
            op(1, 4, 5, KeyInput::Read, read(None)),
        ]));
        assert!(rejected(&[
            op(0, 0, 1, leased("a"), KeyOutput::Ok),
            op(1, 2, 3, KeyInput::Read, read(None)),
            op(1, 4, 5, KeyInput::Read, read(Some("a"))),
        ]));
    }

    #[test]
    fn a_plain_instance_never_vanishes_by_itself() {
        assert!(rejected(&[
            op(0, 0, 1, reg("a"), KeyOutput::Ok),
            op(1, 2, 3, KeyInput::Read, read(Some("a"))),
            op(1, 4, 5, KeyInput::Read, read(None)),
        ]));
    }

    #[test]
    fn an_acknowledged_revoke_removes_the_instance_for_good() {
        assert!(ok(&[
            op(0, 0, 1, leased("a"), KeyOutput::Ok),
            op(0, 2, 3, KeyInput::Revoke, KeyOutput::Revoked { removed: true }),
            op(1, 4, 5, KeyInput::Read, read(None)),
        ]));
        assert!(rejected(&[
            op(0, 0, 1, leased("a"), KeyOutput::Ok),
            op(0, 2, 3, KeyInput::Revoke, KeyOutput::Revoked { removed: true }),
            op(1, 4, 5, KeyInput::Read, read(Some("a"))),
        ]));
        // Revoking removed the instance, so it must have been there.
        assert!(rejected(&[op(
            0,
            2,
            3,
            KeyInput::Revoke,
            KeyOutput::Revoked { removed: true }
        )]));
    }

    #[test]
    fn a_value_nobody_wrote_is_rejected() {
        assert!(rejected(&[
            op(0, 0, 5, reg("a"), KeyOutput::Ok),
            op(1, 1, 2, KeyInput::Read, read(Some("z"))),
        ]));
    }

    #[test]
    fn maintenance_is_seen_until_it_ends_and_survives_registering_again() {
        assert!(ok(&[
            op(0, 0, 1, reg("a"), KeyOutput::Ok),
            op(0, 2, 3, KeyInput::SetMaintenance(true), KeyOutput::Ok),
            op(1, 4, 5, KeyInput::Read, read_in_maintenance("a")),
            op(0, 6, 7, reg("b"), KeyOutput::Ok),
            op(1, 8, 9, KeyInput::Read, read_in_maintenance("b")),
            op(0, 10, 11, KeyInput::SetMaintenance(false), KeyOutput::Ok),
            op(1, 12, 13, KeyInput::Read, read(Some("b"))),
        ]));
        // Reads after it was set must show it.
        assert!(rejected(&[
            op(0, 0, 1, reg("a"), KeyOutput::Ok),
            op(0, 2, 3, KeyInput::SetMaintenance(true), KeyOutput::Ok),
            op(1, 4, 5, KeyInput::Read, read(Some("a"))),
        ]));
        // Registering again does not end it.
        assert!(rejected(&[
            op(0, 0, 1, reg("a"), KeyOutput::Ok),
            op(0, 2, 3, KeyInput::SetMaintenance(true), KeyOutput::Ok),
            op(0, 4, 5, reg("b"), KeyOutput::Ok),
            op(1, 6, 7, KeyInput::Read, read(Some("b"))),
        ]));
    }

    #[test]
    fn maintenance_goes_with_the_key_and_needs_one() {
        // A new registration after a deregistration starts out of maintenance.
        assert!(rejected(&[
            op(0, 0, 1, reg("a"), KeyOutput::Ok),
            op(0, 2, 3, KeyInput::SetMaintenance(true), KeyOutput::Ok),
            op(0, 4, 5, KeyInput::Deregister, KeyOutput::Ok),
            op(0, 6, 7, reg("b"), KeyOutput::Ok),
            op(1, 8, 9, KeyInput::Read, read_in_maintenance("b")),
        ]));
        // Maintenance of an absent key answers not found, and never succeeds.
        assert!(ok(&[op(0, 0, 1, KeyInput::SetMaintenance(true), KeyOutput::NotFound)]));
        assert!(rejected(&[op(0, 0, 1, KeyInput::SetMaintenance(true), KeyOutput::Ok)]));
        assert!(rejected(&[
            op(0, 0, 1, reg("a"), KeyOutput::Ok),
            op(0, 2, 3, KeyInput::SetMaintenance(true), KeyOutput::NotFound),
        ]));
        // An unanswered one may take effect later, or never.
        assert!(ok(&[
            op(0, 0, 1, reg("a"), KeyOutput::Ok),
            op(0, 2, NEVER, KeyInput::SetMaintenance(true), KeyOutput::Unknown),
            op(1, 4, 5, KeyInput::Read, read(Some("a"))),
            op(1, 6, 7, KeyInput::Read, read_in_maintenance("a")),
        ]));
    }
}
