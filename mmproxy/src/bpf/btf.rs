//! Just enough of the BPF Type Format to find struct member offsets in the
//! running kernel's `/sys/kernel/btf/vmlinux`.
//!
//! The verdict program reads `TCP_SKB_CB(skb)->seq` and `->end_seq`, which
//! live in `sk_buff.cb`; their offsets differ between kernel builds, so
//! they come from BTF at start-up, never from constants. Hand-written
//! because aya-obj keeps member offsets crate-private and btf-rs is
//! LGPL-2.1 (awkward to link statically into an MIT/Apache binary); the
//! format is small and stable (Documentation/bpf/btf.rst).

use std::{fs, path::Path};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;

/// Why an offset could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF data (bad magic or header)")]
    BadHeader,
    #[error("BTF type {0} runs past the end of the type section")]
    Truncated(u32),
    #[error("BTF kind {0} is unknown to this reader")]
    UnknownKind(u32),
    #[error("no struct {0} in the kernel's BTF")]
    NoStruct(String),
    #[error("struct {0} has no member {1}")]
    NoMember(String, String),
}

/// The type and string sections of a BTF blob, with each type's position.
///
/// Types are not decoded up front: the kernel's BTF has some 150,000 of
/// them, and a decoded copy cost ebpf mode about 20 MiB of peak RSS for two
/// lookups. Only each type's start is kept; members are read on demand.
#[derive(Debug)]
pub struct Btf {
    data: Vec<u8>,
    /// Byte range of the type section in `data`.
    types: std::ops::Range<usize>,
    /// Byte range of the string section in `data`.
    strings: std::ops::Range<usize>,
    /// Index = type id - 1 (id 0 is `void`): the type's offset in the
    /// type section.
    starts: Vec<u32>,
}

/// One type's header fields.
#[derive(Debug, Clone, Copy)]
struct Header {
    kind: u32,
    name: u32,
    vlen: usize,
    kind_flag: bool,
    /// Offset in the type section of what follows `struct btf_type`.
    body: usize,
}

impl Btf {
    /// Reads the running kernel's BTF.
    pub fn from_kernel() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data)
    }

    /// Parses a little-endian BTF blob.
    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
        let magic = data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if magic != Some(BTF_MAGIC) {
            return Err(BtfError::BadHeader);
        }
        let header = |i: usize| {
            word(&data, i)
                .map(|v| v as usize)
                .ok_or(BtfError::BadHeader)
        };
        let hdr_len = header(4)?;
        let (type_off, type_len) = (header(8)?, header(12)?);
        let (str_off, str_len) = (header(16)?, header(20)?);
        let section = |off: usize, len: usize| {
            let range = hdr_len + off..hdr_len + off + len;
            data.get(range.clone())
                .map(|_| range)
                .ok_or(BtfError::BadHeader)
        };
        let types = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        let starts = type_starts(&data[types.clone()])?;
        Ok(Self {
            data,
            types,
            strings,
            starts,
        })
    }

    fn type_data(&self) -> &[u8] {
        &self.data[self.types.clone()]
    }

    fn name(&self, offset: u32) -> &[u8] {
        let strings = &self.data[self.strings.clone()];
        let tail = strings.get(offset as usize..).unwrap_or_default();
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        &tail[..end]
    }

    fn header(&self, index: usize) -> Option<Header> {
        let pos = *self.starts.get(index)? as usize;
        header_at(self.type_data(), pos)
    }

    /// `(name offset, type id, bit offset)` of a struct or union member.
    fn member(&self, t: &Header, m: usize) -> Option<(u32, u32, u32)> {
        let at = t.body + 12 * m;
        let data = self.type_data();
        let (name, type_id, offset) = (word(data, at)?, word(data, at + 4)?, word(data, at + 8)?);
        // With kind_flag, the low 24 bits are the bit offset and the high 8
        // the bitfield size.
        let bit_offset = if t.kind_flag {
            offset & 0x00ff_ffff
        } else {
            offset
        };
        Some((name, type_id, bit_offset))
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous
    /// struct and union members (where `sk_buff` keeps many fields).
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        self.member_bit_offset(name, member).map(|bits| bits / 8)
    }

    /// Bit offset of `member` in `struct name`: for a bitfield such as
    /// `sk_buff.ip_summed`, where its first bit lies.
    pub fn member_bit_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = (0..self.starts.len())
            .find(|&i| {
                self.header(i)
                    .is_some_and(|t| t.kind == KIND_STRUCT && self.name(t.name) == name.as_bytes())
            })
            .ok_or_else(|| BtfError::NoStruct(name.into()))?;
        self.find_member(id, member)
            .ok_or_else(|| BtfError::NoMember(name.into(), member.into()))
    }

    fn find_member(&self, index: usize, member: &str) -> Option<u32> {
        let t = self.header(index)?;
        for m in 0..t.vlen {
            let (name, type_id, bit_offset) = self.member(&t, m)?;
            if self.name(name) == member.as_bytes() {
                return Some(bit_offset);
            }
            // Anonymous struct/union: search inside, adding its offset.
            if name == 0 && type_id > 0 {
                let inner = type_id as usize - 1;
                let is_aggregate = self
                    .header(inner)
                    .is_some_and(|t| matches!(t.kind, KIND_STRUCT | KIND_UNION));
                if is_aggregate && let Some(off) = self.find_member(inner, member) {
                    return Some(bit_offset + off);
                }
            }
        }
        None
    }
}

fn word(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn header_at(data: &[u8], pos: usize) -> Option<Header> {
    let (name, info) = (word(data, pos)?, word(data, pos + 4)?);
    Some(Header {
        kind: (info >> 24) & 0x1f,
        name,
        vlen: (info & 0xffff) as usize,
        kind_flag: info >> 31 == 1,
        body: pos + 12,
    })
}

/// Walks the type section once, checking each type's size, and returns
/// where each type starts.
fn type_starts(data: &[u8]) -> Result<Vec<u32>, BtfError> {
    let mut starts = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let id = u32::try_from(starts.len() + 1).unwrap_or(u32::MAX);
        let t = header_at(data, pos).ok_or(BtfError::Truncated(id))?;
        // Bytes that follow `struct btf_type` for each kind (btf.rst).
        let extra = match t.kind {
            1 | 14 | 17 => 4,                            // INT, VAR, DECL_TAG
            2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0, // PTR .. TYPE_TAG
            3 => 12,                                     // ARRAY
            4 | 5 | 15 | 19 => 12 * t.vlen,              // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * t.vlen,                        // ENUM, FUNC_PROTO
            other => return Err(BtfError::UnknownKind(other)),
        };
        starts.push(u32::try_from(pos).map_err(|_| BtfError::Truncated(id))?);
        pos = t.body + extra;
        if pos > data.len() {
            return Err(BtfError::Truncated(id));
        }
    }
    Ok(starts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_kernel_offsets_the_verdict_needs() {
        let Ok(btf) = Btf::from_kernel() else {
            eprintln!("SKIPPED: this kernel exposes no /sys/kernel/btf/vmlinux");
            return;
        };
        let cb = btf.member_offset("sk_buff", "cb").unwrap();
        assert_eq!(btf.member_offset("tcp_skb_cb", "seq").unwrap(), 0);
        assert_eq!(btf.member_offset("tcp_skb_cb", "end_seq").unwrap(), 4);
        // `len` lives in sk_buff proper, after cb.
        let len = btf.member_offset("sk_buff", "len").unwrap();
        assert!(cb > 0 && len > cb, "cb at {cb}, len at {len}");
        // Cross-check against bpftool where it is installed.
        if let Ok(out) = std::process::Command::new("bpftool")
            .args([
                "btf",
                "dump",
                "file",
                "/sys/kernel/btf/vmlinux",
                "format",
                "raw",
            ])
            .output()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            let mut in_skb = false;
            for line in text.lines() {
                if line.starts_with('[') {
                    in_skb = line.contains("STRUCT 'sk_buff'");
                } else if in_skb && line.trim_start().starts_with("'cb'") {
                    let bits: u32 = line
                        .split("bits_offset=")
                        .nth(1)
                        .and_then(|s| s.split_whitespace().next())
                        .and_then(|s| s.parse().ok())
                        .unwrap();
                    assert_eq!(bits / 8, cb);
                }
            }
        }
    }

    #[test]
    fn finds_the_checksum_state_bits_the_udp_program_reads() {
        let Ok(btf) = Btf::from_kernel() else {
            eprintln!("SKIPPED: this kernel exposes no /sys/kernel/btf/vmlinux");
            return;
        };
        let bits = btf.member_bit_offset("sk_buff", "ip_summed").unwrap();
        let len = btf.member_offset("sk_buff", "len").unwrap();
        // A 2-bit field among the flag bytes after `len`, inside sk_buff.
        assert!(bits / 8 > len && bits / 8 < 256, "ip_summed at bit {bits}");
        if let Ok(out) = std::process::Command::new("bpftool")
            .args([
                "btf",
                "dump",
                "file",
                "/sys/kernel/btf/vmlinux",
                "format",
                "raw",
            ])
            .output()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            let listed = text
                .lines()
                .filter(|l| l.trim_start().starts_with("'ip_summed'"))
                .any(|l| l.contains(&format!("bits_offset={bits} ")));
            assert!(
                listed || text.is_empty(),
                "bpftool lists ip_summed elsewhere"
            );
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            Btf::parse(b"not btf".to_vec()),
            Err(BtfError::BadHeader)
        ));
        assert!(matches!(
            Btf::parse(vec![0x9f, 0xeb, 1, 0]),
            Err(BtfError::BadHeader)
        ));
    }
}
