//! `qpipe status`: which selected instances are stale, and why.

use std::collections::HashMap;

use anyhow::Result;
use serde_json::{json, Value};

use crate::check::{Checker, Reason};
use crate::hashing::StatCache;
use crate::lock::Locks;
use crate::slurm::RemoteJob;
use crate::workspace::{Planned, Workspace, STAT_CACHE};

/// One instance's state.
pub struct InstanceStatus {
    pub index: usize,
    pub reasons: Vec<Reason>,
}

impl InstanceStatus {
    pub fn stale(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Check the selected instances in build order. An instance downstream of a stale one is
/// stale too (`upstream … is stale`), even when its own inputs look unchanged.
pub fn status(ws: &Workspace<'_>, planned: &Planned, sel: &[bool]) -> Result<Vec<InstanceStatus>> {
    let dag = &planned.dag;
    let locks = Locks::load(&ws.root)?;
    let mut cache = StatCache::load(ws.root.join(STAT_CACHE));
    let mut stale = vec![false; dag.instances.len()];
    let mut out = Vec::new();
    {
        let mut checker = Checker { ws, dag, cache: &mut cache };
        for &i in dag.order.iter().filter(|&&i| sel[i]) {
            let mut reasons = checker.evaluate(&locks, i)?.reasons;
            if let Some(p) = dag.producers(i).find(|&p| stale[p]) {
                reasons.push(Reason::Upstream(dag.instances[p].id.clone()));
            }
            stale[i] = !reasons.is_empty();
            out.push(InstanceStatus { index: i, reasons });
        }
    }
    // Best effort: a read-only checkout still answers.
    cache.save().ok();
    Ok(out)
}

/// Human-readable report (stale instances only) and a summary line. `remote`: instances a
/// build has queued or running on Slurm ([`crate::slurm::in_flight`]).
pub fn render_text(planned: &Planned, st: &[InstanceStatus], remote: &HashMap<String, RemoteJob>) -> String {
    let mut s = String::new();
    for x in st.iter().filter(|x| x.stale()) {
        let inst = &planned.dag.instances[x.index];
        let word = if x.reasons.contains(&Reason::NeverBuilt) { "missing" } else { "stale" };
        if let Some(r) = remote.get(&inst.id) {
            let on = if r.node.is_empty() { String::new() } else { format!(" on {}", r.node) };
            s.push_str(&format!("{:>8} {} (Slurm job {}, {}{on})\n", r.word(), inst.id, r.job, r.state));
            continue;
        }
        s.push_str(&format!("{word:>8} {}\n", inst.id));
        for r in &x.reasons {
            s.push_str(&format!("           {}\n", r.describe()));
        }
    }
    let n = st.iter().filter(|x| x.stale()).count();
    let flying = st.iter().filter(|x| x.stale() && remote.contains_key(&planned.dag.instances[x.index].id)).count();
    if flying > 0 {
        s.push_str(&format!("{flying} of them queued or running on Slurm\n"));
    }
    if n == 0 {
        s.push_str(&format!("up to date: {} instances\n", st.len()));
    } else {
        s.push_str(&format!("{n} of {} instances stale; `qpipe build` brings them up to date\n", st.len()));
    }
    s
}

pub fn render_json(planned: &Planned, st: &[InstanceStatus], remote: &HashMap<String, RemoteJob>) -> Value {
    let items: Vec<Value> = st
        .iter()
        .map(|x| {
            let inst = &planned.dag.instances[x.index];
            let r = remote.get(&inst.id).filter(|_| x.stale());
            let mut v = json!({
                "id": inst.id,
                "kind": inst.kind,
                "state": match r {
                    Some(r) => r.word(),
                    None if x.stale() => "stale",
                    None => "fresh",
                },
                "published": planned.published[x.index],
                "reasons": x.reasons.iter().map(Reason::to_json).collect::<Vec<_>>(),
            });
            if let Some(r) = r {
                v["slurm"] = json!({"job": r.job, "state": r.state, "node": r.node});
            }
            v
        })
        .collect();
    json!({
        "clean": st.iter().all(|x| !x.stale()),
        "stale": st.iter().filter(|x| x.stale()).count(),
        "total": st.len(),
        "instances": items,
    })
}
