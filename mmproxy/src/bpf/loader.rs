//! An `aya::EbpfLoader` built without parsing the kernel's BTF.
//!
//! aya 0.14 has one way to make a loader, `EbpfLoader::new()` (`Default`
//! calls it, the fields are private), and it reads and parses
//! `/sys/kernel/btf/vmlinux`, which [`super::Datapath::load`] then
//! discards with `.btf(None)`: 19 MiB of heap at the peak (heaptrack), so
//! ebpf mode's peak RSS was 30.7 MiB against plain mode's 8.0 MiB, and a
//! container's memory limit sees the peak.
//!
//! So the loader is made on a short-lived thread that Landlock forbids to
//! open files for reading: aya's read of the BTF fails at `open()`, aya
//! takes that as "no BTF", and nothing is parsed. A Landlock domain binds
//! the calling thread only and needs no privilege beyond `no_new_privs`,
//! also a per-thread flag; the thread ends once the loader is made, and
//! the rest of the process is untouched. Where Landlock is unavailable
//! (a kernel without it, or with it disabled), the loader is made as
//! before and the peak stays.

use std::os::fd::{FromRawFd as _, OwnedFd};

use aya::EbpfLoader;
use tracing::debug;

/// `LANDLOCK_ACCESS_FS_READ_FILE` (`linux/landlock.h`, ABI 1).
const ACCESS_FS_READ_FILE: u64 = 1 << 2;

/// `struct landlock_ruleset_attr` as of ABI 1; the kernel accepts this
/// prefix of the newer, longer struct.
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

/// A loader whose constructor found no BTF, or, without Landlock, an
/// ordinary one.
pub(super) fn loader_without_kernel_btf() -> EbpfLoader<'static> {
    let made = std::thread::Builder::new()
        .name("bpf-loader".into())
        .spawn(|| match forbid_reading_files() {
            Ok(()) => EbpfLoader::new(),
            Err(error) => {
                debug!(%error, "no Landlock: the BPF loader parses the kernel's BTF");
                EbpfLoader::new()
            }
        })
        .map(std::thread::JoinHandle::join);
    match made {
        Ok(Ok(loader)) => loader,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(error) => {
            debug!(%error, "no thread for the BPF loader: it parses the kernel's BTF");
            EbpfLoader::new()
        }
    }
}

/// Forbids the calling thread, for the rest of its life, to open any
/// file for reading.
fn forbid_reading_files() -> std::io::Result<()> {
    let attr = RulesetAttr {
        handled_access_fs: ACCESS_FS_READ_FILE,
    };
    // SAFETY: the kernel reads `size_of::<RulesetAttr>()` bytes of `attr`,
    // which outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &raw const attr,
            size_of::<RulesetAttr>(),
            0u32,
        )
    };
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    let ruleset = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sets this thread's no_new_privs flag, which Landlock needs
    // from an unprivileged caller; it cannot be unset, so it must stay on
    // this short-lived thread.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: binds this thread to the ruleset; `ruleset` is a valid fd.
    let restricted = unsafe {
        libc::syscall(
            libc::SYS_landlock_restrict_self,
            std::os::fd::AsRawFd::as_raw_fd(&ruleset),
            0u32,
        )
    };
    if restricted != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");

    /// The restriction binds the thread that asked for it and no other.
    #[test]
    fn only_the_restricted_thread_is_refused_files() {
        let restricted = std::thread::spawn(|| {
            forbid_reading_files()?;
            Ok::<_, std::io::Error>(std::fs::read(MANIFEST).map(|_| ()))
        })
        .join()
        .unwrap();
        match restricted {
            Ok(read) => assert_eq!(
                read.map_err(|e| e.kind()),
                Err(std::io::ErrorKind::PermissionDenied)
            ),
            Err(error) => eprintln!("SKIPPED: no Landlock here ({error})"),
        }
        assert!(std::fs::read(MANIFEST).is_ok());
    }
}
