use super::*;

fn v(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

#[test]
fn module_paths() {
    assert_eq!(module_of(Path::new("src/lib.rs")), v(&[]));
    assert_eq!(module_of(Path::new("src/a/mod.rs")), v(&["a"]));
    assert_eq!(module_of(Path::new("src/a/b.rs")), v(&["a", "b"]));
    assert_eq!(module_of(Path::new("src/a/k.cu")), v(&["a", "k.cu"]));
}

#[test]
fn references_expand_groups_and_resolve_super() {
    let text = "use crate::{io::{checkpoint, pyjson::format_e}, stats};\n\
                use super::recipes::Recipe; // crate::not::this\n\
                fn f() { qpipe_model::x(); self::g(); }";
    let r = references(text, &v(&["score", "scorer"]), false);
    let want: BTreeSet<Reference> = [
        Reference::Local(v(&["io", "checkpoint"])),
        Reference::Local(v(&["io", "pyjson", "format_e"])),
        Reference::Local(v(&["stats"])),
        Reference::Local(v(&["score", "recipes", "Recipe"])),
        Reference::Local(v(&["score", "scorer", "g"])),
        Reference::Extern("qpipe_model".into()),
    ]
    .into_iter()
    .collect();
    assert_eq!(r, want);
}

#[test]
fn test_modules_are_cut() {
    let text = "use crate::a;\n#[cfg(test)]\nmod t;\nfn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::b;\n    fn g() { if x { } }\n}\nuse crate::c;\n";
    let cut = without_test_modules(text);
    assert!(cut.contains("crate::a") && cut.contains("crate::c") && cut.contains("fn f()"), "{cut}");
    assert!(!cut.contains("crate::b") && !cut.contains("mod t;"), "{cut}");
}

#[test]
fn cycles_are_found() {
    let p = |s: &str| PathBuf::from(s);
    let mut g = BTreeMap::new();
    g.insert(p("a"), [p("b")].into_iter().collect());
    g.insert(p("b"), [p("c")].into_iter().collect());
    g.insert(p("c"), [p("a")].into_iter().collect());
    g.insert(p("d"), [p("a")].into_iter().collect());
    assert_eq!(cycles(&g), vec![vec![p("a"), p("b"), p("c")]]);
    g.insert(p("c"), BTreeSet::new());
    assert!(cycles(&g).is_empty());
}

/// The real workspace (this crate sits at `stages/codeversion`), or another checkout
/// named by `QPIPE_CHECK_ROOT` (to run the checks on an older tree).
fn repo() -> PathBuf {
    match std::env::var_os("QPIPE_CHECK_ROOT") {
        Some(root) => PathBuf::from(root),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap(),
    }
}

/// `cargo test -p qpipe-codeversion print_stage_versions -- --ignored --nocapture`: each
/// stage kind's version and the files it is derived from.
#[test]
#[ignore]
fn print_stage_versions() {
    let root = repo();
    let (versions, files) = versions(&root);
    for (k, v) in versions {
        println!("{k} {v} ({} files)", files[&k].len());
        for f in &files[&k] {
            println!("    {}", f.display());
        }
    }
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let ws = Workspace::read(&repo()).unwrap();
    assert!(!ws.crates.is_empty(), "no workspace crates found under {}", repo().display());
    let mut all = Vec::new();
    for (name, dir) in &ws.crates {
        let src = CrateSources::read(dir).unwrap();
        for c in cycles(&module_graph(&src)) {
            all.push(format!("{name}: {}", c.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ↔ ")));
        }
    }
    assert!(all.is_empty(), "import cycles:\n  {}", all.join("\n  "));
}

/// Copies the workspace's manifests and crate sources (not `target/`) into a temp dir.
fn copy_workspace() -> tempfile::TempDir {
    let root = repo();
    let tmp = tempfile::tempdir().unwrap();
    fs::copy(root.join("Cargo.toml"), tmp.path().join("Cargo.toml")).unwrap();
    let ws = Workspace::read(&root).unwrap();
    for dir in ws.crates.values() {
        let rel = dir.canonicalize().unwrap().strip_prefix(&root).unwrap().to_path_buf();
        let mut files = Vec::new();
        walk(&dir.join("src"), &mut files).unwrap();
        files.push(dir.join("Cargo.toml"));
        if dir.join("build.rs").is_file() {
            files.push(dir.join("build.rs"));
        }
        for f in files {
            let to = tmp.path().join(&rel).join(f.strip_prefix(dir).unwrap());
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::copy(&f, &to).unwrap();
        }
    }
    tmp
}

fn versions(root: &Path) -> (BTreeMap<String, String>, BTreeMap<String, Vec<PathBuf>>) {
    let ws = Workspace::read(root).unwrap();
    let ks = stage_versions(&ws, &root.join("stages"), "0.1.0").unwrap();
    (
        ks.iter().map(|k| (k.kind.clone(), k.version.clone())).collect(),
        ks.into_iter().map(|k| (k.kind, k.files)).collect(),
    )
}

#[test]
fn every_file_the_scorer_is_built_from_keys_the_score_version() {
    let tmp = copy_workspace();
    let root = tmp.path();
    let (before, files) = versions(root);
    let kinds: BTreeSet<&str> = before.keys().map(String::as_str).collect();
    for k in ["FETCH_MODEL", "BUILD_CALIB", "SCORE", "AGGREGATE", "RENDER", "DOCS"] {
        assert!(kinds.contains(k), "stage kind {k} not found: {kinds:?}");
    }
    let score = &files["SCORE"];
    // Whole crates the scorer is compiled through, including the SIMD helpers and the
    // GPU kernels' source.
    for must in [
        "stages/compute/src/simd.rs",
        "stages/compute/src/f32_data.rs",
        "stages/quant/src/kernels.cu",
        "stages/quant/src/fake.rs",
        "stages/model/src/fused.rs",
        "stages/contract/src/lib.rs",
        "stages/src/score/scorer.rs",
    ] {
        assert!(score.contains(&PathBuf::from(must)), "{must} missing from the score version's files");
    }
    // The tokenizer stage and the renderer are not part of scoring.
    for never in ["stages/src/build_calib/mod.rs", "stages/src/render/mod.rs", "stages/src/plan/mod.rs"] {
        assert!(!score.contains(&PathBuf::from(never)), "{never} should not key the score stage");
    }
    // Editing any one of them changes the score version.
    for f in score {
        let path = root.join(f);
        let old = fs::read(&path).unwrap();
        let mut edited = old.clone();
        edited.extend_from_slice(b"\n// edit\n");
        fs::write(&path, &edited).unwrap();
        let (after, _) = versions(root);
        assert_ne!(after["SCORE"], before["SCORE"], "editing {} left the score version unchanged", f.display());
        fs::write(&path, &old).unwrap();
    }
    assert_eq!(versions(root).0, before);
}

#[test]
fn editing_the_renderer_changes_only_renders_version() {
    let tmp = copy_workspace();
    let root = tmp.path();
    let (before, _) = versions(root);
    let path = root.join("stages/src/render/markdown.rs");
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str("\n// edit\n");
    fs::write(&path, text).unwrap();
    let (after, _) = versions(root);
    for (k, v) in &before {
        if k == "RENDER" {
            assert_ne!(&after[k], v, "render's version did not change");
        } else {
            assert_eq!(&after[k], v, "{k}'s version changed with the renderer");
        }
    }
}
