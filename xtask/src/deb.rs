//! `cargo xtask deb`: the Debian package, made with Debian's own tools
//! (`dpkg-shlibdeps` for the library dependencies, `dpkg-deb` to pack)
//! from a staged tree:
//!
//! - `/usr/bin/mmproxy`, stripped; the BPF object is inside (the daemon's
//!   build script embeds it);
//! - the systemd units of `examples/`, `mmproxy.service` and
//!   `mmproxy.socket`, in `/lib/systemd/system`, neither enabled (as
//!   openssh-server ships `ssh.socket`);
//! - `/etc/default/mmproxy` and `/etc/mmproxy/allowed-subnets`, conffiles;
//! - a man page and bash, zsh and fish completions, generated from the
//!   daemon's own flag definitions (`mmproxy generate ...`).
//!
//! `--check` (and `cargo xtask test`, as root) boots a throwaway machine
//! (`systemd-nspawn` on an overlay of this machine's root, in a mount
//! namespace of its own, with its own network namespace) and does there
//! what an operator would: `dpkg -i`, `systemctl start mmproxy` (the
//! hardened unit: dynamic user, capabilities, `Type=notify`), a proxied
//! request whose backend sees the header's client, an upgrade in place
//! with SIGUSR2 (systemd follows the new main PID), `systemctl stop`
//! (the routing goes), `systemctl start mmproxy.socket` (the installed
//! socket unit hands the daemon its listener), removal and purge (the
//! units go). The host's own root and network are never written.

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
        "lib/systemd/system/mmproxy.socket",
        0o644,
    ),
    ("README.md", "usr/share/doc/mmproxy/README.md", 0o644),
];

const CONFFILES: &str = "/etc/default/mmproxy\n/etc/mmproxy/allowed-subnets\n";

/// Neither unit is enabled on install: the flags name a backend the
/// operator has to choose first (docs/operations.md, "Upgrading from
/// go-mmproxy"), and an enabled socket would hold the port for a service
/// that cannot serve yet.
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

/// Sets up the throwaway machine: a tmpfs holding an overlay of `/`, the
/// package and [`TRY_IT`] copied in, a unit that runs it once the
/// machine has booted and powers off after; then boots it with
/// `systemd-nspawn` (its own network namespace, systemd as PID 1). All of
/// it dies with the mount namespace; the result stays in `$OVL/upper`.
const THROWAWAY_MACHINE: &str = r#"
set -eu
mount -t tmpfs tmpfs "$OVL"
mkdir "$OVL/upper" "$OVL/work" "$OVL/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$OVL/upper,workdir=$OVL/work" "$OVL/root"
R="$OVL/root"
cp "$DEB" "$R/var/tmp/mmproxy.deb"
printf '%s\n' "$TRY_IT" > "$R/var/tmp/try-it.sh"
cat > "$R/etc/systemd/system/try-it.service" <<'UNIT'
[Unit]
Description=try the mmproxy package
After=multi-user.target
SuccessAction=poweroff
FailureAction=poweroff
[Service]
Type=oneshot
ExecStart=/bin/sh -eux /var/tmp/try-it.sh
StandardOutput=file:/var/tmp/try-it.log
StandardError=inherit
[Install]
WantedBy=multi-user.target
UNIT
ln -s /etc/systemd/system/try-it.service "$R/etc/systemd/system/multi-user.target.wants/try-it.service"
timeout 300 systemd-nspawn --quiet --register=no --keep-unit --link-journal=no \
    --private-network --capability=CAP_BPF,CAP_PERFMON --system-call-filter=bpf \
    -D "$R" --boot > "$OVL/../machine-console.log" 2>&1 || true
cp "$OVL/upper/var/tmp/try-it.log" "$OVL/../try-it.log"
"#;

/// What an operator does with the package on a machine run by systemd,
/// each step failing the check.
const TRY_IT: &str = r#"
if dpkg -s mmproxy >/dev/null 2>&1; then dpkg --purge mmproxy >/dev/null; fi
test ! -e /usr/bin/mmproxy
dpkg -i /var/tmp/mmproxy.deb
mmproxy --version
test -s /usr/share/man/man1/mmproxy.1.gz
zcat /usr/share/man/man1/mmproxy.1.gz | grep -q 'SIGUSR2'
test -s /usr/share/bash-completion/completions/mmproxy
test -s /usr/share/zsh/vendor-completions/_mmproxy
test -s /usr/share/fish/vendor_completions.d/mmproxy.fish
systemd-analyze verify /lib/systemd/system/mmproxy.service /lib/systemd/system/mmproxy.socket
test "$(systemctl is-enabled mmproxy.service || true)" = disabled
test "$(systemctl is-enabled mmproxy.socket || true)" = disabled
if systemctl is-active mmproxy.socket; then exit 1; fi
python3 -m http.server -b 127.0.0.1 8080 2>/var/tmp/backend.log >/dev/null &
python3 -m http.server -b ::1 8080 >/dev/null 2>&1 &
for _ in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:8080/ && curl -s -o /dev/null 'http://[::1]:8080/' && break; sleep 0.1; done
sed -i 's/-4 127.0.0.1:443 -6 \[::1\]:443/-4 127.0.0.1:8080 -6 [::1]:8080/' /etc/default/mmproxy
systemctl start mmproxy
systemctl is-active mmproxy
. /etc/default/mmproxy
mmproxy check $MMPROXY_OPTS --mode ebpf
curl -sf http://127.0.0.1:9100/healthz
get() {
    python3 -c 'import socket
s = socket.create_connection(("127.0.0.1", 8443))
s.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 " + str(40000 + int(__import__("sys").argv[1])).encode() + b" 8443\r\nGET / HTTP/1.0\r\n\r\n")
reply = s.recv(64)
assert reply.startswith(b"HTTP/1.0 200"), reply' "$1"
}
get 1
grep -q '^192.0.2.1 ' /var/tmp/backend.log
old=$(systemctl show -p MainPID --value mmproxy)
systemctl kill --kill-whom=main --signal=SIGUSR2 mmproxy
sleep 2
new=$(systemctl show -p MainPID --value mmproxy)
test "$new" != "$old" && test "$new" != 0
systemctl is-active mmproxy
get 2
systemctl stop mmproxy
if ip rule | grep -q 'proto 109'; then
    ip rule
    journalctl -u mmproxy --no-pager
    echo 'the routing outlived the service'
    exit 1
fi
journalctl -u mmproxy --no-pager | grep 'systemd\[1\]'
# A main PID systemd cannot wait for gets SIGTERM and SIGKILL at once.
if journalctl -u mmproxy --no-pager | grep -E -q 'not our child|SIGKILL'; then exit 1; fi
journalctl -u mmproxy --no-pager | grep -q 'removed the routing added at start'
systemctl start mmproxy.socket
systemctl is-active mmproxy.socket
get 3
systemctl is-active mmproxy
journalctl -u mmproxy --no-pager | grep -q 'using handed-over listening sockets origin=LISTEN_FDS'
systemctl stop mmproxy.socket mmproxy
dpkg -r mmproxy
test ! -e /usr/bin/mmproxy
test ! -e /lib/systemd/system/mmproxy.service
test ! -e /lib/systemd/system/mmproxy.socket
if systemctl cat mmproxy.socket >/dev/null 2>&1; then exit 1; fi
test -e /etc/default/mmproxy
dpkg --purge mmproxy
test ! -e /etc/default/mmproxy
test ! -e /lib/systemd/system/mmproxy.socket
echo "TRY-IT-PASSED"
"#;

/// Installs `package` on a throwaway machine and tries it (see
/// [`TRY_IT`]); prints the machine's log when a step fails.
pub(crate) fn check(package: &Path) -> Result<()> {
    if !is_root() {
        bail!("the package check needs root (mount namespace, overlay, systemd-nspawn)");
    }
    let dir = workspace_root().join("target/deb/machine");
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    let overlay = dir.join("overlay");
    fs::create_dir_all(&overlay)?;
    exec(
        Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--fork",
                "sh",
                "-c",
                THROWAWAY_MACHINE,
            ])
            .env("OVL", &overlay)
            .env("DEB", package)
            .env("TRY_IT", TRY_IT),
    )
    .context("could not boot the throwaway machine")?;
    let log = fs::read_to_string(dir.join("try-it.log")).unwrap_or_default();
    if log.lines().any(|l| l == "TRY-IT-PASSED") {
        println!(
            "xtask: the package installs, starts under systemd, serves, upgrades in place, stops, is socket-activated, removes and purges cleanly"
        );
        return Ok(());
    }
    let console = fs::read_to_string(dir.join("machine-console.log")).unwrap_or_default();
    eprintln!(
        "---- the package check's steps ----\n{log}\n---- the machine's console ----\n{console}"
    );
    bail!("the package did not install and run cleanly on the throwaway machine (log above)")
}
