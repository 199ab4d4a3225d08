//! Is an instance up to date, and if not, why?
//!
//! Up to date ⇔ the lock's key equals the computed key and every non-intermediate output
//! exists with its recorded hash. A dependency another instance produces is hashed from
//! the file when it exists, else taken from the producer's lock entry (so deleting an
//! intermediate does not make its consumers stale).

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::{json, Value};

use crate::dag::Dag;
use crate::hashing::{canonical_json, instance_key, StatCache};
use crate::lock::{LockEntry, Locks};
use crate::workspace::Workspace;

/// Why an instance must run.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    NeverBuilt,
    Forced,
    CodeVersion { old: String, new: String },
    Params(Vec<String>),
    DepChanged(String),
    DepMissing(String),
    DepsChanged { added: Vec<String>, removed: Vec<String> },
    OutMissing(String),
    OutModified(String),
    Upstream(String),
    KeyChanged,
}

impl Reason {
    pub fn describe(&self) -> String {
        match self {
            Reason::NeverBuilt => "never built".into(),
            Reason::Forced => "forced (--force)".into(),
            Reason::CodeVersion { old, new } => format!("stage code changed (version {old} → {new})"),
            Reason::Params(changes) => format!("parameters changed: {}", changes.join(", ")),
            Reason::DepChanged(p) => format!("input `{p}` changed"),
            Reason::DepMissing(p) => format!("input `{p}` is missing"),
            Reason::DepsChanged { added, removed } => {
                let mut parts = Vec::new();
                if !added.is_empty() {
                    parts.push(format!(
                        "now reads {}",
                        added.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")
                    ));
                }
                if !removed.is_empty() {
                    parts.push(format!(
                        "no longer reads {}",
                        removed.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ")
                    ));
                }
                if parts.is_empty() {
                    "inputs were reordered".into()
                } else {
                    parts.join("; ")
                }
            }
            Reason::OutMissing(p) => format!("output `{p}` is missing"),
            Reason::OutModified(p) => format!("output `{p}` was modified since it was built"),
            Reason::Upstream(id) => format!("upstream `{id}` is stale"),
            Reason::KeyChanged => "its key changed".into(),
        }
    }

    pub fn to_json(&self) -> Value {
        let (kind, detail) = match self {
            Reason::NeverBuilt => ("never-built", json!(null)),
            Reason::Forced => ("forced", json!(null)),
            Reason::CodeVersion { old, new } => ("code-version", json!({"old": old, "new": new})),
            Reason::Params(c) => ("params", json!(c)),
            Reason::DepChanged(p) => ("dep-changed", json!(p)),
            Reason::DepMissing(p) => ("dep-missing", json!(p)),
            Reason::DepsChanged { added, removed } => ("deps-changed", json!({"added": added, "removed": removed})),
            Reason::OutMissing(p) => ("out-missing", json!(p)),
            Reason::OutModified(p) => ("out-modified", json!(p)),
            Reason::Upstream(id) => ("upstream", json!(id)),
            Reason::KeyChanged => ("key-changed", json!(null)),
        };
        json!({"kind": kind, "detail": detail, "message": self.describe()})
    }
}

/// The outcome of checking one instance.
#[derive(Debug, Clone)]
pub struct Eval {
    /// `None` when a dependency is missing and nothing records its hash.
    pub key: Option<String>,
    /// Content hash per declared dependency.
    pub deps: Vec<Option<String>>,
    /// Empty ⇔ up to date.
    pub reasons: Vec<Reason>,
}

impl Eval {
    pub fn fresh(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// Checks instances against the locks, hashing through the stat cache.
pub struct Checker<'a> {
    pub ws: &'a Workspace<'a>,
    pub dag: &'a Dag,
    pub cache: &'a mut StatCache,
}

impl Checker<'_> {
    /// The hash of instance `i`'s dependency `d`.
    pub fn dep_hash(&mut self, locks: &Locks, i: usize, d: usize) -> Result<Option<String>> {
        let path = &self.dag.dep_paths[i][d];
        let dag = self.dag;
        let skip = |p: &std::path::Path| {
            p.strip_prefix(&dag.root).is_ok_and(|rel| dag.intermediates.contains(rel.to_string_lossy().as_ref()))
        };
        if let Some(h) = self.cache.hash_skipping(&self.ws.abs(path), &skip)? {
            return Ok(Some(h));
        }
        Ok(self
            .dag
            .producer_of(path)
            .and_then(|(p, _)| locks.get(&self.dag.instances[p].id))
            .and_then(|e| e.out(path))
            .map(|o| o.hash.clone()))
    }

    pub fn evaluate(&mut self, locks: &Locks, i: usize) -> Result<Eval> {
        let inst = &self.dag.instances[i];
        let stage = self.ws.stage(&inst.kind)?;
        let mut deps = Vec::with_capacity(inst.deps.len());
        for d in 0..inst.deps.len() {
            deps.push(self.dep_hash(locks, i, d)?);
        }
        let key = if deps.iter().all(Option::is_some) {
            let hashes: Vec<String> = deps.iter().flatten().cloned().collect();
            Some(instance_key(&inst.kind, stage.code_version(), &inst.params, &hashes))
        } else {
            None
        };
        let mut reasons = Vec::new();
        let missing = || {
            deps.iter()
                .zip(&self.dag.dep_paths[i])
                // A missing input that another instance makes is reported as that
                // instance being stale.
                .filter(|(h, p)| h.is_none() && self.dag.producer_of(p).is_none())
                .map(|(_, p)| Reason::DepMissing(p.clone()))
                .collect::<Vec<_>>()
        };
        match locks.get(&inst.id) {
            None => {
                reasons.push(Reason::NeverBuilt);
                reasons.extend(missing());
            }
            Some(e) if key.as_deref() == Some(e.key.as_str()) => {
                for (o, spec) in self.dag.out_paths[i].iter().zip(&inst.outs) {
                    let recorded = e.out(o).map(|r| r.hash.as_str());
                    match self.cache.hash(&self.ws.abs(o))? {
                        // `qpipe clean` deletes intermediates: one that is missing is remade
                        // only when a consumer must run. One that is there must be what the
                        // lock says (a build killed after moving it into place and before
                        // recording it leaves other bytes under the recorded name).
                        None if spec.intermediate => {}
                        None => reasons.push(Reason::OutMissing(o.clone())),
                        Some(h) if Some(h.as_str()) != recorded => reasons.push(Reason::OutModified(o.clone())),
                        Some(_) => {}
                    }
                }
            }
            Some(e) => {
                if e.code_version != stage.code_version() {
                    reasons.push(Reason::CodeVersion {
                        old: e.code_version.clone(),
                        new: stage.code_version().to_string(),
                    });
                }
                let changes = diff_params(&e.params, &inst.params);
                if !changes.is_empty() {
                    reasons.push(Reason::Params(changes));
                }
                reasons.extend(self.dep_reasons(e, i, &deps));
                if reasons.is_empty() {
                    reasons.push(Reason::KeyChanged);
                }
            }
        }
        Ok(Eval { key, deps, reasons })
    }

    fn dep_reasons(&self, e: &LockEntry, i: usize, deps: &[Option<String>]) -> Vec<Reason> {
        let now = &self.dag.dep_paths[i];
        let old: Vec<&str> = e.deps.iter().map(|d| d.path.as_str()).collect();
        if old != now.iter().map(String::as_str).collect::<Vec<_>>() {
            let added = now.iter().filter(|p| !old.contains(&p.as_str())).cloned().collect();
            let removed = old.iter().filter(|p| !now.iter().any(|n| n == *p)).map(|p| p.to_string()).collect();
            return vec![Reason::DepsChanged { added, removed }];
        }
        let mut out = Vec::new();
        for ((path, h), rec) in now.iter().zip(deps).zip(&e.deps) {
            match h {
                None if self.dag.producer_of(path).is_some() => {}
                None => out.push(Reason::DepMissing(path.clone())),
                Some(h) if *h != rec.hash => out.push(Reason::DepChanged(path.clone())),
                Some(_) => {}
            }
        }
        out
    }
}

/// Leaf-level differences between two parameter trees: `` `a.b`: 8 → 4 ``.
pub fn diff_params(old: &Value, new: &Value) -> Vec<String> {
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten(old, "", &mut a);
    flatten(new, "", &mut b);
    let mut out = Vec::new();
    for (k, v) in &b {
        match a.get(k) {
            None => out.push(format!("`{k}` added ({v})")),
            Some(o) if o != v => out.push(format!("`{k}`: {o} → {v}")),
            Some(_) => {}
        }
    }
    for (k, v) in &a {
        if !b.contains_key(k) {
            out.push(format!("`{k}` removed (was {v})"));
        }
    }
    out
}

fn flatten(v: &Value, prefix: &str, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                flatten(c, &if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, out);
            }
        }
        other => {
            out.insert(if prefix.is_empty() { "(params)".into() } else { prefix.to_string() }, canonical_json(other));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_diffs_name_the_key() {
        let d = diff_params(&json!({"a": 8, "f": {"g": "x"}, "z": 1}), &json!({"a": 4, "f": {"g": "x", "h": [1]}}));
        assert_eq!(d, ["`a`: 8 → 4", "`f.h` added ([1])", "`z` removed (was 1)"]);
    }
}
