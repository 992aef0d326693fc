//! Parse time per header, mmproxy's parser beside the `ppp` crate:
//! v1 IPv4, v2 IPv4, and v2 IPv6 with TLVs (ALPN, AUTHORITY, UNIQUE_ID,
//! SSL with sub-TLVs), without and with a CRC32C TLV. Both parsers read the same bytes; ppp's
//! TLVs are iterated too, so both do the whole job.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use mmproxy::proxy_protocol::{self, Status, TlvType, Transport, V2Builder};

fn headers() -> [(&'static str, Vec<u8>); 4] {
    let v1 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n".to_vec();
    let v2_v4 = V2Builder::proxy(
        Transport::Stream,
        "192.0.2.1:56324".parse().unwrap(),
        "198.51.100.2:443".parse().unwrap(),
    )
    .build()
    .unwrap();
    let mut ssl = vec![0x07, 0, 0, 0, 0, 0x21, 0, 7];
    ssl.extend_from_slice(b"TLSv1.3");
    let v2_v6_tlvs = V2Builder::proxy(
        Transport::Stream,
        "[2001:db8::1]:40000".parse().unwrap(),
        "[2001:db8::2]:443".parse().unwrap(),
    )
    .tlv(TlvType::ALPN, b"h2")
    .tlv(TlvType::AUTHORITY, b"www.example.com")
    .tlv(TlvType::UNIQUE_ID, &[0x5a; 32])
    .tlv(TlvType::SSL, &ssl);
    // ppp does not verify CRC32C; the header without it compares like
    // with like, the one with it shows the cost of checking.
    let without_crc = v2_v6_tlvs.build().unwrap();
    let with_crc = v2_v6_tlvs.with_crc32c().build().unwrap();
    [
        ("v1_ipv4", v1),
        ("v2_ipv4", v2_v4),
        ("v2_ipv6_tlvs", without_crc),
        ("v2_ipv6_tlvs_crc32c", with_crc),
    ]
}

fn ours(bytes: &[u8]) -> usize {
    match proxy_protocol::parse(bytes) {
        Ok(Status::Complete(h, n)) => n + h.tlvs.iter().count(),
        _ => panic!("benchmark header did not parse"),
    }
}

fn ppp(bytes: &[u8]) -> usize {
    match ppp::HeaderResult::parse(bytes) {
        ppp::HeaderResult::V1(Ok(h)) => h.header.len(),
        ppp::HeaderResult::V2(Ok(h)) => h.len() + h.tlvs().flatten().count(),
        _ => panic!("benchmark header did not parse with ppp"),
    }
}

fn parse(c: &mut Criterion) {
    for (name, bytes) in headers() {
        let mut group = c.benchmark_group(name);
        group.bench_function("mmproxy", |b| b.iter(|| ours(black_box(&bytes))));
        group.bench_function("ppp", |b| b.iter(|| ppp(black_box(&bytes))));
        group.finish();
    }
}

criterion_group!(benches, parse);
criterion_main!(benches);
