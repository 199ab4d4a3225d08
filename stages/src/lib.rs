//! qpipe's Qwen3-VL domain: what a pipeline's runs mean and how each stage kind makes its
//! outputs; nothing about the DAG, the lock or the CLI (those are the engine's, and this
//! crate cannot reach it: it depends on [`qpipe_contract`] only). The model
//! ([`qpipe_model`]) and the quantizers ([`qpipe_quant`]) are crates of their own.
//!
//! One folder per stage kind, each holding its typed params, its inputs and outputs (by
//! name) and its `run`:
//!
//! | stage         | folder            | reads                         | writes                          |
//! |---------------|-------------------|-------------------------------|---------------------------------|
//! | `fetch-model` | [`fetch_model`]   | a local checkpoint or the hub | checkpoint identity (`.json`)   |
//! | `build-calib` | [`build_calib`]   | captions, tokenizer           | calibration tokens (`.pt`)      |
//! | `score`       | [`score`]         | checkpoint, calibration       | scores per recipe and format (`.json`, ignored) |
//! | `search`      | [`search`]        | scores, the bit budget        | AutoQuant state (`.pt`, `.json`)|
//! | `aggregate`   | [`aggregate`]     | state                         | `<scheme>_quant_manifest.json`  |
//! | `render`      | [`render`]        | manifest                      | `per-layer-sensitivity.{md,json,svg}` |
//! | `docs`        | [`docs`]          | manifests of a pair / model   | folder `README.md`s             |
//!
//! Around them: [`plan`] (the pipeline's run schema, composed into stage instances),
//! [`domain`] (the stage kinds and the planner, as the engine sees them), [`parity`]
//! (`qpipe verify`'s comparison), [`io`] (file formats several stages share), [`stats`]
//! (rank correlation) and, with the `synth` feature, [`synth`] (synthetic checkpoints with
//! real shapes, for timing runs).
//!
//! Each stage kind's code version is derived by `build.rs` from every source file it is
//! compiled through (see `qpipe-codeversion`).

pub mod domain;
pub use domain::Qwen3Vl;

pub mod aggregate;
pub mod build_calib;
pub mod docs;
pub mod fetch_model;
pub mod recipe;
pub mod render;
pub mod score;
pub mod search;

pub mod io;
pub mod parity;
pub mod plan;
pub mod stats;
#[cfg(any(test, feature = "synth"))]
pub mod synth;
