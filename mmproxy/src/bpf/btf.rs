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

/// One parsed type: kind, name and, for structs and unions, members.
#[derive(Debug, Clone)]
struct Type {
    kind: u32,
    name: u32,
    /// (name offset, type id, bit offset) for structs and unions.
    members: Vec<(u32, u32, u32)>,
}

/// The type and string sections of a BTF blob.
#[derive(Debug)]
pub struct Btf {
    /// Index = type id - 1 (id 0 is `void`).
    types: Vec<Type>,
    strings: Vec<u8>,
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
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob.
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let u32_at = |off: usize| -> Option<u32> {
            data.get(off..off + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let magic = data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if magic != Some(BTF_MAGIC) {
            return Err(BtfError::BadHeader);
        }
        let header = |i: usize| u32_at(i).map(|v| v as usize).ok_or(BtfError::BadHeader);
        let hdr_len = header(4)?;
        let (type_off, type_len) = (header(8)?, header(12)?);
        let (str_off, str_len) = (header(16)?, header(20)?);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or(BtfError::BadHeader)
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();
        Ok(Self {
            types: parse_types(type_data)?,
            strings,
        })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let tail = self.strings.get(offset as usize..).unwrap_or_default();
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        &tail[..end]
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous
    /// struct and union members (where `sk_buff` keeps many fields).
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = self
            .types
            .iter()
            .position(|t| t.kind == KIND_STRUCT && self.name(t.name) == name.as_bytes())
            .ok_or_else(|| BtfError::NoStruct(name.into()))?;
        self.find_member(id, member)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember(name.into(), member.into()))
    }

    fn find_member(&self, index: usize, member: &str) -> Option<u32> {
        let t = self.types.get(index)?;
        for &(name, type_id, bit_offset) in &t.members {
            if self.name(name) == member.as_bytes() {
                return Some(bit_offset);
            }
            // Anonymous struct/union: search inside, adding its offset.
            if name == 0 && type_id > 0 {
                let inner = type_id as usize - 1;
                let is_aggregate = self
                    .types
                    .get(inner)
                    .is_some_and(|t| matches!(t.kind, KIND_STRUCT | KIND_UNION));
                if is_aggregate && let Some(off) = self.find_member(inner, member) {
                    return Some(bit_offset + off);
                }
            }
        }
        None
    }
}

fn parse_types(data: &[u8]) -> Result<Vec<Type>, BtfError> {
    let mut types = Vec::new();
    let mut pos = 0usize;
    let word = |at: usize| -> Option<u32> {
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    while pos < data.len() {
        let id = u32::try_from(types.len() + 1).unwrap_or(u32::MAX);
        let (name, info) = word(pos)
            .zip(word(pos + 4))
            .ok_or(BtfError::Truncated(id))?;
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kind_flag = info >> 31 == 1;
        pos += 12;
        // Bytes that follow `struct btf_type` for each kind (btf.rst).
        let extra = match kind {
            1 | 14 | 17 => 4,                            // INT, VAR, DECL_TAG
            2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0, // PTR .. TYPE_TAG
            3 => 12,                                     // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen,                // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * vlen,                          // ENUM, FUNC_PROTO
            other => return Err(BtfError::UnknownKind(other)),
        };
        let mut members = Vec::new();
        if matches!(kind, KIND_STRUCT | KIND_UNION) {
            for m in 0..vlen {
                let at = pos + 12 * m;
                let (mname, mtype, moff) = word(at)
                    .zip(word(at + 4))
                    .zip(word(at + 8))
                    .map(|((a, b), c)| (a, b, c))
                    .ok_or(BtfError::Truncated(id))?;
                // With kind_flag, the low 24 bits are the bit offset and the
                // high 8 the bitfield size.
                let bit_offset = if kind_flag { moff & 0x00ff_ffff } else { moff };
                members.push((mname, mtype, bit_offset));
            }
        }
        pos += extra;
        if pos > data.len() {
            return Err(BtfError::Truncated(id));
        }
        types.push(Type {
            kind,
            name,
            members,
        });
    }
    Ok(types)
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
    fn rejects_garbage() {
        assert!(matches!(Btf::parse(b"not btf"), Err(BtfError::BadHeader)));
        assert!(matches!(
            Btf::parse(&[0x9f, 0xeb, 1, 0]),
            Err(BtfError::BadHeader)
        ));
    }
}
