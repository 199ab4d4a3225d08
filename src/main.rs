//! The `qpipe` binary: the generic engine ([`qpipe_engine`], in `src/engine/`) driving the
//! Qwen3-VL sensitivity-analysis domain ([`qpipe_stages`], in `stages/`).

fn main() {
    std::process::exit(qpipe_engine::cli::main(&qpipe_stages::Qwen3Vl));
}
