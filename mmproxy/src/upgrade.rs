//! Zero-downtime upgrade. On SIGUSR2 the running daemon starts the binary
//! found at its own path (the new version, once a package manager has
//! replaced the file) with its own flags, and hands it its listening
//! sockets over a unix socket pair. The kernel's accept queues belong to
//! the sockets, not to a process, so no connection is refused while both
//! run; the old instance stops accepting only after the new one serves,
//! then drains its own connections as on SIGTERM.
//!
//! The conversation over the pair, one line each way:
//! - old -> new: `mmproxy-handover 1 NAME...`, the sockets attached
//!   (`SCM_RIGHTS`), one name per socket (`tcp`, `udp`, `metrics`);
//! - new -> old: `ready` once its accept loops run;
//! - old -> new: `released` once it has stopped accepting and let go of
//!   the `--setup-routes` routing, which the new one then takes over.
//!
//! A successor that exits, fails or stays silent for [`READY_TIMEOUT`]
//! changes nothing: the old instance keeps serving and says why.

use std::{
    ffi::OsString,
    io::{self, IoSlice, IoSliceMut, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::{net::UnixStream, process::CommandExt as _},
    },
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

/// The variable that tells a new instance which descriptor is the pair.
pub const ENV_FD: &str = "MMPROXY_UPGRADE_FD";
/// How long a successor may take to start serving.
pub const READY_TIMEOUT: Duration = Duration::from_mins(1);
const HELLO: &str = "mmproxy-handover 1";
/// More than `--listeners` can ask for (`SCM_MAX_FD` is 253).
const MAX_SOCKETS: usize = 250;

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("cannot start {exe}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot hand the listening sockets over")]
    Send(#[source] io::Error),
    #[error("{0} listening sockets are more than one handover carries ({MAX_SOCKETS})")]
    TooMany(usize),
    #[error("the new instance exited or closed the handover before it was ready ({0})")]
    NotReady(String),
    #[error("the new instance was not ready within {0:?}; it was stopped")]
    Timeout(Duration),
    #[error("{ENV_FD}: {0}")]
    Receive(String),
}

/// How to start this binary again: its path and flags, read at start-up
/// (the path still names the file after a package replaced it).
#[derive(Debug, Clone)]
pub struct Launch {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Launch {
    pub fn of_this_process() -> io::Result<Self> {
        Ok(Self {
            exe: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// A listening socket as it is handed over: a duplicate of ours.
#[derive(Debug)]
pub struct HandoverSocket {
    pub fd: OwnedFd,
    pub name: &'static str,
}

/// A new instance that said it serves.
#[derive(Debug)]
pub struct Successor {
    pub pid: u32,
    channel: BufReader<tokio::net::UnixStream>,
}

/// Starts `launch` and hands it `sockets`; returns once it serves.
pub async fn start_successor(
    launch: &Launch,
    sockets: &[HandoverSocket],
) -> Result<Successor, UpgradeError> {
    if sockets.len() > MAX_SOCKETS {
        return Err(UpgradeError::TooMany(sockets.len()));
    }
    let (ours, theirs) = UnixStream::pair().map_err(UpgradeError::Send)?;
    spawn_detached(launch, &theirs)?;
    drop(theirs);
    send_sockets(&ours, sockets).map_err(UpgradeError::Send)?;
    ours.set_nonblocking(true).map_err(UpgradeError::Send)?;
    let pair = tokio::net::UnixStream::from_std(ours).map_err(UpgradeError::Send)?;
    let mut channel = BufReader::new(pair);
    let pid = match next_line(&mut channel).await?.strip_prefix("started ") {
        Some(pid) => pid
            .parse()
            .map_err(|_| UpgradeError::NotReady(format!("it sent pid {pid:?}")))?,
        None => return Err(UpgradeError::NotReady("it did not say it started".into())),
    };
    match next_line(&mut channel).await {
        Ok(line) if line == "ready" => Ok(Successor { pid, channel }),
        Ok(line) => Err(UpgradeError::NotReady(format!("it said {line:?}"))),
        Err(e) => {
            // Stuck or gone: either way not ours to keep.
            if let Some(pid) = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            Err(e)
        }
    }
}

/// One line from the new instance, within [`READY_TIMEOUT`].
async fn next_line(
    channel: &mut BufReader<tokio::net::UnixStream>,
) -> Result<String, UpgradeError> {
    let mut line = String::new();
    match tokio::time::timeout(READY_TIMEOUT, channel.read_line(&mut line)).await {
        Err(_) => Err(UpgradeError::Timeout(READY_TIMEOUT)),
        Ok(Ok(0)) => Err(UpgradeError::NotReady("its log says why".into())),
        Ok(Ok(_)) => Ok(line.trim_end().to_owned()),
        Ok(Err(e)) => Err(UpgradeError::NotReady(e.to_string())),
    }
}

/// Starts the new instance as a grandchild whose parent exits at once, so
/// that it is re-parented to the service manager (PID 1, or the nearest
/// subreaper) before we name it the main PID. systemd supervises a main
/// PID that is not its own child only half: on `systemctl stop` it sent
/// SIGTERM and SIGKILL together (seen on systemd 252, the package check),
/// which cut the drain and left the routing behind.
fn spawn_detached(launch: &Launch, theirs: &UnixStream) -> Result<(), UpgradeError> {
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(&launch.exe);
    cmd.args(&launch.args)
        .env(ENV_FD, fd.to_string())
        .stdin(Stdio::null());
    // SAFETY: only fcntl, fork and _exit, all async-signal-safe, between
    // fork and exec; the intermediate process runs no Rust code after its
    // fork.
    unsafe {
        cmd.pre_exec(move || {
            // The pair is close-on-exec like every descriptor of ours;
            // this one end must survive into the new binary.
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            match libc::fork() {
                -1 => Err(io::Error::last_os_error()),
                0 => Ok(()),
                _ => libc::_exit(0),
            }
        });
    }
    let mut intermediate = cmd.spawn().map_err(|source| UpgradeError::Spawn {
        exe: launch.exe.clone(),
        source,
    })?;
    // It exits at once; reap it.
    let _ = intermediate.wait();
    Ok(())
}

fn send_sockets(pair: &UnixStream, sockets: &[HandoverSocket]) -> io::Result<()> {
    let mut line = String::from(HELLO);
    for s in sockets {
        line.push(' ');
        line.push_str(s.name);
    }
    line.push('\n');
    let fds: Vec<RawFd> = sockets.iter().map(|s| s.fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(
        pair.as_raw_fd(),
        &[IoSlice::new(line.as_bytes())],
        &rights,
        MsgFlags::empty(),
        None,
    )?;
    if sent != line.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short handover message",
        ));
    }
    Ok(())
}

impl Successor {
    /// Tells the new instance that we no longer accept and that the
    /// routing is free to take over.
    pub async fn release(mut self) {
        if let Err(e) = self.channel.get_mut().write_all(b"released\n").await {
            tracing::warn!(error = %e, "upgrade: cannot tell the new instance it may take over the routing");
        }
    }
}

/// A handover as received: the channel and the named sockets.
pub type Received = (Predecessor, Vec<(OwnedFd, String)>);

/// This process's side of a handover, when it was started by SIGUSR2.
#[derive(Debug)]
pub struct Predecessor {
    channel: UnixStream,
}

impl Predecessor {
    /// Takes the handover named by [`ENV_FD`], if any, and its sockets;
    /// removes the variable so that nothing we start inherits it.
    ///
    /// # Safety
    /// Changes the environment: call it before any thread is started.
    pub unsafe fn from_env() -> Result<Option<Received>, UpgradeError> {
        let Some(value) = std::env::var_os(ENV_FD) else {
            return Ok(None);
        };
        // SAFETY: the caller runs this before any other thread exists.
        unsafe { std::env::remove_var(ENV_FD) };
        let fd: RawFd = value
            .to_str()
            .and_then(|v| v.parse().ok())
            .filter(|fd| *fd > 2)
            .ok_or_else(|| {
                UpgradeError::Receive(format!("{} is not a descriptor", value.display()))
            })?;
        // The descriptor must be the socket pair our predecessor left open.
        if rustix::net::sockopt::socket_type(
            // SAFETY: only borrowed for the check; fd validity is what it checks.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        )
        .is_err()
        {
            return Err(UpgradeError::Receive(format!(
                "descriptor {fd} is not a socket"
            )));
        }
        // SAFETY: the predecessor passed it to us, open; nothing else owns it.
        let channel = unsafe { UnixStream::from_raw_fd(fd) };
        set_cloexec(&channel).map_err(|e| UpgradeError::Receive(e.to_string()))?;
        channel
            .set_read_timeout(Some(READY_TIMEOUT))
            .map_err(|e| UpgradeError::Receive(e.to_string()))?;
        let sockets = receive_sockets(&channel).map_err(UpgradeError::Receive)?;
        let mut predecessor = Self { channel };
        predecessor
            .channel
            .write_all(format!("started {}\n", std::process::id()).as_bytes())
            .map_err(|e| UpgradeError::Receive(e.to_string()))?;
        Ok(Some((predecessor, sockets)))
    }

    /// Tells the old instance that we serve.
    pub fn ready(&mut self) -> io::Result<()> {
        self.channel.write_all(b"ready\n")
    }

    /// Waits until the old instance has stopped accepting and released
    /// the routing (or has died, which releases it too).
    pub async fn released(self) {
        let channel = self.channel;
        let _ = channel.set_read_timeout(None);
        if channel.set_nonblocking(true).is_err() {
            return;
        }
        let Ok(mut channel) = tokio::net::UnixStream::from_std(channel) else {
            return;
        };
        // "released\n", or the end of the stream: both mean go ahead.
        let mut buf = [0u8; 16];
        let _ = channel.read(&mut buf).await;
    }
}

fn set_cloexec(channel: &UnixStream) -> io::Result<()> {
    rustix::io::fcntl_setfd(channel, rustix::io::FdFlags::CLOEXEC).map_err(io::Error::from)
}

fn receive_sockets(channel: &UnixStream) -> Result<Vec<(OwnedFd, String)>, String> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut space = nix::cmsg_space!([RawFd; MAX_SOCKETS]);
    let (bytes, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            channel.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| format!("receiving the sockets: {e}"))?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(|e| e.to_string())? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: the kernel just installed these descriptors in
                // this process for us; nothing else owns them.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err("the handover carried more sockets than fit".into());
        }
        (msg.bytes, fds)
    };
    let text = std::str::from_utf8(&buf[..bytes]).map_err(|_| "the handover is not text")?;
    let names = text
        .strip_suffix('\n')
        .and_then(|line| line.strip_prefix(HELLO))
        .ok_or_else(|| format!("unexpected handover {text:?}"))?;
    let names: Vec<String> = names.split_whitespace().map(str::to_owned).collect();
    if names.len() != fds.len() {
        return Err(format!(
            "the handover names {} sockets but carries {}",
            names.len(),
            fds.len()
        ));
    }
    Ok(fds.into_iter().zip(names).collect())
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, UdpSocket};

    use super::*;

    #[test]
    fn the_handover_carries_each_socket_with_its_name() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (tcp_addr, udp_addr) = (tcp.local_addr().unwrap(), udp.local_addr().unwrap());
        let sockets = [
            HandoverSocket {
                fd: tcp.into(),
                name: "tcp",
            },
            HandoverSocket {
                fd: udp.into(),
                name: "udp",
            },
        ];
        let (old, new) = UnixStream::pair().unwrap();
        send_sockets(&old, &sockets).unwrap();
        let received = receive_sockets(&new).unwrap();
        let names: Vec<&str> = received.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["tcp", "udp"]);
        let tcp_back = TcpListener::from(received[0].0.try_clone().unwrap());
        let udp_back = UdpSocket::from(received[1].0.try_clone().unwrap());
        assert_eq!(tcp_back.local_addr().unwrap(), tcp_addr);
        assert_eq!(udp_back.local_addr().unwrap(), udp_addr);
    }

    #[test]
    fn a_message_that_is_not_a_handover_is_refused() {
        let (old, new) = UnixStream::pair().unwrap();
        (&old).write_all(b"GET / HTTP/1.0\n").unwrap();
        let err = receive_sockets(&new).unwrap_err();
        assert!(err.contains("unexpected handover"), "{err}");
    }

    #[test]
    fn names_and_sockets_must_match_in_number() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let (old, new) = UnixStream::pair().unwrap();
        let fds = [tcp.as_raw_fd()];
        let line = format!("{HELLO} tcp udp\n");
        sendmsg::<()>(
            old.as_raw_fd(),
            &[IoSlice::new(line.as_bytes())],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        let err = receive_sockets(&new).unwrap_err();
        assert!(err.contains("names 2 sockets but carries 1"), "{err}");
    }
}
