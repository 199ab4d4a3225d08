//! Derives each stage kind's code version from every source file it is compiled through
//! (see `qpipe-codeversion`): `QPIPE_CODE_<KIND>` for each stage folder of `src/`.

use std::path::Path;

fn main() {
    // At run time, not `env!` at compile time: cargo may reuse this build script's binary
    // for another checkout of the same crate (a clone building into a shared target
    // directory), which must read its own sources, not those of the checkout it was
    // compiled in.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&manifest_dir);
    let root = dir.parent().expect("stages/ sits in the workspace root");
    let ws = qpipe_codeversion::Workspace::read(root).expect("reading the workspace Cargo.toml");
    let version = std::env::var("CARGO_PKG_VERSION").expect("cargo sets CARGO_PKG_VERSION");
    let kinds = qpipe_codeversion::stage_versions(&ws, dir, &version).expect("reading the stages' sources");
    assert!(!kinds.is_empty(), "no stage folder reads env!(\"QPIPE_CODE_…\")");
    for k in &kinds {
        println!("cargo:rustc-env=QPIPE_CODE_{}={}", k.kind, k.version);
    }
    // Any file of this crate or of a workspace crate may now be reached: watch them all.
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src");
    for d in ws.crates.values() {
        if d.as_path() != dir {
            println!("cargo:rerun-if-changed={}", d.join("src").display());
            println!("cargo:rerun-if-changed={}", d.join("Cargo.toml").display());
        }
    }
    println!("cargo:rerun-if-changed={}", root.join("Cargo.toml").display());
}
