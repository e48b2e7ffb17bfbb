//! Choosing one instance among a service's: which instances may be used, and the
//! round-robin, weighted and random strategies. Pure; the resolver holds the state.

use std::collections::HashMap;
use std::sync::Arc;

use muster_core::{Health, Instance};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// How [`Resolver::pick`](crate::Resolver::pick) spreads calls over instances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PickStrategy {
    /// Each usable instance in turn.
    #[default]
    RoundRobin,
    /// In proportion to each instance's `weight` (smooth weighted round-robin: an
    /// instance of weight 3 gets three of every four calls next to one of weight 1,
    /// interleaved). A weight of 0 counts as 1.
    Weighted,
    /// Uniformly at random.
    Random,
}

impl std::str::FromStr for PickStrategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round_robin" | "round-robin" => Ok(PickStrategy::RoundRobin),
            "weighted" => Ok(PickStrategy::Weighted),
            "random" => Ok(PickStrategy::Random),
            other => Err(format!(
                "unknown strategy {other:?}; expected round_robin, weighted or random"
            )),
        }
    }
}

/// The instances a call may go to, or why there is none.
///
/// Critical instances and those `allowed` refuses (open breakers) are left out;
/// passing instances are preferred, warning ones used only when no passing one is
/// left; with `prefer_zone`, instances of that zone are used while any is usable.
pub(crate) fn usable<'a>(
    all: &'a [Arc<Instance>],
    prefer_zone: Option<&str>,
    allowed: impl Fn(&str) -> bool,
) -> Result<Vec<&'a Arc<Instance>>, String> {
    // One vector per pick, narrowed in place.
    let mut pool: Vec<&Arc<Instance>> = all
        .iter()
        .filter(|i| i.health != Health::Critical && allowed(&i.instance_id))
        .collect();
    if pool.is_empty() {
        return Err(if all.is_empty() {
            "no instance is registered".into()
        } else if all.iter().all(|i| i.health == Health::Critical) {
            format!("all {} instance(s) are critical", all.len())
        } else {
            "every healthy instance is skipped by an open circuit breaker".into()
        });
    }
    if pool.iter().any(|i| i.health == Health::Passing) {
        pool.retain(|i| i.health == Health::Passing);
    }
    if let Some(zone) = prefer_zone {
        if pool.iter().any(|i| i.zone == zone) {
            pool.retain(|i| i.zone == zone);
        }
    }
    Ok(pool)
}

/// The picking state of one resolver.
#[derive(Debug, Default)]
pub(crate) struct Picker {
    strategy: PickStrategy,
    cursor: usize,
    /// Smooth weighted round-robin's running weights, by instance id.
    current_weight: HashMap<String, i64>,
}

impl Picker {
    pub(crate) fn new(strategy: PickStrategy) -> Self {
        Picker {
            strategy,
            ..Picker::default()
        }
    }

    /// The index in `candidates` (not empty) of the next call's instance.
    pub(crate) fn pick(&mut self, candidates: &[&Arc<Instance>]) -> usize {
        debug_assert!(!candidates.is_empty());
        match self.strategy {
            PickStrategy::RoundRobin => {
                let index = self.cursor % candidates.len();
                self.cursor = self.cursor.wrapping_add(1);
                index
            }
            PickStrategy::Random => rand::thread_rng().gen_range(0..candidates.len()),
            PickStrategy::Weighted => {
                self.current_weight
                    .retain(|id, _| candidates.iter().any(|c| &c.instance_id == id));
                let mut total = 0i64;
                let mut best = 0usize;
                let mut best_weight = i64::MIN;
                for (index, candidate) in candidates.iter().enumerate() {
                    let weight = i64::from(candidate.weight.max(1));
                    total += weight;
                    let current = self.current_weight.entry(candidate.instance_id.clone()).or_insert(0);
                    *current += weight;
                    if *current > best_weight {
                        best_weight = *current;
                        best = index;
                    }
                }
                if let Some(current) = self.current_weight.get_mut(&candidates[best].instance_id) {
                    *current -= total;
                }
                best
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, health: Health, zone: &str, weight: u32) -> Arc<Instance> {
        Arc::new(Instance {
            health,
            zone: zone.into(),
            weight,
            ..crate::resolver::bare_instance("web", id, "127.0.0.1", 80)
        })
    }

    fn ids<'a>(list: &[&'a Arc<Instance>]) -> Vec<&'a str> {
        list.iter().map(|i| i.instance_id.as_str()).collect()
    }

    fn refs(list: &[Arc<Instance>]) -> Vec<&Arc<Instance>> {
        list.iter().collect()
    }

    #[test]
    fn critical_and_broken_instances_are_left_out_and_passing_preferred() {
        let all = vec![
            inst("a", Health::Passing, "z1", 1),
            inst("b", Health::Warning, "z1", 1),
            inst("c", Health::Critical, "z1", 1),
            inst("d", Health::Passing, "z2", 1),
        ];
        assert_eq!(ids(&usable(&all, None, |_| true).unwrap()), ["a", "d"]);
        assert_eq!(ids(&usable(&all, None, |id| id != "a" && id != "d").unwrap()), ["b"]);
        let err = usable(&all, None, |id| id == "c").unwrap_err();
        assert!(err.contains("circuit breaker"), "{err}");
        assert!(usable(&all[2..3], None, |_| true).unwrap_err().contains("critical"));
        assert!(usable(&[], None, |_| true).unwrap_err().contains("no instance"));
    }

    #[test]
    fn the_preferred_zone_is_used_while_it_has_a_usable_instance() {
        let all = vec![
            inst("a", Health::Passing, "z1", 1),
            inst("b", Health::Passing, "z2", 1),
            inst("c", Health::Passing, "z2", 1),
        ];
        assert_eq!(ids(&usable(&all, Some("z2"), |_| true).unwrap()), ["b", "c"]);
        assert_eq!(ids(&usable(&all, Some("z2"), |id| id == "a").unwrap()), ["a"]);
        assert_eq!(ids(&usable(&all, Some("z9"), |_| true).unwrap()), ["a", "b", "c"]);
    }

    #[test]
    fn round_robin_takes_each_in_turn() {
        let all = vec![
            inst("a", Health::Passing, "", 1),
            inst("b", Health::Passing, "", 1),
            inst("c", Health::Passing, "", 1),
        ];
        let mut p = Picker::new(PickStrategy::RoundRobin);
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&refs(&all))).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weighted_follows_the_weights_interleaved() {
        let all = vec![inst("a", Health::Passing, "", 3), inst("b", Health::Passing, "", 1)];
        let mut p = Picker::new(PickStrategy::Weighted);
        let picks: Vec<&str> = (0..8).map(|_| all[p.pick(&refs(&all))].instance_id.as_str()).collect();
        assert_eq!(picks, ["a", "a", "b", "a", "a", "a", "b", "a"]);
    }

    #[test]
    fn weighted_treats_zero_as_one_and_forgets_removed_instances() {
        let mut all = vec![inst("a", Health::Passing, "", 0), inst("b", Health::Passing, "", 0)];
        let mut p = Picker::new(PickStrategy::Weighted);
        let picks: Vec<usize> = (0..4).map(|_| p.pick(&refs(&all))).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        all.remove(0);
        assert_eq!(p.pick(&refs(&all)), 0);
        assert_eq!(p.current_weight.len(), 1);
    }

    #[test]
    fn random_stays_in_range() {
        let all = vec![inst("a", Health::Passing, "", 1), inst("b", Health::Passing, "", 1)];
        let mut p = Picker::new(PickStrategy::Random);
        let mut seen = [0u32; 2];
        for _ in 0..200 {
            seen[p.pick(&refs(&all))] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
    }

    #[test]
    fn strategies_parse_from_their_names() {
        assert_eq!("weighted".parse::<PickStrategy>().unwrap(), PickStrategy::Weighted);
        assert_eq!("round-robin".parse::<PickStrategy>().unwrap(), PickStrategy::RoundRobin);
        assert!("fastest".parse::<PickStrategy>().unwrap_err().contains("fastest"));
    }
}
