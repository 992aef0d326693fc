//! Finds the BPF objects that `cargo xtask build-ebpf` builds (the TCP
//! verdict, the UDP TC program), for the daemon to embed. Without them (a fresh clone, an editor's `cargo check`)
//! the build still succeeds with an empty placeholder and a warning naming
//! that command; such a binary refuses `--mode ebpf` with the same
//! sentence (`bpf::LoadError::NotBuilt`).

use std::{env, path::PathBuf};

fn main() {
    embed("MMPROXY_BPF_OBJECT", "mmproxy-ebpf");
    embed("MMPROXY_UDP_BPF_OBJECT", "mmproxy-udp-tc");
}

/// Sets `var` for the compiler to the path of the BPF object `name` (or of
/// an empty placeholder when it has not been built).
fn embed(var: &str, name: &str) {
    println!("cargo::rerun-if-env-changed={var}");
    let object = env::var_os(var).map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/bpf/bpfel-unknown-none/release")
                .join(name)
        },
        PathBuf::from,
    );
    println!("cargo::rerun-if-changed={}", object.display());
    let embedded = match object.canonicalize() {
        Ok(path) if path.is_file() => path,
        _ => {
            println!(
                "cargo::warning=the BPF object {} is missing: this build refuses --mode ebpf; \
                 run `cargo xtask build-ebpf` and build again (`cargo xtask run` and `cargo \
                 xtask test` build it too)",
                object.display()
            );
            let placeholder = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default())
                .join(format!("{name}.placeholder"));
            if let Err(e) = std::fs::write(&placeholder, b"") {
                println!("cargo::error=cannot write {}: {e}", placeholder.display());
            }
            placeholder
        }
    };
    println!("cargo::rustc-env={var}={}", embedded.display());
}
