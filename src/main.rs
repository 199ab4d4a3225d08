fn main() {
    eprintln!("qpipe: the engine is being built");
}
