//! qpipe's domain: everything about models, quantization and the artifacts, nothing
//! about the DAG, the lock or the CLI. The engine talks to it through [`contract`].
//!
//! One module per stage kind, named for it:
//!
//! | stage         | module            | reads                         | writes                          |
//! |---------------|-------------------|-------------------------------|---------------------------------|
//! | `fetch-model` | [`fetch_model`]   | a local checkpoint or the hub | checkpoint identity (`.json`)   |
//! | `build-calib` | [`build_calib`]   | captions, tokenizer           | calibration tokens (`.pt`)      |
//! | `score`       | [`score`]         | checkpoint, calibration       | AutoQuant state (`.pt`, `.json`)|
//! | `aggregate`   | [`aggregate`]     | state                         | `<scheme>_quant_manifest.json`  |
//! | `render`      | [`render`]        | manifest                      | `per-layer-sensitivity.{md,json,svg}` |
//! | `docs`        | [`docs`]          | manifests of a pair / model   | folder `README.md`s             |
//!
//! Support: [`model`] (the Qwen3-VL language model in candle), [`cpu_f32`] (tensor values as
//! `&[f32]`), [`quant`] (fake-quant
//! formats), [`checkpoint`] (finding, checking and reading checkpoints), [`torch_pt`]
//! (writing `torch.load`-able files), [`pyjson`] (JSON and numbers formatted as Python
//! formats them), [`plan`] (pipeline config → stage instances), [`parity`] (verify),
//! [`synth`] (synthetic checkpoints with real shapes, for timing runs and tests).

pub mod contract;
pub mod domain;

pub use domain::Qwen3Vl;

pub mod aggregate;
pub mod build_calib;
pub mod checkpoint;
pub mod cpu_f32;
pub mod device;
pub mod docs;
pub mod fetch_model;
pub mod malloc;
pub mod model;
pub mod parity;
pub mod plan;
pub mod pyjson;
pub mod quant;
pub mod render;
pub mod score;
mod simd;
pub mod stats;
pub mod synth;
pub mod torch_pt;
