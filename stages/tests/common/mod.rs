//! Shared by the scorer's integration tests: paths and the ModelOpt oracle fixture's tokens.
#![allow(dead_code)] // each test crate uses its own share of these

use std::path::PathBuf;

use qpipe_stages::score::{self, backend::Batch};
use serde_json::Value;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A committed fixture under `stages/tests/fixtures`.
pub fn fixture(name: &str) -> Value {
    let p = root().join("stages/tests/fixtures").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// The oracle's tokens in its batches, and its batch size.
pub fn oracle_batches(doc: &Value) -> (Vec<Batch>, usize) {
    let ids: Vec<Vec<u32>> = serde_json::from_value(doc["input_ids"].clone()).unwrap();
    let mask: Vec<Vec<u32>> = serde_json::from_value(doc["attention_mask"].clone()).unwrap();
    let pad = doc["pad_token_id"].as_u64().unwrap() as u32;
    let batch_size = doc["batch_size"].as_u64().unwrap() as usize;
    (score::make_batches(&ids, &mask, pad, batch_size), batch_size)
}
