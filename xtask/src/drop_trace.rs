//! `cargo xtask soak --trace-drops`: records every skb the kernel drops
//! (tracepoint `skb:kfree_skb`, with its drop reason) and every TCP
//! retransmission while the soak runs, and prints how many of each.
//!
//! kprobes are not available on the project's machines; tracepoints are.
//! This is how a stall was traced (2026-12-03) to a backend dropping the
//! upstream socket's segments as beyond its window (docs/ebpf-findings.md,
//! "The stall, traced"). Tracepoints see the whole machine, not one network
//! namespace: run it on a machine doing nothing else.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Child, Command},
};

use anyhow::{Context as _, Result, bail};

/// Where tracefs is mounted, newest convention first.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
/// A tracing instance of our own, so the global buffer is left alone.
const INSTANCE: &str = "instances/mmproxy-soak";
const EVENTS: [&str; 2] = ["skb/kfree_skb", "tcp/tcp_retransmit_skb"];
/// The psock worker frees each skb it sent in full with `kfree_skb`
/// (`sk_psock_backlog`, net/core/skmsg.c): a completion, not a drop.
const NOT_A_DROP: &str = "location.function != sk_psock_backlog";

/// A running recording; [`DropTrace::finish`] stops it. Dropped without
/// `finish` (a soak that failed), it still stops the reader and removes
/// the instance.
pub(crate) struct DropTrace {
    reader: Child,
    instance: Instance,
    out: PathBuf,
}

/// Our tracing instance, removed when dropped, so that a start that fails
/// half way leaves no instance tracing behind.
struct Instance(PathBuf);

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = fs::write(self.0.join("tracing_on"), "0");
        // Fails harmlessly when finish() has already removed it.
        let _ = fs::remove_dir(&self.0);
    }
}

impl Drop for DropTrace {
    fn drop(&mut self) {
        // The reader holds trace_pipe open, which keeps the instance busy:
        // it goes first (fields drop after this, the instance last).
        let _ = self.reader.kill();
        let _ = self.reader.wait();
    }
}

impl DropTrace {
    /// Starts recording into `out` (the raw `trace_pipe` text).
    pub(crate) fn start(out: &Path) -> Result<Self> {
        let Some(tracefs) = TRACEFS
            .iter()
            .map(Path::new)
            .find(|p| p.join("instances").is_dir())
        else {
            bail!("no tracefs at {TRACEFS:?} (mount it, and run as root)");
        };
        let path = tracefs.join(INSTANCE);
        if !path.is_dir() {
            fs::create_dir(&path)
                .with_context(|| format!("creating the tracing instance {}", path.display()))?;
        }
        let instance = Instance(path);
        write(&instance.0, "events/skb/kfree_skb/filter", NOT_A_DROP)?;
        for event in EVENTS {
            write(&instance.0, &format!("events/{event}/enable"), "1")?;
        }
        write(&instance.0, "trace", "")?;
        write(&instance.0, "tracing_on", "1")?;
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let reader = Command::new("cat")
            .arg(instance.0.join("trace_pipe"))
            .stdout(file)
            .spawn()
            .context("starting cat on trace_pipe")?;
        Ok(Self {
            reader,
            instance,
            out: out.to_owned(),
        })
    }

    /// Stops recording, removes the instance, and returns one line per drop
    /// reason and one for retransmissions, with their counts.
    pub(crate) fn finish(mut self) -> Result<String> {
        write(&self.instance.0, "tracing_on", "0")?;
        // cat has read everything the kernel handed it; what is left in the
        // buffer after tracing stopped is at most a page.
        let _ = self.reader.kill();
        let _ = self.reader.wait();
        fs::remove_dir(&self.instance.0)
            .with_context(|| format!("removing {}", self.instance.0.display()))?;
        let text = fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}", self.out.display()))?;
        Ok(summarize(&text))
    }
}

fn write(instance: &Path, file: &str, value: &str) -> Result<()> {
    let path = instance.join(file);
    fs::write(&path, value).with_context(|| format!("writing {value:?} to {}", path.display()))
}

/// Counts drops per reason and dropping function (`NOT_SPECIFIED` alone
/// says little), and retransmissions.
fn summarize(text: &str) -> String {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for line in text.lines() {
        if line.contains("tcp_retransmit_skb:") {
            *counts
                .entry("(tcp retransmissions)".to_owned())
                .or_default() += 1;
        } else if let Some((head, reason)) = line.split_once("reason: ") {
            let function = head
                .split_once("location=")
                .and_then(|(_, rest)| rest.split(['+', ' ']).next())
                .unwrap_or("?");
            *counts
                .entry(format!("{} in {function}", reason.trim()))
                .or_default() += 1;
        }
    }
    let mut summary = String::new();
    for (reason, n) in counts {
        let _ = writeln!(summary, "{n:>9} {reason}");
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::summarize;

    #[test]
    fn counts_drops_by_reason_and_function_and_retransmissions() {
        let trace = "\
 ksoftirqd/1-22 [001] ..s1. 24151.97: kfree_skb: skbaddr=0000 rx_sk=0000 protocol=2048 location=tcp_validate_incoming+0x16b/0x880 reason: TCP_INVALID_SEQUENCE
 ksoftirqd/1-22 [001] ..s1. 24151.98: kfree_skb: skbaddr=0000 rx_sk=0000 protocol=2048 location=tcp_validate_incoming+0x16b/0x880 reason: TCP_INVALID_SEQUENCE
 <idle>-0 [000] .Ns2. 24151.99: tcp_retransmit_skb: skbaddr=0000 skaddr=0000 family=AF_INET sport=30116 dport=9000
 tokio-rt-worker-1 [000] ..s1. 24152.00: kfree_skb: skbaddr=0000 rx_sk=0000 protocol=2048 location=tcp_data_queue+0x7a5/0xe70 reason: PROTO_MEM
";
        assert_eq!(
            summarize(trace),
            "        1 (tcp retransmissions)\n        1 PROTO_MEM in tcp_data_queue\n        2 TCP_INVALID_SEQUENCE in tcp_validate_incoming\n"
        );
    }
}
