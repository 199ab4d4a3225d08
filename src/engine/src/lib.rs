//! qpipe's engine: pipeline composition, the DAG, content hashing, the lock, scheduling,
//! the CLI, verify and clean. It knows nothing about quantization: the domain comes in
//! through [`qpipe_contract::Domain`].
//!
//! The `qpipe` binary (`src/main.rs`, the root package) is one line:
//! `std::process::exit(qpipe_engine::cli::main(&qpipe_stages::Qwen3Vl))`.
//! Tests and benchmarks drive [`cli::run`] with a fake domain.

pub mod atomic;
pub mod check;
pub mod clean;
pub mod cli;
pub mod config;
pub mod dag;
pub mod hashing;
pub mod lock;
pub mod scheduler;
pub mod slurm;
pub mod status;
pub mod store;
pub mod suggest;
pub mod ui;
pub mod verify;
pub mod workspace;
