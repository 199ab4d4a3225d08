//! Derives each stage kind's code version from the source files that make its output.
//!
//! A stage's outputs change when — and only when — one of these files changes (or the
//! crate's version does), so editing the renderer re-runs only `render`. The version is a
//! 128-bit FNV-1a digest of (path, content) pairs; it names code, it does not guard secrets.

use std::fs;
use std::path::{Path, PathBuf};

/// Stage kind → the source paths (files or directories, relative to this crate) its
/// outputs depend on. Shared helpers are listed under every stage that uses them.
const SOURCE_SETS: &[(&str, &[&str])] = &[
    ("FETCH_MODEL", &["src/fetch_model.rs", "src/checkpoint"]),
    ("BUILD_CALIB", &["src/build_calib.rs", "src/checkpoint", "src/torch_pt"]),
    (
        "SCORE",
        &[
            "src/score.rs",
            "src/score",
            "src/cpu_f32.rs",
            "src/device.rs",
            "src/model",
            "src/quant",
            "src/checkpoint",
            "src/torch_pt",
            "src/build_calib.rs",
            "src/pyjson.rs",
        ],
    ),
    ("AGGREGATE", &["src/aggregate.rs", "src/pyjson.rs"]),
    ("RENDER", &["src/render.rs", "src/render", "src/aggregate.rs", "src/pyjson.rs"]),
    ("DOCS", &["src/docs.rs", "src/stats.rs", "src/pyjson.rs"]),
];

fn files_under(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<_> = fs::read_dir(path).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for e in entries {
            files_under(&e, out);
        }
    } else if path.is_file() && path.extension().is_some_and(|e| e == "rs" || e == "cu") {
        out.push(path.to_path_buf());
    }
}

fn fnv1a(seed: u64, bytes: &[u8], mut h: u64) -> u64 {
    if h == 0 {
        h = 0xcbf2_9ce4_8422_2325 ^ seed;
    }
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn main() {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=build.rs");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap();
    for (kind, paths) in SOURCE_SETS {
        let mut files = Vec::new();
        for p in *paths {
            files_under(Path::new(p), &mut files);
        }
        files.sort();
        files.dedup();
        let (mut a, mut b) = (fnv1a(1, version.as_bytes(), 0), fnv1a(2, version.as_bytes(), 0));
        for f in &files {
            let name = f.to_string_lossy().replace('\\', "/");
            // Normalize line endings so a checkout on another OS keys the same.
            let text = fs::read(f).unwrap();
            let text: Vec<u8> = text.into_iter().filter(|c| *c != b'\r').collect();
            for chunk in [name.as_bytes(), &[0u8], &text, &[0u8]] {
                a = fnv1a(1, chunk, a);
                b = fnv1a(2, chunk, b);
            }
        }
        println!("cargo:rustc-env=QPIPE_CODE_{kind}={a:016x}{b:016x}");
    }
}
