//! `cargo xtask deb`: the Debian package, made with Debian's own tools
//! (`dpkg-shlibdeps` for the library dependencies, `dpkg-deb` to pack)
//! from a staged tree:
//!
//! - `/usr/bin/mmproxy`, stripped; the BPF object is inside (the daemon's
//!   build script embeds it);
//! - the systemd units of `examples/` (the socket unit as an example);
//! - `/etc/default/mmproxy` and `/etc/mmproxy/allowed-subnets`, conffiles;
//! - a man page and bash, zsh and fish completions, generated from the
//!   daemon's own flag definitions (`mmproxy generate ...`).
//!
//! `--check` (and `cargo xtask test`, as root) installs the package into a
//! throwaway overlay of this machine's root, in a mount namespace of its
//! own, and runs what an operator would: `dpkg -i`, `mmproxy --version`,
//! `systemd-analyze verify` on the unit, `mmproxy check` in a fresh network
//! namespace with the routing and a backend, then removal and purge. The
//! host's own root is never written.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    build_ebpf::{self, build_ebpf},
    exec::{cargo, exec, is_root, output, workspace_root},
};

#[derive(Debug, Default, clap::Args)]
pub(crate) struct Options {
    /// Also install the package into a throwaway root and try it (root).
    #[arg(long)]
    check: bool,
}

pub(crate) fn deb(opts: &Options) -> Result<()> {
    let package = build()?;
    println!("{}", package.display());
    if opts.check {
        check(&package)?;
    }
    Ok(())
}

const SUMMARY: &str = "preserves client addresses behind PROXY-protocol load balancers";
/// The long description: each line starts with a space (deb-control(5)).
const DESCRIPTION: &str = concat!(
    " mmproxy accepts connections (and datagrams) that start with a PROXY\n",
    " protocol v1 or v2 header, as HAProxy, nginx, AWS NLB or Cloudflare\n",
    " Spectrum send them, and connects to the backend from the client's own\n",
    " address (IP_TRANSPARENT), so the backend sees the real client without\n",
    " PROXY protocol support. Its flags are go-mmproxy's."
);

/// Where each staged file comes from, and its mode.
const FILES: &[(&str, &str, u32)] = &[
    (
        "examples/mmproxy.service",
        "lib/systemd/system/mmproxy.service",
        0o644,
    ),
    ("examples/mmproxy.default", "etc/default/mmproxy", 0o644),
    (
        "examples/allowed-subnets",
        "etc/mmproxy/allowed-subnets",
        0o644,
    ),
    (
        "examples/mmproxy.socket",
        "usr/share/doc/mmproxy/examples/mmproxy.socket",
        0o644,
    ),
    ("README.md", "usr/share/doc/mmproxy/README.md", 0o644),
];

const CONFFILES: &str = "/etc/default/mmproxy\n/etc/mmproxy/allowed-subnets\n";

/// The unit is not enabled on install: its flags name a backend the
/// operator has to choose first (README, "Upgrading from go-mmproxy").
const POSTINST: &str = "#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
";

const POSTRM: &str = "#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
if [ \"$1\" = purge ]; then
    rmdir /etc/mmproxy 2>/dev/null || true
fi
";

/// Builds `target/deb/mmproxy_<version>_<arch>.deb` and returns its path.
pub(crate) fn build() -> Result<PathBuf> {
    let root = workspace_root();
    build_ebpf(&build_ebpf::Options::default())?;
    exec(cargo(None).current_dir(&root).args([
        "build",
        "--locked",
        "--release",
        "-p",
        "mmproxy",
        "--bin",
        "mmproxy",
    ]))?;
    let binary = root.join("target/release/mmproxy");
    let version = output(Command::new(&binary).arg("--version"))?
        .trim()
        .strip_prefix("mmproxy ")
        .context("mmproxy --version")?
        .to_owned();
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_owned();
    let out_dir = root.join("target/deb");
    let stage = out_dir.join(format!("mmproxy_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    stage_files(&root, &binary, &stage)?;
    let depends = library_depends(&out_dir, &stage.join("usr/bin/mmproxy"))?;
    write_control(&stage, &version, &arch, &depends)?;
    let package = out_dir.join(format!("mmproxy_{version}_{arch}.deb"));
    exec(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .args([&stage, &package]),
    )
    .context("dpkg-deb failed")?;
    Ok(package)
}

fn stage_files(root: &Path, binary: &Path, stage: &Path) -> Result<()> {
    let bin = stage.join("usr/bin/mmproxy");
    fs::create_dir_all(bin.parent().unwrap_or(stage))?;
    exec(
        Command::new("strip")
            .args(["--strip-unneeded", "-o"])
            .args([&bin, binary]),
    )
    .context("strip failed")?;
    set_mode(&bin, 0o755)?;
    for (from, to, mode) in FILES {
        let dest = stage.join(to);
        fs::create_dir_all(dest.parent().unwrap_or(stage))?;
        fs::copy(root.join(from), &dest).with_context(|| format!("copying {from}"))?;
        set_mode(&dest, *mode)?;
    }
    let generated: [(&str, &str); 4] = [
        ("man", "usr/share/man/man1/mmproxy.1"),
        ("bash", "usr/share/bash-completion/completions/mmproxy"),
        ("zsh", "usr/share/zsh/vendor-completions/_mmproxy"),
        ("fish", "usr/share/fish/vendor_completions.d/mmproxy.fish"),
    ];
    for (what, to) in generated {
        let text = output(Command::new(binary).args(["generate", what]))?;
        ensure!(
            !text.trim().is_empty(),
            "mmproxy generate {what} printed nothing"
        );
        let dest = stage.join(to);
        fs::create_dir_all(dest.parent().unwrap_or(stage))?;
        fs::write(&dest, text)?;
        set_mode(&dest, 0o644)?;
    }
    exec(
        Command::new("gzip")
            .args(["-9n"])
            .arg(stage.join("usr/share/man/man1/mmproxy.1")),
    )?;
    let copyright = stage.join("usr/share/doc/mmproxy/copyright");
    fs::write(
        &copyright,
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: mmproxy\n\nFiles: *\nCopyright: the mmproxy developers\n\
         License: MIT or Apache-2.0\n",
    )?;
    set_mode(&copyright, 0o644)
}

/// `dpkg-shlibdeps` on the binary: `libc6 (>= ...)` and friends, as the
/// libraries it links say, instead of a guessed version.
fn library_depends(work: &Path, binary: &Path) -> Result<String> {
    let scratch = work.join("shlibdeps");
    fs::create_dir_all(scratch.join("debian"))?;
    fs::write(
        scratch.join("debian/control"),
        "Source: mmproxy\n\nPackage: mmproxy\nArchitecture: any\n",
    )?;
    let line = output(
        Command::new("dpkg-shlibdeps")
            .current_dir(&scratch)
            .args(["-O", "-e"])
            .arg(binary),
    )
    .context("dpkg-shlibdeps failed (package dpkg-dev)")?;
    let depends = line
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?;
    Ok(depends.trim().to_owned())
}

fn write_control(stage: &Path, version: &str, arch: &str, depends: &str) -> Result<()> {
    let debian = stage.join("DEBIAN");
    fs::create_dir_all(&debian)?;
    let installed_kib = dir_size(stage)?.div_ceil(1024);
    let control = format!(
        "Package: mmproxy\nVersion: {version}\nArchitecture: {arch}\n\
         Maintainer: mmproxy developers <mmproxy@example.invalid>\n\
         Installed-Size: {installed_kib}\nDepends: {depends}\nRecommends: iproute2\n\
         Section: net\nPriority: optional\nHomepage: https://example.invalid/mmproxy\n\
         Description: {SUMMARY}\n{DESCRIPTION}\n"
    );
    fs::write(debian.join("control"), control)?;
    fs::write(debian.join("conffiles"), CONFFILES)?;
    for (name, text) in [("postinst", POSTINST), ("postrm", POSTRM)] {
        fs::write(debian.join(name), text)?;
        set_mode(&debian.join(name), 0o755)?;
    }
    Ok(())
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Sets up the throwaway root: a tmpfs holding an overlay of `/`, with
/// /proc, /sys and /dev, and the package copied in; then runs [`TRY_IT`]
/// inside it with chroot. All of it dies with the mount namespace.
const THROWAWAY_ROOT: &str = r#"
set -eu
mount -t tmpfs tmpfs "$OVL"
mkdir "$OVL/upper" "$OVL/work" "$OVL/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$OVL/upper,workdir=$OVL/work" "$OVL/root"
for d in proc sys dev; do mount --rbind "/$d" "$OVL/root/$d"; done
cp "$DEB" "$OVL/root/tmp/mmproxy.deb"
exec chroot "$OVL/root" sh -eux -c "$TRY_IT"
"#;

/// What an operator does with the package, each step failing the check.
const TRY_IT: &str = r#"
if dpkg -s mmproxy >/dev/null 2>&1; then dpkg --purge mmproxy >/dev/null; fi
test ! -e /usr/bin/mmproxy
dpkg -i /tmp/mmproxy.deb
mmproxy --version
test -s /usr/share/man/man1/mmproxy.1.gz
zcat /usr/share/man/man1/mmproxy.1.gz | grep -q 'SIGUSR2'
test -s /usr/share/bash-completion/completions/mmproxy
test -s /usr/share/zsh/vendor-completions/_mmproxy
test -s /usr/share/fish/vendor_completions.d/mmproxy.fish
grep -q '^MMPROXY_OPTS=' /etc/default/mmproxy
systemd-analyze verify /lib/systemd/system/mmproxy.service
unshare --net sh -eu -c '
    ip link set lo up
    ip rule add from 127.0.0.1/8 iif lo table 123
    ip route add local 0.0.0.0/0 dev lo table 123
    ip -6 rule add from ::1/128 iif lo table 123
    ip -6 route add local ::/0 dev lo table 123
    python3 -m http.server -b 127.0.0.1 8080 >/dev/null 2>&1 & v4=$!
    python3 -m http.server -b ::1 8080 >/dev/null 2>&1 & v6=$!
    sleep 1
    mmproxy check -4 127.0.0.1:8080 -6 [::1]:8080 --mode ebpf
    kill $v4 $v6
'
dpkg -r mmproxy
test ! -e /usr/bin/mmproxy
test -e /etc/default/mmproxy
dpkg --purge mmproxy
test ! -e /etc/default/mmproxy
echo "xtask: the package installs, checks, removes and purges cleanly"
"#;

/// Installs `package` into a throwaway root and tries it (see [`TRY_IT`]).
pub(crate) fn check(package: &Path) -> Result<()> {
    if !is_root() {
        bail!("the package check needs root (mount namespace, overlay, chroot)");
    }
    let scratch = workspace_root().join("target/deb/throwaway-root");
    fs::create_dir_all(&scratch)?;
    exec(
        Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--fork",
                "sh",
                "-c",
                THROWAWAY_ROOT,
            ])
            .env("OVL", &scratch)
            .env("DEB", package)
            .env("TRY_IT", TRY_IT),
    )
    .context("the package did not install and run cleanly in a throwaway root")
}
