//! `models/.gitignore`: the `.pt` intermediates and a killed build's temporary outputs are
//! ignored; the published Markdown, JSON and SVG are tracked. Asks git itself.

use std::path::Path;
use std::process::Command;

fn ignored(repo: &Path, path: &str) -> Option<bool> {
    let out = Command::new("git").current_dir(repo).args(["check-ignore", "-q", "--no-index", path]).output().ok()?;
    match out.status.code() {
        Some(0) => Some(true),
        Some(1) => Some(false),
        _ => None,
    }
}

#[test]
fn published_files_are_tracked_and_intermediates_ignored() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let run = "models/m/layer-analysis/weight-fp8-act-fp16/m_autoquant_wfp8_afp16_lm_small";
    let cases = [
        (format!("{run}/wfp8_afp16_autoquant_lm_autoquant_state.pt"), true),
        (format!("{run}/.per-layer-sensitivity.x1Y2.qpipe-tmp.json"), true),
        (format!("{run}/wfp8_afp16_autoquant_lm_autoquant_state.json"), false),
        (format!("{run}/wfp8_afp16_autoquant_lm_quant_manifest.json"), false),
        (format!("{run}/per-layer-sensitivity.json"), false),
        (format!("{run}/per-layer-sensitivity.md"), false),
        (format!("{run}/per-layer-sensitivity.svg"), false),
        ("models/m/layer-analysis/weight-fp8-act-fp16/README.md".to_string(), false),
        ("models/m/layer-analysis/README.md".to_string(), false),
    ];
    for (path, want) in cases {
        let Some(got) = ignored(&repo, &path) else {
            eprintln!("SKIP: `git check-ignore` is not available here (no git, or not a git checkout)");
            return;
        };
        assert_eq!(got, want, "{path}: ignored = {got}, expected {want}");
    }
}
