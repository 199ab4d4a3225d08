//! Stage instances → the DAG (petgraph). An edge runs from the instance that writes a path
//! to every instance that reads it (or reads a directory holding it).

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Result};
use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use qpipe_contract::Instance;
use serde_json::json;

use crate::suggest::{did_you_mean, list};

/// A path as the engine compares it: relative to the root with `/` separators, or
/// absolute (lexically normalized) when it lies outside the root.
pub fn norm_path(root: &Path, p: &Path) -> Result<String> {
    let p = if p.is_absolute() {
        match p.strip_prefix(root) {
            Ok(rel) => rel.to_path_buf(),
            Err(_) => return Ok(lexical(p).to_string_lossy().into_owned()),
        }
    } else {
        p.to_path_buf()
    };
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    bail!("path `{}` escapes the repository root `{}`", p.display(), root.display());
                }
            }
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Ok(parts.join("/"))
}

fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Is `path` equal to `dir` or inside it (both normalized)?
pub fn is_under(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || (path.starts_with(dir) && path.as_bytes().get(dir.len()) == Some(&b'/'))
}

/// The DAG of a plan.
pub struct Dag {
    pub root: PathBuf,
    pub instances: Vec<Instance>,
    /// Node `i` is instance `i`.
    pub graph: DiGraph<(), ()>,
    /// Normalized out path → (instance, out index).
    pub outs: BTreeMap<String, (usize, usize)>,
    /// Normalized dep paths per instance.
    pub dep_paths: Vec<Vec<String>>,
    /// Normalized out paths per instance.
    pub out_paths: Vec<Vec<String>>,
    /// Topological order.
    pub order: Vec<usize>,
    /// Normalized paths of every declared intermediate output.
    pub intermediates: std::collections::HashSet<String>,
    by_id: HashMap<String, usize>,
}

impl Dag {
    pub fn new(root: &Path, instances: Vec<Instance>) -> Result<Dag> {
        let mut graph = DiGraph::<(), ()>::with_capacity(instances.len(), instances.len() * 2);
        let mut by_id = HashMap::new();
        for (i, inst) in instances.iter().enumerate() {
            graph.add_node(());
            if by_id.insert(inst.id.clone(), i).is_some() {
                bail!("two stage instances have the same id `{}`", inst.id);
            }
        }
        let mut outs: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        let mut out_paths = Vec::with_capacity(instances.len());
        for (i, inst) in instances.iter().enumerate() {
            let mut mine = Vec::new();
            for (j, o) in inst.outs.iter().enumerate() {
                if o.path.is_relative() && o.path.components().any(|c| matches!(c, Component::ParentDir)) {
                    let n = norm_path(root, &o.path);
                    if n.is_err() || o.path.starts_with("..") {
                        bail!(
                            "stage `{}` would write `{}`, which escapes the repository root `{}`; \
                             outputs must stay inside the repository (or use an absolute path)",
                            inst.id,
                            o.path.display(),
                            root.display()
                        );
                    }
                }
                let n = norm_path(root, &o.path)?;
                if n.is_empty() {
                    bail!("stage `{}` declares the repository root itself as an output", inst.id);
                }
                if let Some((other, _)) = outs.insert(n.clone(), (i, j)) {
                    bail!(
                        "stages `{}` and `{}` both write `{n}`; give their runs different output folders",
                        instances[other].id,
                        inst.id
                    );
                }
                mine.push(n);
            }
            out_paths.push(mine);
        }
        let mut dep_paths = Vec::with_capacity(instances.len());
        for (i, inst) in instances.iter().enumerate() {
            let mut mine = Vec::new();
            for d in inst.deps.iter().map(|d| &d.path) {
                let n = if d.is_relative() && d.starts_with("..") {
                    d.to_string_lossy().into_owned()
                } else {
                    norm_path(root, d).unwrap_or_else(|_| d.to_string_lossy().into_owned())
                };
                let mut producers: Vec<usize> = Vec::new();
                if let Some(&(p, _)) = outs.get(&n) {
                    producers.push(p);
                }
                let prefix = format!("{n}/");
                for (_, &(p, _)) in outs.range(prefix.clone()..).take_while(|(k, _)| k.starts_with(&prefix)) {
                    producers.push(p);
                }
                producers.sort_unstable();
                producers.dedup();
                for p in producers {
                    graph.update_edge(NodeIndex::new(p), NodeIndex::new(i), ());
                }
                mine.push(n);
            }
            dep_paths.push(mine);
        }
        let order = match toposort(&graph, None) {
            Ok(o) => o.into_iter().map(|n| n.index()).collect(),
            Err(cycle) => bail!("dependency cycle: {}", describe_cycle(&graph, &instances, cycle.node_id())),
        };
        let intermediates =
            outs.iter().filter(|(_, &(i, j))| instances[i].outs[j].intermediate).map(|(p, _)| p.clone()).collect();
        Ok(Dag { root: root.to_path_buf(), instances, graph, outs, dep_paths, out_paths, order, intermediates, by_id })
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// Instances whose outputs this one reads.
    pub fn producers(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        self.graph.edges_directed(NodeIndex::new(i), Direction::Incoming).map(|e| e.source().index())
    }

    /// Instances that read this one's outputs.
    pub fn consumers(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        self.graph.edges_directed(NodeIndex::new(i), Direction::Outgoing).map(|e| e.target().index())
    }

    /// The producer of exactly this (normalized) path, with the out's index.
    pub fn producer_of(&self, path: &str) -> Option<(usize, usize)> {
        self.outs.get(path).copied()
    }

    /// Resolve targets (stage ids, stage kinds, or paths relative to `cwd`) to the selected
    /// instances plus everything upstream of them. No targets selects everything.
    pub fn select(&self, targets: &[String], cwd: &Path) -> Result<Vec<bool>> {
        let mut sel = vec![targets.is_empty(); self.instances.len()];
        if targets.is_empty() {
            return Ok(sel);
        }
        let mut stack = Vec::new();
        for t in targets {
            let mut hits: Vec<usize> = self.index_of(t).into_iter().collect();
            if hits.is_empty() {
                hits = (0..self.instances.len()).filter(|&i| self.instances[i].kind == *t).collect();
            }
            if hits.is_empty() {
                let abs = cwd.join(t);
                if let Ok(p) = norm_path(&self.root, &abs) {
                    hits = (0..self.instances.len())
                        .filter(|&i| self.out_paths[i].iter().any(|o| is_under(o, &p)))
                        .collect();
                }
            }
            if hits.is_empty() {
                let mut kinds: Vec<&str> = self.instances.iter().map(|i| i.kind.as_str()).collect();
                kinds.sort_unstable();
                kinds.dedup();
                let names: Vec<&str> =
                    kinds.iter().copied().chain(self.instances.iter().map(|i| i.id.as_str())).collect();
                bail!(
                    "no stage matches target `{t}`: it is not a stage id, a stage kind ({}), or a path that a stage \
                     writes under{}; `qpipe dag` lists them",
                    list(&kinds, 12),
                    did_you_mean(t, &names)
                );
            }
            stack.extend(hits);
        }
        while let Some(i) = stack.pop() {
            if !sel[i] {
                sel[i] = true;
                stack.extend(self.producers(i));
            }
        }
        Ok(sel)
    }

    /// Readable text: one block per instance in build order.
    pub fn to_text(&self, sel: &[bool]) -> String {
        let mut s = String::new();
        for &i in self.order.iter().filter(|&&i| sel[i]) {
            let inst = &self.instances[i];
            s.push_str(&format!("{}  ({})\n", inst.id, inst.description));
            for p in self.producers(i) {
                s.push_str(&format!("  after  {}\n", self.instances[p].id));
            }
            for (o, spec) in self.out_paths[i].iter().zip(&inst.outs) {
                s.push_str(&format!("  writes {o}{}\n", if spec.intermediate { "  (intermediate)" } else { "" }));
            }
        }
        s
    }

    pub fn to_dot(&self, sel: &[bool]) -> String {
        let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
        let mut s = String::from("digraph qpipe {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n");
        for &i in self.order.iter().filter(|&&i| sel[i]) {
            let inst = &self.instances[i];
            s.push_str(&format!("  {} [label={}];\n", q(&inst.id), q(&format!("{}\n{}", inst.kind, inst.description))));
        }
        for e in self.graph.edge_references() {
            let (a, b) = (e.source().index(), e.target().index());
            if sel[a] && sel[b] {
                s.push_str(&format!("  {} -> {};\n", q(&self.instances[a].id), q(&self.instances[b].id)));
            }
        }
        s.push_str("}\n");
        s
    }

    pub fn to_mermaid(&self, sel: &[bool]) -> String {
        let mut s = String::from("flowchart LR\n");
        let label = |t: &str| t.replace('"', "#quot;");
        for &i in self.order.iter().filter(|&&i| sel[i]) {
            s.push_str(&format!("  n{i}[\"{}\"]\n", label(&self.instances[i].id)));
        }
        for e in self.graph.edge_references() {
            let (a, b) = (e.source().index(), e.target().index());
            if sel[a] && sel[b] {
                s.push_str(&format!("  n{a} --> n{b}\n"));
            }
        }
        s
    }

    pub fn to_json(&self, sel: &[bool]) -> serde_json::Value {
        let nodes: Vec<_> = self
            .order
            .iter()
            .filter(|&&i| sel[i])
            .map(|&i| {
                let inst = &self.instances[i];
                json!({
                    "id": inst.id,
                    "kind": inst.kind,
                    "description": inst.description,
                    "params": inst.params,
                    "deps": self.dep_paths[i],
                    "outs": inst.outs.iter().zip(&self.out_paths[i])
                        .map(|(o, p)| json!({"path": p, "intermediate": o.intermediate})).collect::<Vec<_>>(),
                    "after": self.producers(i).map(|p| self.instances[p].id.clone()).collect::<Vec<_>>(),
                })
            })
            .collect();
        let edges: Vec<_> = self
            .graph
            .edge_references()
            .filter(|e| sel[e.source().index()] && sel[e.target().index()])
            .map(
                |e| json!({"from": self.instances[e.source().index()].id, "to": self.instances[e.target().index()].id}),
            )
            .collect();
        json!({"nodes": nodes, "edges": edges})
    }
}

fn describe_cycle(graph: &DiGraph<(), ()>, instances: &[Instance], start: NodeIndex) -> String {
    let scc = tarjan_scc(graph).into_iter().find(|c| c.contains(&start)).unwrap_or_else(|| vec![start]);
    // Walk from `start` along edges that stay inside the component until we come back.
    let mut path = vec![start];
    let mut cur = start;
    for _ in 0..scc.len() {
        let next = graph.neighbors(cur).find(|n| scc.contains(n) && (*n == start || !path.contains(n)));
        match next {
            Some(n) if n == start => {
                path.push(n);
                break;
            }
            Some(n) => {
                path.push(n);
                cur = n;
            }
            None => break,
        }
    }
    if path.last() != Some(&start) {
        path.push(start);
    }
    // Start the cycle at its smallest id, so the message does not depend on graph order.
    path.pop();
    if let Some(k) = (0..path.len()).min_by_key(|&k| &instances[path[k].index()].id) {
        path.rotate_left(k);
    }
    if let Some(&first) = path.first() {
        path.push(first);
    }
    path.iter().map(|n| format!("`{}`", instances[n.index()].id)).collect::<Vec<_>>().join(" → ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use qpipe_contract::{DepSpec, OutSpec};
    use serde_json::json;

    fn inst(id: &str, deps: &[&str], outs: &[&str]) -> Instance {
        Instance {
            id: id.into(),
            kind: id.split('@').next().unwrap().into(),
            params: json!({}),
            locators: json!({}),
            deps: deps.iter().map(|d| DepSpec::new("in", *d)).collect(),
            outs: outs.iter().enumerate().map(|(j, o)| OutSpec::tracked(format!("out{j}"), *o)).collect(),
            description: id.into(),
        }
    }

    #[test]
    fn edges_follow_paths_and_directories() {
        let dag = Dag::new(
            Path::new("/r"),
            vec![
                inst("render@x", &["out/x/m.json"], &["out/x/r.md"]),
                inst("agg@x", &["./out/x/s.json"], &["out/x/m.json"]),
                inst("score@x", &["data"], &["out/x/s.json"]),
                inst("docs@x", &["out/x"], &["out/README.md"]),
            ],
        )
        .unwrap();
        assert_eq!(dag.order.iter().position(|&i| i == 2), Some(0));
        let mut p: Vec<_> = dag.producers(3).collect();
        p.sort();
        assert_eq!(p, [0, 1, 2]);
        let sel = dag.select(&["out/x/r.md".into()], Path::new("/r")).unwrap();
        assert_eq!(sel, [true, true, true, false]);
        let sel = dag.select(&["agg".into()], Path::new("/r")).unwrap();
        assert_eq!(sel, [false, true, true, false]);
        let sel = dag.select(&["/r/out".into()], Path::new("/elsewhere")).unwrap();
        assert!(sel.iter().all(|s| *s));
        let e = dag.select(&["rendr".into()], Path::new("/r")).unwrap_err().to_string();
        assert!(e.contains("did you mean `render`"), "{e}");
    }

    #[test]
    fn cycles_are_named() {
        let e =
            Dag::new(Path::new("/r"), vec![inst("a@1", &["b.txt"], &["a.txt"]), inst("b@1", &["a.txt"], &["b.txt"])])
                .err()
                .unwrap()
                .to_string();
        assert!(e.contains("dependency cycle") && e.contains("`a@1`") && e.contains("`b@1`"), "{e}");
    }

    #[test]
    fn escaping_and_duplicate_outputs_are_errors() {
        let e = Dag::new(Path::new("/r"), vec![inst("a@1", &[], &["models/../../x.txt"])]).err().unwrap().to_string();
        assert!(e.contains("escapes the repository root"), "{e}");
        let e = Dag::new(Path::new("/r"), vec![inst("a@1", &[], &["x.txt"]), inst("b@1", &[], &["./x.txt"])])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("both write `x.txt`"), "{e}");
        assert!(Dag::new(Path::new("/r"), vec![inst("a@1", &[], &["/tmp/abs/x.txt"])]).is_ok());
    }
}
