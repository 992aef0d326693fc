//! `cargo xtask build-ebpf`: builds the BPF object the daemon embeds.
//!
//! On a fresh machine this first installs, idempotently, what the build
//! needs beyond the preinstalled nightly:
//! - the nightly's `rust-src` component (for `-Z build-std=core`);
//! - `bpf-linker`, built against the nightly's own libLLVM, because no
//!   system LLVM of the right major version exists here and the crate's
//!   default LLVM feature does not match the nightly's LLVM.
//!
//! The linker is cached outside the source tree (`$MMPROXY_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/mmproxy`, else `~/.cache/mmproxy`), keyed by the LLVM
//! library it links, so a nightly update builds a fresh one.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::exec::{cargo, exec, output, workspace_root};

/// The BPF objects the daemon embeds (mmproxy/build.rs): the TCP verdict
/// and the UDP TC program.
const OBJECTS: [&str; 2] = ["mmproxy-ebpf", "mmproxy-udp-tc"];

/// The toolchain that builds the BPF crate.
pub(crate) const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The crate feature that matches the nightly's libLLVM major version.
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
const LLVM_MAJOR_PREFIX: &str = "libLLVM.so.22";

#[derive(Debug, Default, clap::Args)]
pub(crate) struct Options {
    /// Build the BPF programs in debug profile (the default is release).
    #[arg(long)]
    debug: bool,
}

/// Builds the object and returns its path.
pub(crate) fn build_ebpf(opts: &Options) -> Result<PathBuf> {
    let sysroot = nightly_sysroot()?;
    ensure_rust_src(&sysroot)?;
    let linker_dir = ensure_bpf_linker(&sysroot)?;

    let root = workspace_root();
    let target_dir = root.join("target").join("bpf");
    let path = format!(
        "{}:{}",
        linker_dir.display(),
        env::var("PATH").unwrap_or_default()
    );
    let mut cmd = cargo(Some(NIGHTLY));
    cmd.current_dir(root.join("mmproxy-ebpf"))
        .args(["build", "--locked", "--target-dir"])
        .arg(&target_dir)
        .env("PATH", path)
        // bpf-linker loads the nightly's libLLVM at run time.
        .env("LD_LIBRARY_PATH", sysroot.join("lib"));
    if !opts.debug {
        cmd.arg("--release");
    }
    exec(&mut cmd).context("building the BPF programs")?;

    let profile = if opts.debug { "debug" } else { "release" };
    let objects = target_dir.join("bpfel-unknown-none").join(profile);
    for name in OBJECTS {
        let object = objects.join(name);
        if !object.is_file() {
            bail!(
                "the BPF build succeeded but {} is missing",
                object.display()
            );
        }
    }
    Ok(objects.join(OBJECTS[0]))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = output(std::process::Command::new("rustc").args([
        &format!("+{NIGHTLY}"),
        "--print",
        "sysroot",
    ]))
    .context(
        "the BPF programs need a nightly Rust toolchain, and `rustc +nightly` is not available \
         (install one with `rustup toolchain install nightly`)",
    )?;
    Ok(PathBuf::from(sysroot))
}

fn ensure_rust_src(sysroot: &Path) -> Result<()> {
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core");
    if core_src.is_dir() {
        return Ok(());
    }
    eprintln!("xtask: installing the nightly's rust-src component (needed by -Z build-std)");
    exec(std::process::Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        NIGHTLY,
    ]))
    .context("could not install rust-src for the nightly toolchain")
}

/// Returns the directory holding a working `bpf-linker`, building it first
/// when the cache has none for this nightly's LLVM.
fn ensure_bpf_linker(sysroot: &Path) -> Result<PathBuf> {
    let llvm_so = find_llvm_library(&sysroot.join("lib"))?;
    let root = cache_dir()?.join(format!("bpf-linker-{BPF_LINKER_VERSION}-{llvm_so}"));
    let bin_dir = root.join("bin");
    let linker = bin_dir.join("bpf-linker");
    if linker.is_file() {
        return Ok(bin_dir);
    }

    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {llvm_so} into {} (about 2 minutes, once)",
        root.display()
    );
    // bpf-linker's build script finds LLVM through LLVM_PREFIX: a folder whose
    // lib/ holds the nightly's libLLVM under the names the build looks for.
    let prefix = root.join("llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("could not create {}", prefix_lib.display()))?;
    for name in [llvm_so.as_str(), "libLLVM.so"] {
        let link = prefix_lib.join(name);
        if link.symlink_metadata().is_err() {
            symlink(sysroot.join("lib").join(&llvm_so), &link)
                .with_context(|| format!("could not create {}", link.display()))?;
        }
    }
    let build_dir = root.join("build");
    let mut cmd = cargo(None);
    cmd.args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--no-default-features",
        "--features",
        BPF_LINKER_LLVM_FEATURE,
        "--root",
    ])
    .arg(&root)
    .arg("--target-dir")
    .arg(&build_dir)
    .env("LLVM_PREFIX", &prefix);
    exec(&mut cmd).with_context(|| {
        format!(
            "could not build bpf-linker {BPF_LINKER_VERSION} with feature {BPF_LINKER_LLVM_FEATURE} \
             against {}",
            prefix_lib.join(&llvm_so).display()
        )
    })?;
    // The build tree is a few hundred MB and never reused.
    let _ = fs::remove_dir_all(&build_dir);
    Ok(bin_dir)
}

/// The nightly's libLLVM shared object, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn find_llvm_library(lib_dir: &Path) -> Result<String> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("could not list {}", lib_dir.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(LLVM_MAJOR_PREFIX) && name.contains("-rust-") {
            return Ok(name);
        }
    }
    bail!(
        "the nightly toolchain in {} ships no {LLVM_MAJOR_PREFIX}*-rust-* library; bpf-linker \
         {BPF_LINKER_VERSION} ({BPF_LINKER_LLVM_FEATURE}) needs a nightly built with LLVM 22",
        lib_dir.display()
    )
}

fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("MMPROXY_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("mmproxy"));
    }
    match env::var_os("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("mmproxy")),
        None => bail!("cannot choose a cache directory: set MMPROXY_CACHE_DIR or HOME"),
    }
}
