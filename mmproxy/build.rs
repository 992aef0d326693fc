//! Finds the BPF object that `cargo xtask build-ebpf` builds, for the
//! daemon to embed, and fails with a sentence naming that command when it
//! is missing (instead of an `include_bytes!` error deep in the build).

use std::{env, path::PathBuf};

fn main() {
    println!("cargo::rerun-if-env-changed=MMPROXY_BPF_OBJECT");
    let object = env::var_os("MMPROXY_BPF_OBJECT").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpf/bpfel-unknown-none/release/mmproxy-ebpf")
        },
        PathBuf::from,
    );
    println!("cargo::rerun-if-changed={}", object.display());
    match object.canonicalize() {
        Ok(path) if path.is_file() => {
            println!("cargo::rustc-env=MMPROXY_BPF_OBJECT={}", path.display());
        }
        _ => println!(
            "cargo::error=the BPF object {} is missing: run `cargo xtask build-ebpf` first \
             (`cargo xtask run` and `cargo xtask test` build it too)",
            object.display()
        ),
    }
}
