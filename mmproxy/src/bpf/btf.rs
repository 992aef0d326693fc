//! Just enough of the BPF Type Format to find struct member offsets in the
//! running kernel's `/sys/kernel/btf/vmlinux`.
//!
//! The verdict program reads `TCP_SKB_CB(skb)->seq` and `->end_seq`, which
//! live in `sk_buff.cb`; their offsets differ between kernel builds, so
//! they come from BTF at start-up, never from constants. Hand-written
//! because aya-obj keeps member offsets crate-private and btf-rs is
//! LGPL-2.1 (awkward to link statically into an MIT/Apache binary); the
//! format is small and stable (Documentation/bpf/btf.rst).
//!
//! The file is read in passes, never held whole: the kernel's BTF is
//! 5.2 MiB (3.2 MiB of types, some 150,000 of them, and 2.3 MiB of
//! strings), and holding it raised ebpf mode's start-up peak RSS by
//! 5.9 MiB for three lookups. One pass over the types keeps the header of
//! each struct and union; a lookup finds its two names in one pass over
//! the strings, then reads only the members it walks.

use std::{
    fs::File,
    io::{self, BufRead as _, BufReader, Read, Seek, SeekFrom},
    path::Path,
};

const BTF_MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
/// Bytes of `struct btf_type`, and of one struct or union member.
const TYPE_HEADER_BYTES: u64 = 12;
const MEMBER_BYTES: usize = 12;

/// Why an offset could not be found.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read {origin}")]
    Read {
        origin: String,
        #[source]
        source: io::Error,
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

/// A BTF blob being read from `source`, with the header of each struct
/// and union.
#[derive(Debug)]
pub struct Btf<R> {
    source: R,
    /// What `source` is, for errors.
    origin: String,
    types: Section,
    strings: Section,
    /// Every struct and union, by ascending type id.
    aggregates: Vec<Aggregate>,
}

/// Where a section lies in the source, in bytes.
#[derive(Debug, Clone, Copy)]
struct Section {
    start: u64,
    len: u64,
}

/// A struct or union's `struct btf_type`, and where its members start.
#[derive(Debug, Clone, Copy)]
struct Aggregate {
    id: u32,
    kind: u32,
    name: u32,
    vlen: usize,
    kind_flag: bool,
    /// Offset of the first member in the type section.
    members: u64,
}

/// One member: `(name offset, type id, bit offset)`.
type Member = (u32, u32, u32);

impl Btf<File> {
    /// Reads the running kernel's BTF.
    pub fn from_kernel() -> Result<Self, BtfError> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let origin = path.display().to_string();
        let file = File::open(path).map_err(|source| BtfError::Read {
            origin: origin.clone(),
            source,
        })?;
        Self::parse(file, origin)
    }
}

impl<R: Read + Seek> Btf<R> {
    /// Reads a little-endian BTF blob's header and walks its types once.
    pub fn parse(mut source: R, origin: String) -> Result<Self, BtfError> {
        let fail = |source| BtfError::Read {
            origin: origin.clone(),
            source,
        };
        let len = source.seek(SeekFrom::End(0)).map_err(fail)?;
        source.seek(SeekFrom::Start(0)).map_err(fail)?;
        let mut header = [0u8; 24];
        source.read_exact(&mut header).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => BtfError::BadHeader,
            _ => fail(e),
        })?;
        if u16::from_le_bytes([header[0], header[1]]) != BTF_MAGIC {
            return Err(BtfError::BadHeader);
        }
        let field = |i: usize| u64::from(word(&header, i).unwrap_or_default());
        let hdr_len = field(4);
        let section = |off: u64, size: u64| {
            let start = hdr_len + off;
            (start + size <= len)
                .then_some(Section { start, len: size })
                .ok_or(BtfError::BadHeader)
        };
        let types = section(field(8), field(12))?;
        let strings = section(field(16), field(20))?;
        let aggregates = aggregates(&mut source, types).map_err(|e| match e {
            WalkError::Btf(e) => e,
            WalkError::Io(e) => fail(e),
        })?;
        Ok(Self {
            source,
            origin,
            types,
            strings,
            aggregates,
        })
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous
    /// struct and union members (where `sk_buff` keeps many fields).
    pub fn member_offset(&mut self, name: &str, member: &str) -> Result<u32, BtfError> {
        self.member_bit_offset(name, member).map(|bits| bits / 8)
    }

    /// Bit offset of `member` in `struct name`: for a bitfield such as
    /// `sk_buff.ip_summed`, where its first bit lies.
    pub fn member_bit_offset(&mut self, name: &str, member: &str) -> Result<u32, BtfError> {
        let [names, members] = self
            .string_offsets([name, member])
            .map_err(|e| self.fail(e))?;
        let outer = self
            .aggregates
            .iter()
            .find(|t| t.kind == KIND_STRUCT && names.contains(&t.name))
            .copied()
            .ok_or_else(|| BtfError::NoStruct(name.into()))?;
        self.find_member(&outer, &members)
            .map_err(|e| self.fail(e))?
            .ok_or_else(|| BtfError::NoMember(name.into(), member.into()))
    }

    fn fail(&self, source: io::Error) -> BtfError {
        BtfError::Read {
            origin: self.origin.clone(),
            source,
        }
    }

    /// Bit offset of a member named at one of `names` in `t`, or in an
    /// anonymous struct or union inside it.
    fn find_member(&mut self, t: &Aggregate, names: &[u32]) -> io::Result<Option<u32>> {
        for (name, type_id, bit_offset) in self.members(t)? {
            if names.contains(&name) {
                return Ok(Some(bit_offset));
            }
            if name == 0
                && let Some(inner) = self.aggregate(type_id)
                && let Some(off) = self.find_member(&inner, names)?
            {
                return Ok(Some(bit_offset + off));
            }
        }
        Ok(None)
    }

    fn aggregate(&self, id: u32) -> Option<Aggregate> {
        let i = self.aggregates.binary_search_by_key(&id, |t| t.id).ok()?;
        Some(self.aggregates[i])
    }

    /// Reads `t`'s members.
    fn members(&mut self, t: &Aggregate) -> io::Result<Vec<Member>> {
        let mut raw = vec![0u8; MEMBER_BYTES * t.vlen];
        self.source
            .seek(SeekFrom::Start(self.types.start + t.members))?;
        self.source.read_exact(&mut raw)?;
        Ok(raw
            .chunks_exact(MEMBER_BYTES)
            .map(|m| {
                let (name, type_id, offset) = (
                    word(m, 0).unwrap_or_default(),
                    word(m, 4).unwrap_or_default(),
                    word(m, 8).unwrap_or_default(),
                );
                // With kind_flag, the low 24 bits are the bit offset and
                // the high 8 the bitfield size.
                let bit_offset = if t.kind_flag {
                    offset & 0x00ff_ffff
                } else {
                    offset
                };
                (name, type_id, bit_offset)
            })
            .collect())
    }

    /// The offsets in the string section at which each of `wanted` is
    /// stored (usually once: the strings are deduplicated), in one pass.
    fn string_offsets<const N: usize>(&mut self, wanted: [&str; N]) -> io::Result<[Vec<u32>; N]> {
        let mut found: [Vec<u32>; N] = std::array::from_fn(|_| Vec::new());
        self.source.seek(SeekFrom::Start(self.strings.start))?;
        let mut strings = BufReader::new((&mut self.source).take(self.strings.len));
        let mut at = 0u32;
        let mut string = Vec::new();
        loop {
            string.clear();
            let read = strings.read_until(0, &mut string)?;
            if read == 0 {
                return Ok(found);
            }
            let text = string.strip_suffix(&[0]).unwrap_or(&string);
            for (i, name) in wanted.iter().enumerate() {
                if text == name.as_bytes() {
                    found[i].push(at);
                }
            }
            at = at.saturating_add(u32::try_from(read).unwrap_or(u32::MAX));
        }
    }
}

/// Why the walk over the types stopped.
enum WalkError {
    Btf(BtfError),
    Io(io::Error),
}

/// Walks the type section once, checking each type's size, and keeps the
/// structs and unions.
fn aggregates<R: Read + Seek>(source: &mut R, types: Section) -> Result<Vec<Aggregate>, WalkError> {
    source
        .seek(SeekFrom::Start(types.start))
        .map_err(WalkError::Io)?;
    let mut reader = BufReader::new(source.take(types.len));
    let mut found = Vec::new();
    let (mut pos, mut id) = (0u64, 0u32);
    let mut header = [0u8; 12];
    while pos < types.len {
        id += 1;
        if pos + TYPE_HEADER_BYTES > types.len {
            return Err(WalkError::Btf(BtfError::Truncated(id)));
        }
        reader.read_exact(&mut header).map_err(WalkError::Io)?;
        let (name, info) = (
            word(&header, 0).unwrap_or_default(),
            word(&header, 4).unwrap_or_default(),
        );
        let (kind, vlen) = ((info >> 24) & 0x1f, u64::from(info & 0xffff));
        // Bytes that follow `struct btf_type` for each kind (btf.rst).
        let extra = match kind {
            1 | 14 | 17 => 4,                            // INT, VAR, DECL_TAG
            2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0, // PTR .. TYPE_TAG
            3 => 12,                                     // ARRAY
            4 | 5 | 15 | 19 => 12 * vlen,                // STRUCT, UNION, DATASEC, ENUM64
            6 | 13 => 8 * vlen,                          // ENUM, FUNC_PROTO
            other => return Err(WalkError::Btf(BtfError::UnknownKind(other))),
        };
        let members = pos + TYPE_HEADER_BYTES;
        if members + extra > types.len {
            return Err(WalkError::Btf(BtfError::Truncated(id)));
        }
        if matches!(kind, KIND_STRUCT | KIND_UNION) {
            found.push(Aggregate {
                id,
                kind,
                name,
                vlen: usize::try_from(vlen).unwrap_or_default(),
                kind_flag: info >> 31 == 1,
                members,
            });
        }
        let skip = i64::try_from(extra).map_err(|_| WalkError::Btf(BtfError::Truncated(id)))?;
        reader.seek_relative(skip).map_err(WalkError::Io)?;
        pos = members + extra;
    }
    Ok(found)
}

fn word(data: &[u8], at: usize) -> Option<u32> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_kernel_offsets_the_verdict_needs() {
        let Ok(mut btf) = Btf::from_kernel() else {
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
        let Ok(mut btf) = Btf::from_kernel() else {
            eprintln!("SKIPPED: this kernel exposes no /sys/kernel/btf/vmlinux");
            return;
        };
        let bits = btf.member_bit_offset("sk_buff", "ip_summed").unwrap();
        let len = btf.member_offset("sk_buff", "len").unwrap();
        // A 2-bit field among the flag bytes after `len`, inside sk_buff.
        // (No bpftool cross-check as for `cb`: ip_summed sits in an
        // anonymous struct, whose members bpftool lists at offsets relative
        // to that struct, not to sk_buff.)
        assert!(bits / 8 > len && bits / 8 < 256, "ip_summed at bit {bits}");
    }

    #[test]
    fn rejects_garbage() {
        let parse = |bytes: &[u8]| Btf::parse(std::io::Cursor::new(bytes.to_vec()), "test".into());
        assert!(matches!(parse(b"not btf"), Err(BtfError::BadHeader)));
        assert!(matches!(
            parse(&[0x9f, 0xeb, 1, 0]),
            Err(BtfError::BadHeader)
        ));
    }
}
