fn main() {
    std::process::exit(qpipe::cli::main(&qpipe_stages::Qwen3Vl));
}
