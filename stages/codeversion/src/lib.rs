//! Code versions that cannot miss a file, and the module graph they are derived from.
//!
//! A stage kind's code version must change whenever any source its outputs are computed by
//! changes, and only then. It is derived here from the sources themselves, never from a
//! hand-kept list:
//!
//! 1. The stage's **folder** (`stages/src/<kind>/`, found by the `env!("QPIPE_CODE_<KIND>")`
//!    its `Stage::code_version` reads) and every module of the same crate it reaches, by
//!    following `crate::…`, `super::…` and `self::…` paths transitively.
//! 2. Every **workspace crate** named by a reached file (`qpipe_model`, `qpipe_quant`, …),
//!    whole (all of `src/`, including non-Rust files such as `kernels.cu`), and the
//!    workspace crates those depend on (their `Cargo.toml`), transitively.
//!
//! The version is a 128-bit FNV-1a digest of the crate version and the sorted
//! (workspace-relative path, content) pairs; it names code, it does not guard secrets.
//! Carriage returns are dropped so a checkout on another OS keys the same.
//!
//! The same scanner gives [`module_graph`], which the tests use to prove that no module
//! imports one that imports it back.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// One source file of a crate, as a module.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Path relative to the crate directory (`src/score/scorer.rs`).
    pub rel: PathBuf,
    /// Module path (`["score", "scorer"]`; `[]` for `lib.rs`). Non-Rust files have the
    /// module path of the folder they sit in plus their file name.
    pub module: Vec<String>,
    pub text: String,
}

/// The sources of one crate.
#[derive(Debug, Clone)]
pub struct CrateSources {
    pub dir: PathBuf,
    pub files: Vec<SourceFile>,
}

impl CrateSources {
    /// Reads every file under `dir/src` (sorted).
    pub fn read(dir: &Path) -> io::Result<CrateSources> {
        let mut paths = Vec::new();
        walk(&dir.join("src"), &mut paths)?;
        paths.sort();
        let mut files = Vec::new();
        for p in paths {
            let rel = p.strip_prefix(dir).expect("under dir").to_path_buf();
            let bytes = fs::read(&p)?;
            let text = String::from_utf8_lossy(&bytes).replace('\r', "");
            files.push(SourceFile { module: module_of(&rel), rel, text });
        }
        Ok(CrateSources { dir: dir.to_path_buf(), files })
    }

    /// Whether `path` names a module of this crate.
    fn is_module(&self, path: &[String]) -> bool {
        self.files.iter().any(|f| f.rel.extension().is_some_and(|e| e == "rs") && f.module == path)
    }

    /// The longest prefix of `path` that names a module.
    fn resolve(&self, path: &[String]) -> Option<Vec<String>> {
        (0..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| self.is_module(p))
    }

    /// Files belonging to module `m` itself or to its submodules.
    fn files_under<'a>(&'a self, m: &'a [String]) -> impl Iterator<Item = &'a SourceFile> + 'a {
        self.files.iter().filter(move |f| f.module.starts_with(m))
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.is_file() {
            out.push(p);
        }
    }
    Ok(())
}

/// `src/lib.rs` → `[]`, `src/a/mod.rs` → `[a]`, `src/a/b.rs` → `[a, b]`,
/// `src/a/kernels.cu` → `[a, kernels.cu]`.
fn module_of(rel: &Path) -> Vec<String> {
    let parts: Vec<String> = rel.iter().skip(1).map(|s| s.to_string_lossy().into_owned()).collect::<Vec<_>>();
    let mut m = parts[..parts.len() - 1].to_vec();
    let last = &parts[parts.len() - 1];
    match last.strip_suffix(".rs") {
        Some("lib" | "main") if m.is_empty() => {}
        Some("mod") => {}
        Some(name) => m.push(name.to_string()),
        None => m.push(last.clone()),
    }
    m
}

/// A path a source file refers to: inside its crate (absolute module path) or another
/// crate by its Rust name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reference {
    Local(Vec<String>),
    Extern(String),
}

/// Every `crate::`/`super::`/`self::` path (with `{…}` groups expanded) and every
/// `qpipe_*` crate name in `text`, for a file whose module path is `module` (`is_mod_file`:
/// the file is `mod.rs`/`lib.rs`, so `super` is relative to the module itself).
pub fn references(text: &str, module: &[String], is_mod_file: bool) -> BTreeSet<Reference> {
    let text = strip_comments(text);
    let b = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        if !is_ident_start(b[i]) || (i > 0 && (is_ident_char(b[i - 1]) || b[i - 1] == b':')) {
            i += 1;
            continue;
        }
        let (word, end) = ident(b, i);
        let base: Option<Vec<String>> = match word {
            "crate" => Some(Vec::new()),
            "self" => Some(self_module(module, is_mod_file)),
            "super" => {
                let mut m = self_module(module, is_mod_file);
                m.pop();
                Some(m)
            }
            w if w.starts_with("qpipe_") => {
                out.insert(Reference::Extern(w.to_string()));
                None
            }
            _ => None,
        };
        match base {
            Some(base) if text[end..].starts_with("::") => {
                let mut paths = Vec::new();
                path_tail(b, end, base, &mut paths);
                out.extend(paths.into_iter().map(Reference::Local));
                i = end;
            }
            _ => i = end,
        }
    }
    out
}

/// The module a file's items live in (a non-`mod.rs` file is its own module).
fn self_module(module: &[String], _is_mod_file: bool) -> Vec<String> {
    module.to_vec()
}

/// Reads `::seg::seg…` or `::{a::b, c}` after position `i`, appending every full path.
fn path_tail(b: &[u8], mut i: usize, mut base: Vec<String>, out: &mut Vec<Vec<String>>) {
    loop {
        if !(b.get(i) == Some(&b':') && b.get(i + 1) == Some(&b':')) {
            out.push(base);
            return;
        }
        i += 2;
        while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
            i += 1;
        }
        match b.get(i) {
            Some(b'{') => {
                // Split the group at top-level commas.
                let (mut depth, mut start) = (0usize, i + 1);
                let mut j = i + 1;
                while j < b.len() {
                    match b[j] {
                        b'{' => depth += 1,
                        b'}' if depth == 0 => break,
                        b'}' => depth -= 1,
                        b',' if depth == 0 => {
                            group_item(b, start, j, &base, out);
                            start = j + 1;
                        }
                        _ => {}
                    }
                    j += 1;
                }
                group_item(b, start, j, &base, out);
                return;
            }
            Some(&c) if is_ident_start(c) => {
                let (word, end) = ident(b, i);
                match word {
                    "super" => {
                        base.pop();
                    }
                    "self" => {}
                    w => base.push(w.to_string()),
                }
                i = end;
            }
            _ => {
                out.push(base);
                return;
            }
        }
    }
}

fn group_item(b: &[u8], start: usize, end: usize, base: &[String], out: &mut Vec<Vec<String>>) {
    let mut i = start;
    while i < end && b[i].is_ascii_whitespace() {
        i += 1;
    }
    if i >= end || !is_ident_start(b[i]) {
        out.push(base.to_vec());
        return;
    }
    let (word, e) = ident(b, i);
    let mut p = base.to_vec();
    if word != "self" {
        p.push(word.to_string());
    }
    path_tail(&b[..end], e, p, out);
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn ident(b: &[u8], i: usize) -> (&str, usize) {
    let mut e = i;
    while e < b.len() && is_ident_char(b[e]) {
        e += 1;
    }
    (std::str::from_utf8(&b[i..e]).expect("ascii"), e)
}

/// Drops `//` comments (doc comments too: an intra-doc link is not a dependency) and
/// string-free `/* */` blocks; keeps line structure.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let code = match line.find("//") {
            // Keep `://` inside strings such as URLs from cutting code: good enough for
            // paths, which never follow a URL on the same line.
            Some(p) if !line[..p].ends_with(':') => &line[..p],
            _ => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// The workspace: its root and its member crates by Rust name (`qpipe_model` → dir).
#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
    pub crates: BTreeMap<String, PathBuf>,
}

impl Workspace {
    /// Reads `[workspace.dependencies]` entries with a `path` from the root `Cargo.toml`.
    pub fn read(root: &Path) -> io::Result<Workspace> {
        let manifest = fs::read_to_string(root.join("Cargo.toml"))?;
        let mut crates = BTreeMap::new();
        for line in manifest.lines() {
            let line = line.trim();
            let Some((name, rest)) = line.split_once('=') else { continue };
            let name = name.trim();
            if !name.starts_with("qpipe") {
                continue;
            }
            if let Some(p) = rest.split("path").nth(1).and_then(|r| r.split('"').nth(1)) {
                crates.insert(name.replace('-', "_"), root.join(p));
            }
        }
        Ok(Workspace { root: root.to_path_buf(), crates })
    }

    /// Workspace crates that `crate_dir`'s `[dependencies]` and `[build-dependencies]`
    /// name (`qpipe-x`), by Rust name.
    fn manifest_deps(&self, crate_dir: &Path) -> io::Result<BTreeSet<String>> {
        let manifest = fs::read_to_string(crate_dir.join("Cargo.toml"))?;
        let mut section = String::new();
        let mut out = BTreeSet::new();
        for line in manifest.lines() {
            let t = line.trim();
            if t.starts_with('[') {
                section = t.to_string();
                continue;
            }
            if section == "[dependencies]" {
                if let Some((name, _)) = t.split_once(['=', '.']) {
                    let name = name.trim().replace('-', "_");
                    if self.crates.contains_key(&name) {
                        out.insert(name);
                    }
                }
            }
        }
        Ok(out)
    }

    /// `names` and every workspace crate they depend on, transitively.
    fn closure(&self, names: impl IntoIterator<Item = String>) -> io::Result<BTreeSet<String>> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<String> = names.into_iter().filter(|n| self.crates.contains_key(n)).collect();
        while let Some(n) = todo.pop() {
            if seen.insert(n.clone()) {
                todo.extend(self.manifest_deps(&self.crates[&n])?);
            }
        }
        Ok(seen)
    }
}

/// A stage kind's derived version and the files it was derived from.
#[derive(Debug, Clone)]
pub struct KindVersion {
    /// `SCORE` (from `env!("QPIPE_CODE_SCORE")`).
    pub kind: String,
    /// The stage's folder module (`["score"]`).
    pub folder: Vec<String>,
    /// 32 hex digits.
    pub version: String,
    /// Workspace-relative paths of every file hashed, sorted.
    pub files: Vec<PathBuf>,
}

/// Derives the version of every stage kind of the crate at `crate_dir` (a member of the
/// workspace at `ws.root`). A stage folder is a top-level module whose files read
/// `env!("QPIPE_CODE_<KIND>")`.
pub fn stage_versions(ws: &Workspace, crate_dir: &Path, crate_version: &str) -> io::Result<Vec<KindVersion>> {
    let src = CrateSources::read(crate_dir)?;
    let mut kinds: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in &src.files {
        let Some(top) = f.module.first() else { continue };
        let mut rest = f.text.as_str();
        while let Some(p) = rest.find("env!(\"QPIPE_CODE_") {
            let tail = &rest[p + 17..];
            let kind: String = tail.chars().take_while(|c| c.is_ascii_uppercase() || *c == '_').collect();
            kinds.insert(kind, vec![top.clone()]);
            rest = tail;
        }
    }
    let mut out = Vec::new();
    for (kind, folder) in kinds {
        let files = kind_files(ws, &src, &folder)?;
        let version = digest(&ws.root, crate_version, &files)?;
        out.push(KindVersion { kind, folder, version, files });
    }
    Ok(out)
}

/// Every file a module (with its submodules) is compiled through: reached local modules
/// and whole workspace crates.
pub fn kind_files(ws: &Workspace, src: &CrateSources, start: &[String]) -> io::Result<Vec<PathBuf>> {
    // Reached modules count whole (their file and every submodule's); their ancestors
    // count with their own file only (a `mod.rs` that declares them).
    let mut reached: BTreeSet<Vec<String>> = BTreeSet::new();
    let mut ancestors: BTreeSet<Vec<String>> = BTreeSet::new();
    let mut externs: BTreeSet<String> = BTreeSet::new();
    let mut todo = vec![start.to_vec()];
    while let Some(m) = todo.pop() {
        if !reached.insert(m.clone()) {
            continue;
        }
        for n in 0..m.len() {
            ancestors.insert(m[..n].to_vec());
        }
        for f in src.files_under(&m) {
            // Test code computes no output: its paths are not followed (its text is
            // still hashed with its file).
            if f.rel.extension().is_none_or(|e| e != "rs") || is_test_file(f) {
                continue;
            }
            let is_mod = matches!(f.rel.file_name().and_then(|s| s.to_str()), Some("mod.rs" | "lib.rs"));
            for r in references(&without_test_modules(&f.text), &f.module, is_mod) {
                match r {
                    Reference::Local(p) => {
                        // A path into the crate root itself (an item of `lib.rs`) reaches
                        // the root file only, never the whole crate.
                        match src.resolve(&p) {
                            Some(m) if m.is_empty() => {
                                ancestors.insert(m);
                            }
                            Some(m) => todo.push(m),
                            None => {}
                        }
                    }
                    Reference::Extern(name) => {
                        externs.insert(name);
                    }
                }
            }
        }
    }
    let mut files: BTreeSet<PathBuf> = BTreeSet::new();
    for m in &reached {
        files.extend(src.files_under(m).map(|f| f.rel.clone()));
    }
    for m in &ancestors {
        files.extend(src.files.iter().filter(|f| &f.module == m).map(|f| f.rel.clone()));
    }
    let mut out: Vec<PathBuf> = files.into_iter().map(|r| rel_to(&ws.root, &src.dir.join(r))).collect();
    for name in ws.closure(externs)? {
        let dir = &ws.crates[&name];
        let c = CrateSources::read(dir)?;
        out.extend(c.files.iter().map(|f| rel_to(&ws.root, &dir.join(&f.rel))));
        if dir.join("build.rs").is_file() {
            out.push(rel_to(&ws.root, &dir.join("build.rs")));
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

fn rel_to(root: &Path, p: &Path) -> PathBuf {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    let p = p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    p.strip_prefix(&root).map(Path::to_path_buf).unwrap_or(p)
}

fn fnv1a(h: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *h ^= u64::from(*b);
        *h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// The digest of `version` and the (path, content) of `files` (workspace-relative).
pub fn digest(root: &Path, version: &str, files: &[PathBuf]) -> io::Result<String> {
    let (mut a, mut b) = (0xcbf2_9ce4_8422_2325_u64 ^ 1, 0xcbf2_9ce4_8422_2325_u64 ^ 2);
    let mut feed = |bytes: &[u8]| {
        fnv1a(&mut a, bytes);
        fnv1a(&mut b, bytes);
    };
    feed(version.as_bytes());
    feed(&[0]);
    for f in files {
        let text: Vec<u8> = fs::read(root.join(f))?.into_iter().filter(|c| *c != b'\r').collect();
        feed(f.to_string_lossy().replace('\\', "/").as_bytes());
        feed(&[0]);
        feed(&text);
        feed(&[0]);
    }
    Ok(format!("{a:016x}{b:016x}"))
}

/// The crate's module graph: for each Rust file, the files of the modules it refers to
/// (other than itself and its own ancestors' and descendants' declarations: a `mod.rs`
/// declaring and re-exporting its children, and a child naming its parent, are structure).
/// Test modules are left out (`#[cfg(test)] mod …` blocks and `tests.rs` files).
pub fn module_graph(src: &CrateSources) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut graph = BTreeMap::new();
    for f in &src.files {
        if f.rel.extension().is_none_or(|e| e != "rs") || is_test_file(f) {
            continue;
        }
        let is_mod = matches!(f.rel.file_name().and_then(|s| s.to_str()), Some("mod.rs" | "lib.rs"));
        let text = without_test_modules(&f.text);
        let mut to = BTreeSet::new();
        for r in references(&text, &f.module, is_mod) {
            let Reference::Local(p) = r else { continue };
            let Some(m) = src.resolve(&p) else { continue };
            if m.starts_with(&f.module) || f.module.starts_with(&m) {
                continue;
            }
            if let Some(target) =
                src.files.iter().find(|g| g.module == m && g.rel.extension().is_some_and(|e| e == "rs"))
            {
                to.insert(target.rel.clone());
            }
        }
        graph.insert(f.rel.clone(), to);
    }
    graph
}

fn is_test_file(f: &SourceFile) -> bool {
    f.module.last().is_some_and(|m| m == "tests" || m.ends_with("_tests"))
}

/// `text` without its `#[cfg(test)]` modules (inline `mod name { … }` blocks, found by
/// brace depth, and `mod name;` declarations): test code computes no output.
pub fn without_test_modules(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(p) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..p]);
        let after = &rest[p + "#[cfg(test)]".len()..];
        let decl = after.trim_start();
        let decl = decl.strip_prefix("pub(crate) ").unwrap_or(decl);
        if !decl.starts_with("mod ") {
            // `#[cfg(test)]` on something else (a function, an impl): keep it.
            out.push_str("#[cfg(test)]");
            rest = after;
            continue;
        }
        let start = after.len() - decl.len();
        let (semi, brace) = (decl.find(';'), decl.find('{'));
        match (semi, brace) {
            (Some(s), b) if b.is_none_or(|b| s < b) => rest = &after[start + s + 1..],
            (_, Some(b)) => {
                let bytes = decl.as_bytes();
                let mut depth = 0usize;
                let mut end = decl.len();
                for (i, &c) in bytes.iter().enumerate().skip(b) {
                    match c {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                rest = &after[(start + end).min(after.len())..];
            }
            _ => rest = "",
        }
    }
    out.push_str(rest);
    out
}

/// Every cycle's files (strongly connected components with more than one file), sorted.
pub fn cycles(graph: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<PathBuf>> {
    // Kosaraju: finish order on the graph, then components on its transpose.
    let nodes: Vec<&PathBuf> = graph.keys().collect();
    let idx: BTreeMap<&PathBuf, usize> = nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let adj: Vec<Vec<usize>> =
        nodes.iter().map(|n| graph[*n].iter().filter_map(|t| idx.get(t).copied()).collect()).collect();
    let mut rev = vec![Vec::new(); nodes.len()];
    for (u, vs) in adj.iter().enumerate() {
        for &v in vs {
            rev[v].push(u);
        }
    }
    let mut seen = vec![false; nodes.len()];
    let mut order = Vec::new();
    for s in 0..nodes.len() {
        if seen[s] {
            continue;
        }
        seen[s] = true;
        let mut stack = vec![(s, 0usize)];
        while let Some((u, i)) = stack.pop() {
            if i < adj[u].len() {
                stack.push((u, i + 1));
                let v = adj[u][i];
                if !seen[v] {
                    seen[v] = true;
                    stack.push((v, 0));
                }
            } else {
                order.push(u);
            }
        }
    }
    let mut comp = vec![usize::MAX; nodes.len()];
    let mut out = Vec::new();
    for &s in order.iter().rev() {
        if comp[s] != usize::MAX {
            continue;
        }
        let mut members = vec![];
        let mut stack = vec![s];
        comp[s] = s;
        while let Some(u) = stack.pop() {
            members.push(nodes[u].clone());
            for &v in &rev[u] {
                if comp[v] == usize::MAX {
                    comp[v] = s;
                    stack.push(v);
                }
            }
        }
        if members.len() > 1 {
            members.sort();
            out.push(members);
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests;
