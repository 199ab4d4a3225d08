//! `pipeline.yaml` → composed runs, Hydra style.
//!
//! A composed run is `config`, deep-merged with the selected option of every group (the
//! group's object gains `name: <option>`), then dotted overrides (`a.b=v`, values parsed as
//! YAML scalars; `+a.b=v` adds a key that does not exist yet), then `${a.b}` interpolation
//! inside strings. `GROUP=OPTION` selects an option; a comma in a value sweeps
//! (`dataset.size=small,medium,large`), and several sweeps make a cartesian product.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use qpipe_contract::Run;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::suggest::{did_you_mean, list};

/// A loaded `pipeline.yaml`.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// The file, as found.
    pub file: PathBuf,
    /// The workspace root: the directory holding the file.
    pub root: PathBuf,
    /// Group → selected option name.
    pub defaults: Map<String, Value>,
    /// The base configuration (an object).
    pub config: Map<String, Value>,
    /// Group → (option → object).
    pub groups: Map<String, Value>,
    /// The publish matrix: each entry maps a key (group or dotted) to a value or a list.
    pub publish: Vec<Map<String, Value>>,
    /// `cache.dir`: the shared output cache's folder ([`crate::store`]), if set.
    pub cache_dir: Option<String>,
    /// `executor:`: where `qpipe build` runs stages ([`crate::slurm`]).
    pub executor: ExecutorConfig,
    /// The file's text, to point at where a value is set ([`Pipeline::locate`]).
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    version: u32,
    #[serde(default)]
    defaults: serde_yaml::Value,
    #[serde(default)]
    config: serde_yaml::Value,
    #[serde(default)]
    groups: serde_yaml::Value,
    #[serde(default)]
    publish: serde_yaml::Value,
    #[serde(default)]
    cache: Option<RawCache>,
    #[serde(default)]
    executor: ExecutorConfig,
}

/// `cache:` — where the shared output cache lives (see [`crate::store`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    dir: String,
}

/// `executor:` in pipeline.yaml: where `qpipe build` runs stages ([`crate::slurm`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorConfig {
    /// `local` (the default) or `slurm`: what `qpipe build` uses without `--executor`.
    #[serde(default)]
    pub default: Option<String>,
    #[serde(default)]
    pub slurm: SlurmConfig,
}

/// `executor.slurm`: what every job asks for, and per stage kind what it adds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmConfig {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--account`.
    pub account: Option<String>,
    /// `--time` (Slurm's formats: `MM`, `HH:MM:SS`, `D-HH`…).
    pub time: Option<String>,
    /// More `sbatch` arguments for every job (`--qos=…`, `--constraint=…`).
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// Seconds between two looks at a job's state (default 2).
    pub poll_seconds: Option<f64>,
    /// Per stage kind (`score`, `render`, …).
    #[serde(default)]
    pub stages: BTreeMap<String, StageResources>,
}

/// `executor.slurm.stages.<kind>`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageResources {
    /// `sbatch` arguments for this kind's jobs, e.g. `["--gres=gpu:1", "--cpus-per-task=8",
    /// "--mem=64G"]`.
    #[serde(default)]
    pub sbatch_args: Vec<String>,
    /// Run this kind in the submitting process instead (quick CPU stages).
    #[serde(default)]
    pub local: bool,
}

impl ExecutorConfig {
    /// Checks what can be checked before anything runs: the default's name and the stage
    /// kinds (errors name the key).
    pub fn validate(&self, kinds: &[&str]) -> Result<()> {
        if let Some(d) = &self.default {
            if d != "local" && d != "slurm" {
                bail!("`executor.default`: unknown executor `{d}`; valid: local, slurm");
            }
        }
        for kind in self.slurm.stages.keys() {
            if !kinds.contains(&kind.as_str()) {
                bail!(
                    "`executor.slurm.stages.{kind}`: no stage kind `{kind}`; kinds: {}{}",
                    list(kinds, 20),
                    did_you_mean(kind, kinds.iter())
                );
            }
        }
        if let Some(p) = self.slurm.poll_seconds {
            if !(p > 0.0 && p.is_finite()) {
                bail!("`executor.slurm.poll_seconds`: {p} is not a positive number of seconds");
            }
        }
        Ok(())
    }
}

/// One `key=value` assignment of a single composed run.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub key: String,
    pub value: Value,
    /// `+key=value`: add a key that is not in the configuration yet.
    pub add: bool,
}

impl Assignment {
    /// `key=value` as a person would type it.
    pub fn display(&self) -> String {
        let v = match &self.value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        format!("{}{}={v}", if self.add { "+" } else { "" }, self.key)
    }
}

/// Convert a YAML value to JSON. Mapping keys that are numbers or booleans become strings
/// (`block_sizes: {-1: 64}` → `{"-1": 64}`).
pub fn yaml_to_json(v: &serde_yaml::Value) -> Result<Value> {
    use serde_yaml::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                Value::Number(serde_json::Number::from_f64(f).ok_or_else(|| anyhow!("`{f}` is not a finite number"))?)
            }
        }
        Y::String(s) => Value::String(s.clone()),
        Y::Sequence(items) => Value::Array(items.iter().map(yaml_to_json).collect::<Result<_>>()?),
        Y::Mapping(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s.clone(),
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    Y::Null => "null".to_string(),
                    other => bail!("a mapping key must be a scalar, found {other:?}"),
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => bail!("YAML tags (`{}`) are not supported", t.tag),
    })
}

/// Parse a command-line value as a YAML scalar (or flow list/map): `8` → 8, `null` → null,
/// `abc` → "abc". An empty value is the empty string.
pub fn parse_value(s: &str) -> Result<Value> {
    if s.is_empty() {
        return Ok(Value::String(String::new()));
    }
    let flow = s.starts_with(['[', '{']);
    match serde_yaml::from_str::<serde_yaml::Value>(s) {
        // `a=b: c` is the string `b: c`, not a mapping (only `{…}` and `[…]` are collections).
        Ok(serde_yaml::Value::Mapping(_) | serde_yaml::Value::Sequence(_)) if !flow => Ok(Value::String(s.to_string())),
        Ok(y) => yaml_to_json(&y),
        Err(_) if !flow => Ok(Value::String(s.to_string())),
        Err(e) => Err(anyhow!("`{s}` is not a valid YAML value: {e}")),
    }
}

fn object(v: Value, what: &str) -> Result<Map<String, Value>> {
    match v {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(Map::new()),
        other => bail!("`{what}` must be a mapping, found `{other}`"),
    }
}

impl Pipeline {
    /// Read and check a pipeline file. Malformed YAML is reported as `file:line:column`.
    pub fn load(file: &Path) -> Result<Pipeline> {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("cannot read pipeline file `{}`", file.display()))?;
        Self::parse(file, &text)
    }

    /// Parse pipeline text (`file` names it in messages and gives the root).
    pub fn parse(file: &Path, text: &str) -> Result<Pipeline> {
        let raw: RawPipeline = serde_yaml::from_str(text).map_err(|e| match e.location() {
            Some(loc) => anyhow!("{}:{}:{}: {e}", file.display(), loc.line(), loc.column()),
            None => anyhow!("{}: {e}", file.display()),
        })?;
        let at = |what: &str| format!("{}: in `{what}`", file.display());
        if raw.version != 1 {
            bail!("{}: unsupported pipeline `version: {}` (this qpipe reads version 1)", file.display(), raw.version);
        }
        let defaults = object(yaml_to_json(&raw.defaults).with_context(|| at("defaults"))?, "defaults")?;
        let config = object(yaml_to_json(&raw.config).with_context(|| at("config"))?, "config")?;
        let groups = object(yaml_to_json(&raw.groups).with_context(|| at("groups"))?, "groups")?;
        let publish = match yaml_to_json(&raw.publish).with_context(|| at("publish"))? {
            Value::Null => Vec::new(),
            Value::Array(items) => items
                .into_iter()
                .map(|i| object(i, "publish[]"))
                .collect::<Result<Vec<_>>>()
                .with_context(|| at("publish"))?,
            other => bail!("{}: `publish` must be a list of mappings, found `{other}`", file.display()),
        };
        for (g, options) in &groups {
            if !options.is_object() {
                bail!("{}: group `{g}` must map option names to mappings", file.display());
            }
            if config.contains_key(g) {
                bail!("{}: `{g}` is both a group and a key of `config`; rename one", file.display());
            }
        }
        for (g, opt) in &defaults {
            let Some(options) = groups.get(g) else {
                bail!(
                    "{}: `defaults` selects `{g}`, which is not a group; groups: {}{}",
                    file.display(),
                    list(groups.keys(), 20),
                    did_you_mean(g, groups.keys())
                );
            };
            let Some(opt) = opt.as_str() else { bail!("{}: `defaults.{g}` must be an option name", file.display()) };
            if options.get(opt).is_none() {
                bail!("{}: `defaults.{g}`: {}", file.display(), unknown_option(g, opt, options));
            }
        }
        let root = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let root = if root.as_os_str().is_empty() { PathBuf::from(".") } else { root };
        let cache_dir = raw.cache.map(|c| c.dir);
        Ok(Pipeline {
            file: file.to_path_buf(),
            root,
            defaults,
            config,
            groups,
            publish,
            cache_dir,
            executor: raw.executor,
            text: text.to_string(),
        })
    }

    /// The runs of the `publish` matrix (`published: true`).
    pub fn publish_runs(&self) -> Result<Vec<Run>> {
        let mut runs = Vec::new();
        for (i, entry) in self.publish.iter().enumerate() {
            let axes: Vec<Vec<Assignment>> = entry
                .iter()
                .map(|(k, v)| {
                    let (key, add) = split_add(k);
                    let values = match v {
                        Value::Array(items) => items.clone(),
                        other => vec![other.clone()],
                    };
                    values.into_iter().map(|value| Assignment { key: key.to_string(), value, add }).collect()
                })
                .collect();
            for combo in product(&axes) {
                let config = self.compose(&combo).with_context(|| format!("in `publish` entry {}", i + 1))?;
                runs.push(Run { config, overrides: combo.iter().map(Assignment::display).collect(), published: true });
            }
        }
        Ok(runs)
    }

    /// The ad-hoc runs that command-line overrides describe (`published: false`).
    pub fn override_runs(&self, args: &[String]) -> Result<Vec<Run>> {
        let axes: Vec<Vec<Assignment>> =
            args.iter().map(|a| self.expand_globs(parse_override(a)?, a)).collect::<Result<_>>()?;
        let mut runs = Vec::new();
        for combo in product(&axes) {
            let config = self.compose(&combo)?;
            runs.push(Run { config, overrides: combo.iter().map(Assignment::display).collect(), published: false });
        }
        Ok(runs)
    }

    /// Replaces a group selection `GROUP=glob(PATTERN)` by one assignment per option of
    /// the group whose name matches `PATTERN` (`*` any run of characters, `?` one), in the
    /// group's order, as Hydra's `glob` sweep does.
    fn expand_globs(&self, axis: Vec<Assignment>, arg: &str) -> Result<Vec<Assignment>> {
        let mut out = Vec::new();
        for a in axis {
            let pattern = a.value.as_str().and_then(|v| v.strip_prefix("glob(")).and_then(|v| v.strip_suffix(')'));
            let (Some(pattern), Some(options)) = (pattern, self.groups.get(&a.key).and_then(Value::as_object)) else {
                out.push(a);
                continue;
            };
            let hits: Vec<&String> = options.keys().filter(|o| glob_match(pattern, o)).collect();
            if hits.is_empty() {
                bail!(
                    "`{arg}`: no option of group `{}` matches `{pattern}`; options: {}",
                    a.key,
                    list(options.keys(), 40)
                );
            }
            out.extend(hits.into_iter().map(|o| Assignment {
                key: a.key.clone(),
                value: Value::String(o.clone()),
                add: a.add,
            }));
        }
        Ok(out)
    }

    /// Compose one run from single-valued assignments.
    pub fn compose(&self, assignments: &[Assignment]) -> Result<Value> {
        let mut selected = self.defaults.clone();
        let mut sets = Vec::new();
        for a in assignments {
            if !a.key.contains('.') && self.groups.contains_key(&a.key) && !a.add {
                let options = &self.groups[&a.key];
                let opt = match &a.value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                if options.get(&opt).is_none() {
                    bail!("{}", unknown_option(&a.key, &opt, options));
                }
                selected.insert(a.key.clone(), Value::String(opt));
            } else {
                sets.push(a);
            }
        }
        let mut cfg = self.config.clone();
        for (g, options) in &self.groups {
            let Some(opt) = selected.get(g).and_then(Value::as_str) else {
                bail!(
                    "group `{g}` has no default option; choose one with `{g}=OPTION` (options: {})",
                    list(options.as_object().map(|o| o.keys()).into_iter().flatten(), 20)
                );
            };
            let mut obj = object(options[opt].clone(), &format!("groups.{g}.{opt}"))?;
            obj.insert("name".into(), Value::String(opt.to_string()));
            cfg.insert(g.clone(), Value::Object(obj));
        }
        let mut cfg = Value::Object(cfg);
        for a in sets {
            set_key(&mut cfg, &a.key, a.value.clone(), a.add, &self.groups)?;
        }
        interpolate(&cfg)
    }
}

impl Pipeline {
    /// Where the value of `key` (dotted) in `run` comes from: `FILE:LINE:COL` of the value
    /// in the pipeline file (in `config`, in the selected option of a group, or in the
    /// `publish` entry that sets it), or the command-line override that set it. When the
    /// key itself is missing, the mapping that lacks it.
    pub fn locate(&self, run: &Run, key: &str) -> Option<String> {
        let parts: Vec<&str> = key.split('.').filter(|p| !p.is_empty()).collect();
        let first = *parts.first()?;
        let sets = |k: &str| k == key || key.starts_with(&format!("{k}.")) || k.starts_with(&format!("{key}."));
        let assignment = run
            .overrides
            .iter()
            .filter_map(|o| o.split_once('=').map(|(k, _)| (k.trim_start_matches('+'), o)))
            .rfind(|(k, _)| !self.groups.contains_key(*k) && sets(k));
        let yaml_path: Vec<String> = match assignment {
            Some((_, o)) if !run.published => return Some(format!("the override `{o}`")),
            Some((k, _)) => {
                let entry = self.publish.iter().position(|e| e.contains_key(k) || e.contains_key(&format!("+{k}")))?;
                let name = if self.publish[entry].contains_key(k) { k.to_string() } else { format!("+{k}") };
                vec!["publish".into(), entry.to_string(), name]
            }
            None if self.groups.contains_key(first) => {
                let opt = run.config.get(first)?.get("name")?.as_str()?;
                ["groups", first, opt].iter().chain(&parts[1..]).map(|s| s.to_string()).collect()
            }
            None => std::iter::once("config").chain(parts.iter().copied()).map(str::to_string).collect(),
        };
        // The value itself, or the deepest mapping on the way that exists.
        (1..=yaml_path.len()).rev().find_map(|n| {
            let (line, col) = yaml_location(&self.text, &yaml_path[..n])?;
            Some(format!("{}:{line}:{col}", self.file.display()))
        })
    }
}

/// The (line, column) where the value at `path` (mapping keys; a number indexes a list)
/// starts in the YAML `text`, using serde_yaml's own positions: walking the document, the
/// walk fails on purpose when it reaches the value, and the error carries its location.
fn yaml_location(text: &str, path: &[String]) -> Option<(usize, usize)> {
    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
    const FOUND: &str = "qpipe: the value looked for";
    struct Seek<'a>(&'a [String]);
    impl<'de> DeserializeSeed<'de> for Seek<'_> {
        type Value = ();
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
            if self.0.is_empty() {
                // Read the value, so that the error is raised at its event: every `visit_*`
                // of `Found` is the default, an "invalid type" error expecting FOUND.
                return d.deserialize_any(Found);
            }
            d.deserialize_any(self)
        }
    }
    struct Found;
    impl Visitor<'_> for Found {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(FOUND)
        }
    }
    impl<'de> Visitor<'de> for Seek<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
            while let Some(k) = map.next_key::<serde_yaml::Value>()? {
                let name = match &k {
                    serde_yaml::Value::String(s) => s.clone(),
                    serde_yaml::Value::Number(n) => n.to_string(),
                    serde_yaml::Value::Bool(b) => b.to_string(),
                    _ => String::new(),
                };
                if name == self.0[0] {
                    map.next_value_seed(Seek(&self.0[1..]))?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
            let want = self.0[0].parse::<usize>().ok();
            let mut i = 0;
            loop {
                let more = if Some(i) == want {
                    seq.next_element_seed(Seek(&self.0[1..]))?.is_some()
                } else {
                    seq.next_element::<IgnoredAny>()?.is_some()
                };
                if !more {
                    return Ok(());
                }
                i += 1;
            }
        }
        fn visit_bool<E>(self, _: bool) -> std::result::Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> std::result::Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> std::result::Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> std::result::Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> std::result::Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> std::result::Result<(), E> {
            Ok(())
        }
    }
    match Seek(path).deserialize(serde_yaml::Deserializer::from_str(text)) {
        Err(e) if e.to_string().contains(FOUND) => e.location().map(|l| (l.line(), l.column())),
        _ => None,
    }
}

fn unknown_option(group: &str, opt: &str, options: &Value) -> String {
    let names: Vec<&String> = options.as_object().map(|o| o.keys().collect()).unwrap_or_default();
    format!(
        "unknown option `{opt}` for group `{group}`; valid options: {}{}",
        list(names.iter().copied(), 40),
        did_you_mean(opt, names.iter().copied())
    )
}

fn split_add(k: &str) -> (&str, bool) {
    match k.strip_prefix('+') {
        Some(rest) => (rest, true),
        None => (k, false),
    }
}

/// Parse one command-line override into its sweep values.
pub fn parse_override(arg: &str) -> Result<Vec<Assignment>> {
    let (k, v) = arg.split_once('=').ok_or_else(|| anyhow!("`{arg}` is not an override (KEY=VALUE)"))?;
    let (key, add) = split_add(k.trim());
    if key.is_empty() || key.split('.').any(str::is_empty) {
        bail!("`{arg}`: `{k}` is not a valid key (dotted names like `dataset.size`)");
    }
    let v = v.trim();
    let whole = v.starts_with(['[', '{', '"', '\'']);
    let parts: Vec<&str> = if whole || !v.contains(',') { vec![v] } else { v.split(',').map(str::trim).collect() };
    parts
        .into_iter()
        .map(|p| {
            let value = parse_value(p).with_context(|| format!("in override `{arg}`"))?;
            Ok(Assignment { key: key.to_string(), value, add })
        })
        .collect()
}

/// Whether `name` matches the glob `pattern` (`*` any run of characters, `?` one).
fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matcher with backtracking to the last `*`.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(s) = star {
            i = s + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

/// Cartesian product of the axes, first axis slowest.
fn product(axes: &[Vec<Assignment>]) -> Vec<Vec<Assignment>> {
    let mut out: Vec<Vec<Assignment>> = vec![Vec::new()];
    for axis in axes {
        let mut next = Vec::with_capacity(out.len() * axis.len());
        for prefix in &out {
            for a in axis {
                let mut p = prefix.clone();
                p.push(a.clone());
                next.push(p);
            }
        }
        out = next;
    }
    out
}

fn set_key(cfg: &mut Value, key: &str, value: Value, add: bool, groups: &Map<String, Value>) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = cfg;
    for (i, part) in parts.iter().enumerate() {
        let here = parts[..i].join(".");
        let Value::Object(map) = cur else {
            bail!("cannot set `{key}`: `{here}` is not a mapping");
        };
        if !map.contains_key(*part) {
            if add {
                let fill = if i + 1 == parts.len() { Value::Null } else { Value::Object(Map::new()) };
                map.insert(part.to_string(), fill);
            } else {
                let full: Vec<String> =
                    map.keys().map(|k| if here.is_empty() { k.clone() } else { format!("{here}.{k}") }).collect();
                let mut names = full.clone();
                if i == 0 {
                    names.extend(groups.keys().cloned());
                }
                let mut uniq = HashSet::new();
                names.retain(|n| uniq.insert(n.clone()));
                bail!(
                    "unknown key `{key}`{}; valid keys{}: {}{} (use `+{key}=…` to add a new key)",
                    if i == 0 { String::new() } else { format!(" (`{here}` has no `{part}`)") },
                    if i == 0 { String::new() } else { format!(" under `{here}`") },
                    list(&names, 40),
                    did_you_mean(&parts[..=i].join("."), &names)
                );
            }
        }
        if i + 1 == parts.len() {
            map.insert(part.to_string(), value);
            return Ok(());
        }
        cur = map.get_mut(*part).expect("inserted above");
    }
    Ok(())
}

fn lookup<'a>(cfg: &'a Value, key: &str) -> Option<&'a Value> {
    let mut cur = cfg;
    for part in key.split('.') {
        cur = match cur {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn all_keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Object(m) = v {
        for (k, c) in m {
            let full = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            out.push(full.clone());
            all_keys(c, &full, out);
        }
    }
}

/// The longest string interpolation may produce (1 MiB): a longer one is a mistake (a
/// reference chain that doubles at each step), refused before it eats the memory.
pub const MAX_INTERPOLATED_LEN: usize = 1 << 20;

/// Resolve `${a.b}` references inside strings. A string that is exactly one reference
/// takes the referenced value with its type; otherwise scalars are spliced in as text.
/// Each key is resolved once; a result longer than [`MAX_INTERPOLATED_LEN`] is an error
/// naming the key.
pub fn interpolate(cfg: &Value) -> Result<Value> {
    let mut r = Resolver { root: cfg, stack: Vec::new(), done: HashMap::new() };
    r.tree(cfg, "")
}

struct Resolver<'a> {
    root: &'a Value,
    /// Keys being resolved, outermost first (a key met again is a cycle).
    stack: Vec<String>,
    /// Keys already resolved.
    done: HashMap<String, Value>,
}

impl Resolver<'_> {
    fn tree(&mut self, v: &Value, path: &str) -> Result<Value> {
        Ok(match v {
            Value::String(s) if s.contains("${") => self.string(s, path)?,
            Value::Object(m) => {
                let mut out = Map::new();
                for (k, c) in m {
                    let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                    out.insert(k.clone(), self.tree(c, &p)?);
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(
                a.iter().enumerate().map(|(i, c)| self.tree(c, &format!("{path}.{i}"))).collect::<Result<_>>()?,
            ),
            other => other.clone(),
        })
    }

    fn reference(&mut self, key: &str, from: &str) -> Result<Value> {
        if let Some(v) = self.done.get(key) {
            return Ok(v.clone());
        }
        if self.stack.iter().any(|k| k == key) {
            let mut cycle = self.stack.clone();
            cycle.push(key.to_string());
            bail!("interpolation cycle: {}", cycle.join(" → "));
        }
        let root = self.root;
        let Some(raw) = lookup(root, key) else {
            let mut keys = Vec::new();
            all_keys(root, "", &mut keys);
            bail!(
                "`{from}` refers to `${{{key}}}`, which is not a key of the composed run{}",
                did_you_mean(key, &keys)
            );
        };
        self.stack.push(key.to_string());
        let r = self.tree(raw, key);
        self.stack.pop();
        let v = r?;
        self.done.insert(key.to_string(), v.clone());
        Ok(v)
    }

    fn string(&mut self, s: &str, path: &str) -> Result<Value> {
        let t = s.trim();
        if t.starts_with("${") && t.ends_with('}') && t[2..].find('}') == Some(t.len() - 3) {
            return self.reference(&t[2..t.len() - 1], path);
        }
        let mut out = String::new();
        let mut rest = s;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find('}').ok_or_else(|| anyhow!("`{path}`: unterminated `${{` in `{s}`"))?;
            let key = &after[..end];
            match self.reference(key, path)? {
                Value::String(v) => out.push_str(&v),
                Value::Null => bail!("`{path}`: `${{{key}}}` is null and cannot be spliced into `{s}`"),
                v @ (Value::Number(_) | Value::Bool(_)) => out.push_str(&v.to_string()),
                _ => bail!("`{path}`: `${{{key}}}` is a mapping or list and cannot be spliced into `{s}`"),
            }
            if out.len() > MAX_INTERPOLATED_LEN {
                bail!(
                    "key `{path}`: interpolating `${{{key}}}` makes a string longer than {} MiB; \
                     a chain of references that repeats itself grows without bound",
                    MAX_INTERPOLATED_LEN >> 20
                );
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(Value::String(out))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_is_checked_against_the_stage_kinds() {
        let cfg: ExecutorConfig = serde_yaml::from_str(
            "default: slurm\nslurm:\n  partition: gpu\n  stages:\n    score: {sbatch_args: ['--gres=gpu:1']}\n    \
             render: {local: true}\n",
        )
        .unwrap();
        cfg.validate(&["score", "render"]).unwrap();
        let e = cfg.validate(&["scores", "render"]).unwrap_err().to_string();
        assert!(e.contains("executor.slurm.stages.score") && e.contains("scores"), "{e}");
        let bad: ExecutorConfig = serde_yaml::from_str("default: cluster\n").unwrap();
        assert!(bad.validate(&[]).unwrap_err().to_string().contains("valid: local, slurm"));
        assert!(serde_yaml::from_str::<ExecutorConfig>("slurm: {partitoin: x}\n").is_err());
    }

    use super::*;
    use serde_json::json;

    const P: &str = r#"
version: 1
defaults: {model: tiny, dataset: captions}
config:
  out: models/${model.name}/${dataset.size}
  batch: 8
  runner: {output_dir: null}
groups:
  model:
    tiny: {path: ckpt}
    big: {repo: x/y}
  dataset:
    captions: {size: small, n: {small: 16}}
publish:
  - dataset.size: [small, large]
    model: [tiny, big]
"#;

    fn p() -> Pipeline {
        Pipeline::parse(Path::new("pipeline.yaml"), P).unwrap()
    }

    /// A bad value is traced to where it is set: `config`, the selected option of a group
    /// (a flow mapping), a `publish` entry, a command-line override; a missing key to the
    /// mapping that lacks it.
    #[test]
    fn values_are_located_in_the_file_or_the_overrides() {
        let p = p();
        let run = |overrides: &[&str]| {
            let args: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
            p.override_runs(&args).unwrap().remove(0)
        };
        let plain = run(&["batch=8"]);
        assert_eq!(p.locate(&plain, "runner.output_dir").as_deref(), Some("pipeline.yaml:7:24"));
        assert_eq!(p.locate(&plain, "batch").as_deref(), Some("the override `batch=8`"));
        let big = run(&["model=big"]);
        assert_eq!(p.locate(&big, "model.repo").as_deref(), Some("pipeline.yaml:11:17"));
        // not in the option: its mapping
        assert_eq!(p.locate(&big, "model.revision").as_deref(), Some("pipeline.yaml:11:10"));
        assert_eq!(p.locate(&big, "batch").as_deref(), Some("pipeline.yaml:6:10"));
        let published = p.publish_runs().unwrap().remove(0);
        assert_eq!(p.locate(&published, "dataset.size").as_deref(), Some("pipeline.yaml:15:19"));
        assert_eq!(p.locate(&published, "dataset.n.small").as_deref(), Some("pipeline.yaml:13:40"));
    }

    #[test]
    fn composes_groups_overrides_and_interpolation() {
        let runs = p().override_runs(&["model=big".into(), "batch=4".into(), "runner.output_dir=/x".into()]).unwrap();
        assert_eq!(runs.len(), 1);
        let c = &runs[0].config;
        assert_eq!(c["model"], json!({"repo": "x/y", "name": "big"}));
        assert_eq!(c["batch"], json!(4));
        assert_eq!(c["runner"]["output_dir"], json!("/x"));
        assert_eq!(c["out"], json!("models/big/small"));
        assert_eq!(runs[0].overrides, ["model=big", "batch=4", "runner.output_dir=/x"]);
        assert!(!runs[0].published);
    }

    #[test]
    fn sweeps_make_a_cartesian_product() {
        let runs = p().override_runs(&["dataset.size=small,medium,large".into(), "model=tiny,big".into()]).unwrap();
        assert_eq!(runs.len(), 6);
        let outs: Vec<_> = runs.iter().map(|r| r.config["out"].as_str().unwrap().to_string()).collect();
        assert_eq!(outs[0], "models/tiny/small");
        assert_eq!(outs[1], "models/big/small");
        assert_eq!(outs[5], "models/big/large");
        let pubs = p().publish_runs().unwrap();
        assert_eq!(pubs.len(), 4);
        assert!(pubs.iter().all(|r| r.published));
    }

    #[test]
    fn glob_sweeps_select_matching_options() {
        let runs = p().override_runs(&["model=glob(*)".into()]).unwrap();
        let names: Vec<_> = runs.iter().map(|r| r.config["model"]["name"].as_str().unwrap().to_string()).collect();
        assert_eq!(names, ["tiny", "big"]);
        let runs = p().override_runs(&["model=glob(t?n*)".into(), "dataset.size=a,b".into()]).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].overrides, ["model=tiny", "dataset.size=a"]);
        let e = p().override_runs(&["model=glob(x*)".into()]).unwrap_err().to_string();
        assert!(e.contains("no option of group `model` matches `x*`") && e.contains("tiny"), "{e}");
        assert!(glob_match("w*_a*", "wfp4_afp16") && glob_match("*", "") && glob_match("a*b*c", "aXbYbc"));
        assert!(!glob_match("w*_afp8", "wfp4_afp16") && !glob_match("?", "") && !glob_match("ab", "abc"));
    }

    #[test]
    fn typed_values_and_whole_references() {
        let mut pl = p();
        pl.config.insert("copy".into(), json!("${batch}"));
        let runs = pl.override_runs(&["batch=1e-3".into()]).unwrap();
        assert_eq!(runs[0].config["copy"], json!(0.001));
        let runs = pl.override_runs(&["batch=null".into()]).unwrap();
        assert_eq!(runs[0].config["copy"], Value::Null);
        assert_eq!(parse_value("b: c").unwrap(), json!("b: c"));
        assert_eq!(parse_value("- x").unwrap(), json!("- x"));
        assert_eq!(parse_value("[1, a]").unwrap(), json!([1, "a"]));
        assert!(parse_value("[1, a").is_err());
        let runs = pl.override_runs(&["+extra.deep=true".into()]).unwrap();
        assert_eq!(runs[0].config["extra"]["deep"], json!(true));
    }

    #[test]
    fn unknown_names_are_errors_with_suggestions() {
        let e = format!("{:#}", p().override_runs(&["model=tinny".into()]).unwrap_err());
        assert!(e.contains("unknown option `tinny`") && e.contains("did you mean `tiny`"), "{e}");
        let e = format!("{:#}", p().override_runs(&["dataset.sise=small".into()]).unwrap_err());
        assert!(e.contains("unknown key `dataset.sise`") && e.contains("did you mean `dataset.size`"), "{e}");
        let e = format!("{:#}", p().override_runs(&["btach=1".into()]).unwrap_err());
        assert!(e.contains("did you mean `batch`"), "{e}");
        let mut pl = p();
        pl.config.insert("bad".into(), json!("${model.nam}"));
        let e = format!("{:#}", pl.override_runs(&[]).unwrap_err());
        assert!(e.contains("did you mean `model.name`"), "{e}");
    }

    #[test]
    fn malformed_yaml_has_a_location() {
        let e = Pipeline::parse(Path::new("p.yaml"), "version: 1\nconfig:\n  a: [1, 2\n").unwrap_err().to_string();
        assert!(e.starts_with("p.yaml:"), "{e}");
        let e = Pipeline::parse(Path::new("p.yaml"), "version: 1\nconfg: {}\n").unwrap_err().to_string();
        assert!(e.starts_with("p.yaml:2:1"), "{e}");
    }

    #[test]
    fn interpolation_that_doubles_at_each_step_is_refused_quickly() {
        let mut pl = p();
        pl.config.insert("x0".into(), json!("abcdefgh"));
        for i in 0..30 {
            pl.config.insert(format!("x{}", i + 1), json!(format!("${{x{i}}}${{x{i}}}")));
        }
        let t = std::time::Instant::now();
        let e = format!("{:#}", pl.override_runs(&[]).unwrap_err());
        assert!(e.contains("x18") && e.contains("longer than 1 MiB"), "{e}");
        assert!(t.elapsed().as_secs() < 5, "took {:?}", t.elapsed());
    }

    #[test]
    fn interpolation_cycles_are_errors() {
        let mut pl = p();
        pl.config.insert("a".into(), json!("${b}"));
        pl.config.insert("b".into(), json!("x${a}"));
        let e = format!("{:#}", pl.override_runs(&[]).unwrap_err());
        assert!(e.contains("interpolation cycle"), "{e}");
    }
}
