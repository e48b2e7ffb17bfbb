//! How answers are shown: aligned tables for people, JSON for programs.

use std::fmt::Write as _;

use muster_client::{Member, NodeStatus, ResponseHeader, WatchItem};
use muster_core::{EventKind, Instance, ServiceSummary};
use serde_json::{json, Value};

/// A table with a header row; columns are as wide as their widest cell.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (missing cells are blank).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, two spaces between columns, no
    /// trailing blanks.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// JSON for an instance, with lowercase health.
pub fn instance_json(i: &Instance) -> Value {
    json!({
        "namespace": i.namespace,
        "service": i.service,
        "instance_id": i.instance_id,
        "address": i.address,
        "port": i.port,
        "ports": i.ports,
        "tags": i.tags,
        "metadata": i.metadata,
        "weight": i.weight,
        "zone": i.zone,
        "health": i.health.as_str(),
        "lease_id": i.lease_id,
        "create_revision": i.create_revision,
        "mod_revision": i.mod_revision,
        "registered_at_ms": i.registered_at_ms,
        "updated_at_ms": i.updated_at_ms,
        "maintenance": i.maintenance().map(|m| json!({
            "reason": m.notes,
            "since_ms": m.status_since_ms,
            "health_after": i.health_without_maintenance().as_str(),
        })),
    })
}

/// JSON for a response header.
pub fn header_json(h: &ResponseHeader) -> Value {
    serde_json::to_value(h).unwrap_or(Value::Null)
}

/// A table of instances.
pub fn instances_table(instances: &[Instance]) -> String {
    let mut t = Table::new(&[
        "ID", "ADDRESS", "PORT", "HEALTH", "ZONE", "WEIGHT", "LEASE", "REVISION", "TAGS", "META",
    ]);
    for i in instances {
        t.row(vec![
            i.instance_id.clone(),
            i.address.clone(),
            i.port.to_string(),
            if i.maintenance().is_some() {
                format!("{} (maintenance)", i.health)
            } else {
                i.health.to_string()
            },
            or_dash(&i.zone),
            i.weight.to_string(),
            i.lease_id.map_or("-".into(), |l| l.to_string()),
            i.mod_revision.to_string(),
            or_dash(&i.tags.join(",")),
            or_dash(
                &i.metadata
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ]);
    }
    t.render()
}

/// One line saying where a read came from.
pub fn header_line(h: &ResponseHeader) -> String {
    let leader = match h.leader_id {
        Some(l) => format!("leader {l}, last contact {} ms ago", h.ms_since_leader_contact),
        None => "no leader known".to_string(),
    };
    format!("revision {} from node {} ({leader})", h.revision, h.node_id)
}

/// A table of services.
pub fn services_table(services: &[ServiceSummary]) -> String {
    let mut t = Table::new(&[
        "NAMESPACE",
        "SERVICE",
        "INSTANCES",
        "PASSING",
        "WARNING",
        "CRITICAL",
        "REVISION",
    ]);
    for s in services {
        t.row(vec![
            s.namespace.clone(),
            s.service.clone(),
            s.instances.to_string(),
            s.passing.to_string(),
            s.warning.to_string(),
            s.critical.to_string(),
            s.mod_revision.to_string(),
        ]);
    }
    t.render()
}

/// JSON for a service summary.
pub fn service_json(s: &ServiceSummary) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

/// A table of node statuses (or errors) keyed by the address asked.
pub fn status_table(rows: &[(String, Result<NodeStatus, String>)]) -> String {
    let mut t = Table::new(&[
        "ADDRESS",
        "NODE",
        "ROLE",
        "TERM",
        "LEADER",
        "LOG",
        "APPLIED",
        "REVISION",
        "INSTANCES",
        "LEASES",
        "DIGEST",
        "CLUSTER",
        "LEVEL",
    ]);
    for (addr, status) in rows {
        match status {
            Ok(s) => t.row(vec![
                addr.clone(),
                s.node_id.to_string(),
                s.role.clone(),
                s.term.to_string(),
                s.leader_id.map_or("-".into(), |l| l.to_string()),
                s.last_log_index.to_string(),
                s.applied_index.to_string(),
                s.revision.to_string(),
                s.instances.to_string(),
                s.leases.to_string(),
                s.digest.chars().take(12).collect(),
                s.cluster_id.clone().unwrap_or_else(|| "-".into()),
                s.command_level.to_string(),
            ]),
            Err(e) => t.row(vec![addr.clone(), "-".into(), format!("unreachable: {e}")]),
        }
    }
    t.render()
}

/// A table of members.
pub fn members_table(members: &[Member]) -> String {
    let mut t = Table::new(&["NODE", "PEER ADDRESS", "ROLE", "LEADER", "MATCHED"]);
    for m in members {
        t.row(vec![
            m.node_id.to_string(),
            m.peer_addr.clone(),
            if m.voter { "voter" } else { "learner" }.into(),
            if m.leader { "*" } else { "" }.into(),
            // Known on the leader only.
            if m.matched_index == 0 {
                "-".into()
            } else {
                m.matched_index.to_string()
            },
        ]);
    }
    t.render()
}

/// One line of `muster watch` output, or `None` for a progress notification that
/// is not shown.
pub fn watch_line(item: &WatchItem, show_progress: bool) -> Option<String> {
    match item {
        WatchItem::Event(e) => Some(match &e.kind {
            EventKind::Put(i) => format!(
                "{:>8}  put     {}/{}/{}  {}:{}  {}",
                e.revision, i.namespace, i.service, i.instance_id, i.address, i.port, i.health
            ),
            EventKind::Delete { key, reason } => {
                format!("{:>8}  delete  {key}  {}", e.revision, reason.as_str())
            }
        }),
        WatchItem::Reset { revision, instances } => Some(format!(
            "{revision:>8}  reset   {} instance{}",
            instances.len(),
            if instances.len() == 1 { "" } else { "s" }
        )),
        WatchItem::Progress(revision) => show_progress.then(|| format!("{revision:>8}  progress")),
    }
}

/// One JSON object per watch item.
pub fn watch_json(item: &WatchItem) -> Value {
    match item {
        WatchItem::Event(e) => match &e.kind {
            EventKind::Put(i) => json!({"type": "put", "revision": e.revision, "instance": instance_json(i)}),
            EventKind::Delete { key, reason } => json!({
                "type": "delete",
                "revision": e.revision,
                "key": {"namespace": key.namespace, "service": key.service, "instance_id": key.instance_id},
                "reason": reason.as_str(),
            }),
        },
        WatchItem::Reset { revision, instances } => json!({
            "type": "reset",
            "revision": revision,
            "instances": instances.iter().map(instance_json).collect::<Vec<_>>(),
        }),
        WatchItem::Progress(revision) => json!({"type": "progress", "revision": revision}),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use muster_core::{DeleteReason, Event, InstanceKey};

    use super::*;

    fn instance() -> Instance {
        muster_proto::convert::instance_from_pb(&muster_proto::v1::Instance {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: "o-1".into(),
            address: "10.0.0.1".into(),
            port: 8080,
            tags: vec!["v1".into()],
            metadata: [("version".to_string(), "1.2".to_string())].into(),
            weight: 100,
            health: muster_proto::v1::Health::Passing as i32,
            create_revision: 3,
            mod_revision: 4,
            ..Default::default()
        })
    }

    #[test]
    fn table_columns_line_up() {
        let mut t = Table::new(&["ID", "ADDRESS"]);
        t.row(vec!["a-long-id".into(), "h".into()]);
        t.row(vec!["b".into(), "host".into()]);
        assert_eq!(t.render(), "ID         ADDRESS\na-long-id  h\nb          host\n");
    }

    #[test]
    fn an_instance_row_shows_dashes_for_blanks() {
        let out = instances_table(&[instance()]);
        let row = out.lines().nth(1).unwrap();
        assert!(row.starts_with("o-1  "), "{row}");
        assert!(row.contains("passing") && row.contains("v1") && row.contains("version=1.2"));
        assert!(row.contains(" - "), "zone and lease show a dash: {row}");
    }

    #[test]
    fn watch_lines_name_the_change() {
        let put = WatchItem::Event(Event {
            revision: 5,
            kind: EventKind::Put(Arc::new(instance())),
        });
        assert!(watch_line(&put, false)
            .unwrap()
            .contains("put     default/orders/o-1  10.0.0.1:8080"));
        let del = WatchItem::Event(Event {
            revision: 6,
            kind: EventKind::Delete {
                key: InstanceKey::new("", "orders", "o-1"),
                reason: DeleteReason::LeaseExpired,
            },
        });
        assert!(watch_line(&del, false)
            .unwrap()
            .ends_with("default/orders/o-1  lease_expired"));
        let reset = WatchItem::Reset {
            revision: 7,
            instances: vec![instance(), instance()],
        };
        assert!(watch_line(&reset, false).unwrap().ends_with("reset   2 instances"));
        assert_eq!(watch_line(&WatchItem::Progress(8), false), None);
        assert!(watch_line(&WatchItem::Progress(8), true).is_some());
    }

    #[test]
    fn instance_json_uses_lowercase_health() {
        assert_eq!(instance_json(&instance())["health"], "passing");
        assert_eq!(watch_json(&WatchItem::Progress(3))["type"], "progress");
    }
}
