//! The parser's tests: the spec's examples, one test per rule (valid and
//! invalid), every truncation, every one-byte mutation, a property-based
//! round trip, a differential test against the `ppp` crate and a replay of
//! the committed fuzz seeds.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use proptest::prelude::*;

use super::*;

fn complete(buf: &[u8]) -> (Header<'_>, usize) {
    match parse(buf) {
        Ok(Status::Complete(h, n)) => (h, n),
        other => panic!("expected a complete header for {buf:?}, got {other:?}"),
    }
}

fn err(buf: &[u8]) -> Error {
    match parse(buf) {
        Err(e) => e,
        other => panic!(
            "expected an error for {:?}, got {other:?}",
            String::from_utf8_lossy(buf)
        ),
    }
}

fn v4(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

fn v6(s: &str) -> SocketAddrV6 {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Every proper prefix of a valid header must ask for more bytes.
fn assert_every_truncation_incomplete(header: &[u8]) {
    for end in 0..header.len() {
        assert_eq!(
            parse(&header[..end]),
            Ok(Status::Incomplete),
            "prefix of {end} of {} bytes",
            header.len()
        );
    }
}

// ---------------------------------------------------------------- v1

#[test]
fn v1_spec_examples() {
    let line = b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n";
    let (h, n) = complete(line);
    assert_eq!(n, line.len());
    assert_eq!(h.version, Version::V1);
    assert_eq!(h.transport, Transport::Stream);
    assert_eq!(
        h.addresses,
        Addresses::Inet {
            source: v4("255.255.255.255:65535"),
            destination: v4("255.255.255.255:65535")
        }
    );

    // The spec's worst case: 107 bytes with CRLF.
    let line = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(line.len(), 104);
    assert_eq!(complete(line).1, 104);

    assert_eq!(
        complete(b"PROXY UNKNOWN\r\n").0.addresses,
        Addresses::Unspec
    );
    let long_unknown = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(complete(long_unknown).1, long_unknown.len());
}

#[test]
fn v1_tcp4_and_tcp6() {
    let (h, _) = complete(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n");
    assert_eq!(
        h.addresses,
        Addresses::Inet {
            source: v4("192.0.2.1:56324"),
            destination: v4("198.51.100.2:443")
        }
    );
    let (h, _) = complete(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n");
    assert_eq!(
        h.addresses,
        Addresses::Inet6 {
            source: v6("[2001:db8::1]:1"),
            destination: v6("[::1]:65535")
        }
    );
    // Port 0 is a decimal number in range.
    complete(b"PROXY TCP4 192.0.2.1 198.51.100.2 0 0\r\n");
}

#[test]
fn v1_leaves_payload_alone() {
    let mut buf = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n".to_vec();
    let header_len = buf.len();
    buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(complete(&buf).1, header_len);
}

#[test]
fn v1_every_truncation_is_incomplete() {
    assert_every_truncation_incomplete(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n");
    assert_every_truncation_incomplete(b"PROXY UNKNOWN\r\n");
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one table row per rule reads best as one table"
)]
fn v1_invalid() {
    let cases: &[(&[u8], Error)] = &[
        (
            b"PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n",
            Error::V1BadProtocol,
        ),
        (
            b"PROXY tcp4 192.0.2.1 198.51.100.2 1 2\r\n",
            Error::V1BadProtocol,
        ),
        (
            b"PROXY  TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
            Error::V1BadProtocol,
        ),
        (
            b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
            Error::V1BadFields,
        ),
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n",
            Error::V1BadFields,
        ),
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
            Error::V1BadFields,
        ),
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
            Error::V1BadFields,
        ),
        (b"PROXY TCP4\r\n", Error::V1BadFields),
        (b"PROXY \r\n", Error::V1BadProtocol),
        // Family must match the address.
        (b"PROXY TCP4 2001:db8::1 ::1 1 2\r\n", Error::V1BadAddress),
        (
            b"PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
            Error::V1BadAddress,
        ),
        (b"PROXY TCP4 192.0.2.1 ::1 1 2\r\n", Error::V1BadAddress),
        (
            b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n",
            Error::V1BadAddress,
        ),
        (
            b"PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n",
            Error::V1BadAddress,
        ),
        (
            b"PROXY TCP4 192.0.2 198.51.100.2 1 2\r\n",
            Error::V1BadAddress,
        ),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", Error::V1BadAddress),
        // Ports: decimal, 0-65535, no leading zeros, no sign.
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
            Error::V1BadPort,
        ),
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 00\r\n",
            Error::V1BadPort,
        ),
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n",
            Error::V1BadPort,
        ),
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 99999 2\r\n",
            Error::V1BadPort,
        ),
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 100000 2\r\n",
            Error::V1BadPort,
        ),
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n",
            Error::V1BadPort,
        ),
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 0x1 2\r\n",
            Error::V1BadPort,
        ),
        // Line endings and characters.
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
            Error::V1BadCharacter,
        ),
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\rX",
            Error::V1BadCharacter,
        ),
        (
            b"PROXY TCP4 192.0.2.1\t198.51.100.2 1 2\r\n",
            Error::V1BadCharacter,
        ),
        (b"PROXY \xff", Error::V1BadCharacter),
        // An impossible protocol fails before the CRLF arrives.
        (b"PROXY V", Error::V1BadProtocol),
        (b"PROXY  ", Error::V1BadProtocol),
        (b"PROXY TCP4X", Error::V1BadProtocol),
        (b"proxy TCP4", Error::NotProxyProtocol),
        (b"GET / HTTP/1.1\r\n", Error::NotProxyProtocol),
    ];
    for (input, expected) in cases {
        assert_eq!(
            err(input),
            *expected,
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn v1_length_limit() {
    // 107 bytes ending in CRLF: accepted (UNKNOWN ignores its contents).
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(105, b'x');
    line.extend_from_slice(b"\r\n");
    assert_eq!(line.len(), V1_MAX_LEN);
    assert_eq!(complete(&line).1, V1_MAX_LEN);
    // 108: the CR no longer fits.
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(106, b'x');
    line.extend_from_slice(b"\r\n");
    assert_eq!(err(&line), Error::V1TooLong);
    // 107 bytes without any CR: too long, without waiting for more.
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(107, b'x');
    assert_eq!(err(&line), Error::V1TooLong);
    // 106 bytes without CR: may still end properly.
    assert_eq!(parse(&line[..106]), Ok(Status::Incomplete));
}

#[test]
fn v1_encode_round_trips() {
    for (src, dst) in [
        ("192.0.2.1:1", "198.51.100.2:65535"),
        ("[2001:db8::1]:40000", "[::1]:443"),
    ] {
        let mut out = Vec::new();
        encode_v1(Some((sa(src), sa(dst))), &mut out).unwrap();
        let (h, n) = complete(&out);
        assert_eq!(n, out.len());
        assert_eq!(h.addresses.socket_addrs(), Some((sa(src), sa(dst))));
    }
    let mut out = Vec::new();
    encode_v1(None, &mut out).unwrap();
    assert_eq!(out, b"PROXY UNKNOWN\r\n");
    assert!(encode_v1(Some((sa("192.0.2.1:1"), sa("[::1]:2"))), &mut out).is_err());
}

// ---------------------------------------------------------------- v2

fn v2_inet_stream() -> Vec<u8> {
    V2Builder::proxy(
        Transport::Stream,
        sa("192.0.2.1:56324"),
        sa("198.51.100.2:443"),
    )
    .build()
    .unwrap()
}

/// A header with one TLV of every registered kind, a vendor TLV and a CRC.
fn v2_with_all_tlvs() -> Vec<u8> {
    let mut ssl = vec![0x07, 0, 0, 0, 0];
    ssl.extend_from_slice(&[0x21, 0, 7]);
    ssl.extend_from_slice(b"TLSv1.3");
    ssl.extend_from_slice(&[0x22, 0, 11]);
    ssl.extend_from_slice(b"example.com");
    V2Builder::proxy(
        Transport::Stream,
        sa("[2001:db8::1]:40000"),
        sa("[2001:db8::2]:443"),
    )
    .tlv(TlvType::ALPN, b"h2")
    .tlv(TlvType::AUTHORITY, b"example.com")
    .tlv(TlvType::NOOP, &[0; 3])
    .tlv(TlvType::UNIQUE_ID, &[0xab; 128])
    .tlv(TlvType::SSL, &ssl)
    .tlv(TlvType::NETNS, b"blue")
    .tlv(TlvType(0xEA), b"\x01vpce-0123")
    .with_crc32c()
    .build()
    .unwrap()
}

#[test]
fn v2_inet_stream_header() {
    let bytes = v2_inet_stream();
    assert_eq!(bytes.len(), 28);
    let (h, n) = complete(&bytes);
    assert_eq!(n, 28);
    assert_eq!(h.version, Version::V2);
    assert_eq!(h.command, Command::Proxy);
    assert_eq!(h.transport, Transport::Stream);
    assert_eq!(
        h.addresses,
        Addresses::Inet {
            source: v4("192.0.2.1:56324"),
            destination: v4("198.51.100.2:443")
        }
    );
    assert!(h.tlvs.is_empty());
}

#[test]
fn v2_hand_written_bytes() {
    // Spec 2.2 layout written out byte by byte, independent of the encoder.
    let mut b = V2_SIGNATURE.to_vec();
    b.extend_from_slice(&[0x21, 0x22, 0x00, 0x24]); // v2 PROXY, INET6 DGRAM, len 36
    b.extend_from_slice(&Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7).octets());
    b.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
    b.extend_from_slice(&[0x9c, 0x40, 0x00, 0x35]); // 40000, 53
    let (h, n) = complete(&b);
    assert_eq!(n, 52);
    assert_eq!(h.transport, Transport::Datagram);
    assert_eq!(
        h.addresses,
        Addresses::Inet6 {
            source: v6("[2001:db8::7]:40000"),
            destination: v6("[::1]:53")
        }
    );
}

#[test]
fn v2_unix_local_and_unspec() {
    let mut b = V2_SIGNATURE.to_vec();
    b.extend_from_slice(&[0x21, 0x31, 0x00, 0xd8]);
    let mut src = [0u8; 108];
    src[..9].copy_from_slice(b"/run/a.sk");
    b.extend_from_slice(&src);
    b.extend_from_slice(&[0u8; 108]);
    let (h, n) = complete(&b);
    assert_eq!(n, 16 + 216);
    assert!(matches!(h.addresses, Addresses::Unix { source, .. } if source[..9] == *b"/run/a.sk"));
    assert_eq!(h.action(Transport::Stream), Err(Error::UnixAddresses));

    let local = V2Builder::local().build().unwrap();
    assert_eq!(local.len(), 16);
    let (h, _) = complete(&local);
    assert_eq!(h.command, Command::Local);
    assert_eq!(h.addresses, Addresses::Unspec);

    let unspec = V2Builder::unspec()
        .tlv(TlvType::NOOP, b"x")
        .build()
        .unwrap();
    let (h, _) = complete(&unspec);
    assert_eq!(h.command, Command::Proxy);
    assert_eq!(h.addresses, Addresses::Unspec);
    assert_eq!(h.tlvs.get(TlvType::NOOP), Some(&b"x"[..]));
}

#[test]
fn v2_local_ignores_the_family() {
    // Spec 2.2: for LOCAL "the protocol block including the family ... is
    // ignored", so unknown family and transport values do not fail it.
    let mut b = V2_SIGNATURE.to_vec();
    b.extend_from_slice(&[0x20, 0xff, 0x00, 0x03, 1, 2, 3]);
    let (h, n) = complete(&b);
    assert_eq!(n, 19);
    assert_eq!(h.command, Command::Local);
    assert_eq!(h.addresses, Addresses::Unspec);
    assert_eq!(h.action(Transport::Stream), Ok(Action::Direct));
    // A LOCAL header whose block is shorter than its family's addresses.
    let mut b = V2_SIGNATURE.to_vec();
    b.extend_from_slice(&[0x20, 0x11, 0x00, 0x00]);
    assert_eq!(complete(&b).0.action(Transport::Stream), Ok(Action::Direct));
}

#[test]
fn v2_invalid_fixed_part() {
    let good = v2_inet_stream();
    let with = |i: usize, v: u8| {
        let mut b = good.clone();
        b[i] = v;
        b
    };
    assert_eq!(err(&with(12, 0x11)), Error::V2BadVersion);
    assert_eq!(err(&with(12, 0x31)), Error::V2BadVersion);
    assert_eq!(err(&with(12, 0x22)), Error::V2BadCommand);
    assert_eq!(err(&with(12, 0x2f)), Error::V2BadCommand);
    assert_eq!(err(&with(13, 0x41)), Error::V2BadFamily);
    assert_eq!(err(&with(13, 0xf1)), Error::V2BadFamily);
    assert_eq!(err(&with(13, 0x13)), Error::V2BadTransport);
    // Version and command fail as soon as their byte arrives.
    assert_eq!(err(&with(12, 0x11)[..13]), Error::V2BadVersion);
    assert_eq!(err(&with(13, 0x41)[..14]), Error::V2BadFamily);
    // A signature with one wrong byte is not PROXY protocol at all.
    let mut b = good.clone();
    b[11] = b'X';
    assert_eq!(err(&b), Error::NotProxyProtocol);
}

#[test]
fn v2_address_block_too_short() {
    for (family, need) in [(0x11u8, 12u16), (0x21, 36), (0x31, 216)] {
        let mut b = V2_SIGNATURE.to_vec();
        b.extend_from_slice(&[0x21, family]);
        b.extend_from_slice(&(need - 1).to_be_bytes());
        b.resize(16 + usize::from(need - 1), 0);
        assert_eq!(err(&b), Error::V2AddressesTooShort, "family {family:#x}");
        // With the full length it parses.
        let mut b = V2_SIGNATURE.to_vec();
        b.extend_from_slice(&[0x21, family]);
        b.extend_from_slice(&need.to_be_bytes());
        b.resize(16 + usize::from(need), 0);
        complete(&b);
    }
}

#[test]
fn v2_declared_length_is_never_trusted_beyond_the_buffer() {
    let mut b = v2_inet_stream();
    b[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    // 65535 declared, 12 present: wait for more, never read past the end.
    assert_eq!(parse(&b), Ok(Status::Incomplete));
    b.resize(V2_MAX_LEN - 1, 0);
    assert_eq!(parse(&b), Ok(Status::Incomplete));
    // The largest header: 12 address bytes and 65523 zero bytes, which are
    // 21841 empty TLVs of type 0.
    b.push(0);
    let (h, n) = complete(&b);
    assert_eq!(n, V2_MAX_LEN);
    assert_eq!(h.tlvs.iter().count(), 21841);
    // One byte fewer declared: the last TLV is cut short.
    b[14..16].copy_from_slice(&(u16::MAX - 1).to_be_bytes());
    assert_eq!(err(&b), Error::V2TlvTruncated);
}

#[test]
fn v2_leaves_payload_alone() {
    let mut b = v2_with_all_tlvs();
    let header_len = b.len();
    b.extend_from_slice(b"\x16\x03\x01 payload");
    assert_eq!(complete(&b).1, header_len);
}

#[test]
fn v2_every_truncation_is_incomplete() {
    assert_every_truncation_incomplete(&v2_inet_stream());
    assert_every_truncation_incomplete(&v2_with_all_tlvs());
}

#[test]
fn v2_tlvs_are_exposed() {
    let bytes = v2_with_all_tlvs();
    let (h, _) = complete(&bytes);
    let tlvs: Vec<Tlv<'_>> = h.tlvs.parsed().collect();
    assert_eq!(tlvs.len(), 8);
    assert_eq!(tlvs[0], Tlv::Alpn(b"h2"));
    assert_eq!(tlvs[1], Tlv::Authority(b"example.com"));
    assert_eq!(tlvs[2], Tlv::Noop(&[0; 3]));
    assert_eq!(tlvs[3], Tlv::UniqueId(&[0xab; 128]));
    let Tlv::Ssl(ssl) = tlvs[4] else {
        panic!("expected SSL, got {:?}", tlvs[4])
    };
    assert_eq!(ssl.client, 7);
    assert_eq!(ssl.verify, 0);
    assert_eq!(ssl.get(TlvType::SSL_VERSION), Some(&b"TLSv1.3"[..]));
    assert_eq!(ssl.get(TlvType::SSL_CN), Some(&b"example.com"[..]));
    assert_eq!(ssl.get(TlvType::SSL_CIPHER), None);
    assert_eq!(tlvs[5], Tlv::Netns(b"blue"));
    assert_eq!(
        tlvs[6],
        Tlv::Other(RawTlv {
            kind: TlvType(0xEA),
            value: b"\x01vpce-0123"
        })
    );
    assert!(TlvType(0xEA).is_custom());
    assert!(matches!(tlvs[7], Tlv::Crc32c(_)));
    assert_eq!(format!("{:?}", TlvType(0x99)), "TlvType(0x99)");
}

#[test]
fn v2_crc32c_is_verified() {
    let good = v2_with_all_tlvs();
    complete(&good);
    // Flip one bit anywhere outside the CRC TLV: mismatch (or an earlier
    // structural error when the bit lands in a length). Flipping the CRC
    // TLV's own type byte removes the checksum, which is then not checked.
    let crc_value_at = good.len() - 4;
    for i in 16..crc_value_at - 3 {
        let mut b = good.clone();
        b[i] ^= 0x01;
        assert!(parse(&b).is_err(), "bit flip at {i} accepted");
    }
    let mut b = good.clone();
    b[crc_value_at] ^= 0x80;
    assert_eq!(err(&b), Error::V2Crc32cMismatch);
    // A known vector: the checksum of a minimal header with only a CRC TLV.
    let mut b = V2_SIGNATURE.to_vec();
    b.extend_from_slice(&[0x21, 0x11, 0x00, 0x13]);
    b.extend_from_slice(&[192, 0, 2, 1, 198, 51, 100, 2, 0xdc, 0x04, 0x01, 0xbb]);
    b.extend_from_slice(&[0x03, 0x00, 0x04, 0, 0, 0, 0]);
    let crc = crc32c::crc32c(&b);
    let n = b.len();
    b[n - 4..].copy_from_slice(&crc.to_be_bytes());
    complete(&b);
    // Wrong length of the CRC TLV.
    let bad = V2Builder::proxy(Transport::Stream, sa("192.0.2.1:1"), sa("192.0.2.2:2"))
        .tlv(TlvType::CRC32C, &[0; 3])
        .build()
        .unwrap();
    assert_eq!(err(&bad), Error::V2Crc32cLength);
}

#[test]
fn v2_a_second_crc32c_is_refused_before_any_is_computed() {
    // Two CRC TLVs, the first one correct for the header as built: the
    // second is refused as such, not as a mismatch.
    let two = V2Builder::proxy(Transport::Stream, sa("192.0.2.1:1"), sa("192.0.2.2:2"))
        .tlv(TlvType::CRC32C, &[0; 4])
        .with_crc32c()
        .build()
        .unwrap();
    assert_eq!(err(&two), Error::V2DuplicateCrc32c);
    assert_eq!(Error::V2DuplicateCrc32c.label(), "v2_duplicate_crc32c");
    // Thousands of them in a maximal header: refused without computing
    // one (each would be a pass over 64 KiB).
    let mut many = V2Builder::proxy(Transport::Stream, sa("192.0.2.1:1"), sa("192.0.2.2:2"));
    for _ in 0..9000 {
        many = many.tlv(TlvType::CRC32C, &[0; 4]);
    }
    assert_eq!(err(&many.build().unwrap()), Error::V2DuplicateCrc32c);
}

#[test]
fn v2_tlv_rules() {
    let base = || V2Builder::proxy(Transport::Stream, sa("192.0.2.1:1"), sa("192.0.2.2:2"));
    assert_eq!(
        err(&base().tlv(TlvType::UNIQUE_ID, &[1; 129]).build().unwrap()),
        Error::V2UniqueIdTooLong
    );
    complete(&base().tlv(TlvType::UNIQUE_ID, &[]).build().unwrap());
    assert_eq!(
        err(&base().tlv(TlvType::SSL, &[1, 0, 0, 0]).build().unwrap()),
        Error::V2SslTooShort
    );
    // SSL sub-TLV that runs past the SSL TLV.
    assert_eq!(
        err(&base()
            .tlv(TlvType::SSL, &[1, 0, 0, 0, 0, 0x21, 0, 9, b'x'])
            .build()
            .unwrap()),
        Error::V2TlvTruncated
    );
    // A top-level TLV cut short by the declared length.
    let mut b = base().tlv(TlvType::ALPN, b"h2").build().unwrap();
    let len = u16::from_be_bytes([b[14], b[15]]) - 1;
    b[14..16].copy_from_slice(&len.to_be_bytes());
    b.pop();
    assert_eq!(err(&b), Error::V2TlvTruncated);
    // A lone type byte with no length.
    let mut b = base().build().unwrap();
    b.push(0x04);
    b[15] += 1;
    assert_eq!(err(&b), Error::V2TlvTruncated);
}

#[test]
fn builder_refuses_what_it_cannot_encode() {
    assert!(
        V2Builder::proxy(Transport::Stream, sa("192.0.2.1:1"), sa("[::1]:2"))
            .build()
            .is_err()
    );
    assert!(
        V2Builder::local()
            .tlv(TlvType::NOOP, &vec![0; 65535])
            .build()
            .is_err()
    );
    assert!(
        V2Builder::local()
            .tlv(TlvType::NOOP, &vec![0; 65532])
            .build()
            .is_ok()
    );
}

// ---------------------------------------------------------------- actions

#[test]
fn actions() {
    let spoof = |src: &str, dst: &str| Action::Spoof {
        source: sa(src),
        destination: sa(dst),
    };
    let (h, _) = complete(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n");
    assert_eq!(
        h.action(Transport::Stream),
        Ok(spoof("192.0.2.1:56324", "198.51.100.2:443"))
    );
    // v1 describes TCP: refused on UDP.
    assert!(matches!(
        h.action(Transport::Datagram),
        Err(Error::TransportMismatch {
            declared: Transport::Stream,
            listener: Transport::Datagram
        })
    ));
    // v4-mapped IPv6 is IPv4.
    let (h, _) = complete(b"PROXY TCP6 ::ffff:192.0.2.1 ::ffff:198.51.100.2 1 2\r\n");
    assert_eq!(
        h.action(Transport::Stream),
        Ok(spoof("192.0.2.1:1", "198.51.100.2:2"))
    );
    let (h, _) = complete(b"PROXY UNKNOWN\r\n");
    assert_eq!(h.action(Transport::Stream), Ok(Action::Direct));

    let dgram = V2Builder::proxy(Transport::Datagram, sa("[2001:db8::1]:5"), sa("[::1]:53"))
        .build()
        .unwrap();
    let (h, _) = complete(&dgram);
    assert_eq!(
        h.action(Transport::Datagram),
        Ok(spoof("[2001:db8::1]:5", "[::1]:53"))
    );
    assert!(matches!(
        h.action(Transport::Stream),
        Err(Error::TransportMismatch { .. })
    ));
    let stream = v2_inet_stream();
    assert!(matches!(
        complete(&stream).0.action(Transport::Datagram),
        Err(Error::TransportMismatch { .. })
    ));
    // INET with transport UNSPEC is no usable combination for PROXY.
    let mut b = v2_inet_stream();
    b[13] = 0x10;
    assert!(matches!(
        complete(&b).0.action(Transport::Stream),
        Err(Error::TransportMismatch { .. })
    ));
    let local = V2Builder::local().build().unwrap();
    assert_eq!(
        complete(&local).0.action(Transport::Datagram),
        Ok(Action::Direct)
    );
    let unspec = V2Builder::unspec().build().unwrap();
    assert_eq!(
        complete(&unspec).0.action(Transport::Stream),
        Ok(Action::Direct)
    );
}

#[test]
fn error_labels_are_distinct() {
    let all = [
        Error::NotProxyProtocol,
        Error::V1TooLong,
        Error::V1BadCharacter,
        Error::V1BadProtocol,
        Error::V1BadFields,
        Error::V1BadAddress,
        Error::V1BadPort,
        Error::V2BadVersion,
        Error::V2BadCommand,
        Error::V2BadFamily,
        Error::V2BadTransport,
        Error::V2AddressesTooShort,
        Error::V2TlvTruncated,
        Error::V2Crc32cLength,
        Error::V2Crc32cMismatch,
        Error::V2UniqueIdTooLong,
        Error::V2SslTooShort,
        Error::UnixAddresses,
        Error::TransportMismatch {
            declared: Transport::Stream,
            listener: Transport::Datagram,
        },
    ];
    let mut labels: Vec<_> = all.iter().map(|e| e.label()).collect();
    labels.sort_unstable();
    labels.dedup();
    assert_eq!(labels.len(), all.len());
    assert!(all.iter().all(|e| !e.to_string().is_empty()));
}

// ---------------------------------------------------------------- mutations

/// Re-encodes a parsed PROXY header with the encoder.
fn reencode(h: &Header<'_>) -> Option<Vec<u8>> {
    let (src, dst) = h.addresses.socket_addrs()?;
    let mut b = V2Builder::proxy(h.transport, src, dst);
    for t in &h.tlvs {
        b = b.tlv(t.kind, t.value);
    }
    b.build().ok()
}

#[test]
fn every_one_byte_mutation_errors_or_round_trips() {
    let seeds = [
        v2_inet_stream(),
        v2_with_all_tlvs(),
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n".to_vec(),
        b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n".to_vec(),
    ];
    for seed in &seeds {
        for i in 0..seed.len() {
            for v in [
                0u8,
                1,
                0x0a,
                0x0d,
                0x20,
                0x30,
                0x7f,
                0x80,
                0xff,
                seed[i] ^ 0x40,
            ] {
                let mut b = seed.clone();
                b[i] = v;
                let Ok(Status::Complete(h, n)) = parse(&b) else {
                    continue;
                };
                assert!(n <= b.len());
                match h.version {
                    Version::V2 if h.command == Command::Proxy => {
                        if let Some(re) = reencode(&h) {
                            assert_eq!(re, b[..n], "mutation {v:#x} at {i}");
                        }
                    }
                    Version::V1 => {
                        let mut re = Vec::new();
                        let addrs = h.addresses.socket_addrs();
                        encode_v1(addrs, &mut re).unwrap();
                        if addrs.is_some() {
                            // Canonical text only: the parser accepts no
                            // alternative spellings except IPv6 forms.
                            let reparsed = complete(&re).0;
                            assert_eq!(reparsed.addresses, h.addresses);
                        }
                    }
                    Version::V2 => {}
                }
            }
        }
    }
}

// ---------------------------------------------------------------- properties

fn arb_socket_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    prop_oneof![
        (
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<[u8; 4]>(),
            any::<u16>()
        )
            .prop_map(|(a, p, b, q)| (
                SocketAddr::from((Ipv4Addr::from(a), p)),
                SocketAddr::from((Ipv4Addr::from(b), q))
            )),
        (
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<[u8; 16]>(),
            any::<u16>()
        )
            .prop_map(|(a, p, b, q)| (
                SocketAddr::from((Ipv6Addr::from(a), p)),
                SocketAddr::from((Ipv6Addr::from(b), q))
            )),
    ]
}

/// TLVs the parser accepts as they are: no CRC (added separately), short
/// unique IDs, well-formed SSL values.
fn arb_tlv() -> impl Strategy<Value = (u8, Vec<u8>)> {
    prop_oneof![
        (
            any::<u8>().prop_filter("checked types", |t| ![0x03, 0x05, 0x20].contains(t)),
            proptest::collection::vec(any::<u8>(), 0..64)
        ),
        proptest::collection::vec(any::<u8>(), 0..=128).prop_map(|v| (0x05, v)),
        (
            any::<u8>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..32)
        )
            .prop_map(|(client, verify, cn)| {
                let mut v = vec![client];
                v.extend_from_slice(&verify.to_be_bytes());
                v.push(0x22);
                v.extend_from_slice(&u16::try_from(cn.len()).unwrap().to_be_bytes());
                v.extend_from_slice(&cn);
                (0x20, v)
            }),
    ]
}

proptest! {
    #[test]
    fn v2_round_trip(
        (src, dst) in arb_socket_pair(),
        dgram in any::<bool>(),
        tlvs in proptest::collection::vec(arb_tlv(), 0..6),
        crc in any::<bool>(),
        payload in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let transport = if dgram { Transport::Datagram } else { Transport::Stream };
        let mut b = V2Builder::proxy(transport, src, dst);
        for (t, v) in &tlvs {
            b = b.tlv(TlvType(*t), v);
        }
        if crc {
            b = b.with_crc32c();
        }
        let mut bytes = b.build().unwrap();
        let header_len = bytes.len();
        bytes.extend_from_slice(&payload);
        let (h, n) = complete(&bytes);
        prop_assert_eq!(n, header_len);
        prop_assert_eq!(h.transport, transport);
        prop_assert_eq!(h.addresses.socket_addrs(), Some((src, dst)));
        let got: Vec<(u8, Vec<u8>)> = h.tlvs.iter().map(|t| (t.kind.0, t.value.to_vec())).collect();
        let want_len = tlvs.len() + usize::from(crc);
        prop_assert_eq!(got.len(), want_len);
        prop_assert_eq!(&got[..tlvs.len()], &tlvs[..]);
    }

    #[test]
    fn v1_round_trip((src, dst) in arb_socket_pair()) {
        let mut bytes = Vec::new();
        encode_v1(Some((src, dst)), &mut bytes).unwrap();
        prop_assert!(bytes.len() <= V1_MAX_LEN);
        let (h, n) = complete(&bytes);
        prop_assert_eq!(n, bytes.len());
        prop_assert_eq!(h.addresses.socket_addrs(), Some((src, dst)));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse(&bytes);
    }
}

// ---------------------------------------------------------------- differential

/// What a parser made of an input, in terms both parsers can express.
#[derive(Debug, PartialEq)]
enum Verdict {
    Accept {
        consumed: usize,
        addrs: Option<(SocketAddr, SocketAddr)>,
    },
    Incomplete,
    Reject,
}

fn ours(input: &[u8]) -> (Verdict, Option<Error>) {
    match parse(input) {
        Ok(Status::Complete(h, n)) => (
            Verdict::Accept {
                consumed: n,
                addrs: h.addresses.socket_addrs(),
            },
            None,
        ),
        Ok(Status::Incomplete) => (Verdict::Incomplete, None),
        Err(e) => (Verdict::Reject, Some(e)),
    }
}

fn theirs(input: &[u8]) -> Verdict {
    use ppp::{PartialResult as _, v1, v2};
    if input.starts_with(V2_SIGNATURE) || V2_SIGNATURE.starts_with(input) {
        let r = v2::Header::try_from(input);
        if r.is_incomplete() {
            return Verdict::Incomplete;
        }
        return match r {
            Ok(h) => {
                let addrs = match h.addresses {
                    v2::Addresses::IPv4(a) => Some((
                        SocketAddr::from((a.source_address, a.source_port)),
                        SocketAddr::from((a.destination_address, a.destination_port)),
                    )),
                    v2::Addresses::IPv6(a) => Some((
                        SocketAddr::from((a.source_address, a.source_port)),
                        SocketAddr::from((a.destination_address, a.destination_port)),
                    )),
                    _ => None,
                };
                // ppp reports addresses for LOCAL headers; we ignore them (spec 2.2).
                let addrs = if h.command == v2::Command::Local {
                    None
                } else {
                    addrs
                };
                Verdict::Accept {
                    consumed: h.len(),
                    addrs,
                }
            }
            Err(_) => Verdict::Reject,
        };
    }
    let r = v1::Header::try_from(input);
    if r.is_incomplete() {
        return Verdict::Incomplete;
    }
    match r {
        Ok(h) => {
            let addrs = match h.addresses {
                v1::Addresses::Tcp4(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                v1::Addresses::Tcp6(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                v1::Addresses::Unknown => None,
            };
            Verdict::Accept {
                consumed: h.header.len(),
                addrs,
            }
        }
        Err(_) => Verdict::Reject,
    }
}

/// Where the two parsers may differ, each by a reading of the spec that
/// this parser makes on purpose. Returns a reason when the difference is
/// one of them.
fn documented_difference(
    input: &[u8],
    ours: &Verdict,
    err: Option<Error>,
    theirs: &Verdict,
) -> Option<&'static str> {
    match (ours, theirs) {
        // A CR must be followed by LF (spec 2.1): we refuse a lone CR; ppp
        // keeps waiting for a line end it already passed.
        (Verdict::Reject, Verdict::Incomplete) if err == Some(Error::V1BadCharacter) => {
            Some("lone CR refused")
        }
        // A wrong signature is refused at once; ppp may wait for a CRLF.
        (Verdict::Reject, Verdict::Incomplete) if err == Some(Error::NotProxyProtocol) => {
            Some("signature checked first")
        }
        // We validate TLVs at parse time; ppp only when they are iterated.
        (Verdict::Reject, Verdict::Accept { .. })
            if matches!(
                err,
                Some(
                    Error::V2TlvTruncated
                        | Error::V2Crc32cLength
                        | Error::V2Crc32cMismatch
                        | Error::V2UniqueIdTooLong
                        | Error::V2SslTooShort
                )
            ) =>
        {
            Some("TLVs validated at parse time")
        }
        // LOCAL ignores the family (spec 2.2); ppp rejects unknown values
        // or a block shorter than the family's addresses.
        // (before the whole header is here, we wait; ppp already refuses).
        (Verdict::Accept { addrs: None, .. } | Verdict::Incomplete, Verdict::Reject)
            if input.starts_with(V2_SIGNATURE) && input.get(12) == Some(&0x20) =>
        {
            Some("LOCAL ignores the address family")
        }
        // Before the CRLF, each parser rules a v1 line out on different
        // evidence: we on a bad byte or protocol field, ppp on some partial
        // fields. ppp also rejects valid prefixes (a line cut right after a
        // space); either way the full line decides, and full lines agree.
        (Verdict::Reject, Verdict::Incomplete) | (Verdict::Incomplete, Verdict::Reject)
            if !input.starts_with(V2_SIGNATURE) && !input.windows(2).any(|w| w == b"\r\n") =>
        {
            Some("v1 prefix judged on different evidence")
        }
        // The same for a bad v2 version or command byte before the length.
        (Verdict::Reject, Verdict::Incomplete)
            if matches!(
                err,
                Some(
                    Error::V2BadVersion
                        | Error::V2BadCommand
                        | Error::V2BadFamily
                        | Error::V2BadTransport
                )
            ) =>
        {
            Some("v2 fixed part rejected early")
        }
        // ppp accepts v1 lines that the spec's grammar excludes (checked
        // one by one in `v1_stricter_than_ppp`).
        (Verdict::Reject, Verdict::Accept { .. })
            if matches!(
                err,
                Some(
                    Error::V1BadPort
                        | Error::V1BadFields
                        | Error::V1BadCharacter
                        | Error::V1BadAddress
                        | Error::V1TooLong
                )
            ) =>
        {
            Some("stricter v1 grammar")
        }
        _ => None,
    }
}

fn check_agreement(input: &[u8]) {
    let (o, e) = ours(input);
    let t = theirs(input);
    if o != t {
        assert!(
            documented_difference(input, &o, e, &t).is_some(),
            "undocumented disagreement on {input:?} ({:?}): ours {o:?} ({e:?}), ppp {t:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn differential_against_ppp_on_mutations() {
    let seeds = [
        v2_inet_stream(),
        v2_with_all_tlvs(),
        V2Builder::local().build().unwrap(),
        V2Builder::proxy(Transport::Datagram, sa("[2001:db8::1]:5"), sa("[::1]:53"))
            .tlv(TlvType::NOOP, b"abc")
            .build()
            .unwrap(),
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n".to_vec(),
        b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n".to_vec(),
        b"PROXY UNKNOWN\r\n".to_vec(),
    ];
    for seed in &seeds {
        check_agreement(seed);
        for end in 0..seed.len() {
            check_agreement(&seed[..end]);
        }
        for i in 0..seed.len() {
            for v in [
                0u8, 0x0a, 0x0d, 0x20, b'0', b'9', b':', b'.', 0x11, 0x21, 0xff,
            ] {
                let mut b = seed.clone();
                b[i] = v;
                check_agreement(&b);
            }
        }
    }
}

#[test]
fn v1_stricter_than_ppp() {
    // Each line here is outside the spec's grammar. Record what ppp does so
    // a change in either parser is noticed; we reject all of them.
    let lines: &[&[u8]] = &[
        b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n",
    ];
    for line in lines {
        assert!(parse(line).is_err(), "{:?}", String::from_utf8_lossy(line));
        check_agreement(line);
    }
}

proptest! {
    #[test]
    fn differential_against_ppp_on_random_input(
        prefix in prop_oneof![Just(V2_SIGNATURE.to_vec()), Just(b"PROXY ".to_vec()), Just(Vec::new())],
        body in proptest::collection::vec(any::<u8>(), 0..80),
    ) {
        let mut input = prefix;
        input.extend_from_slice(&body);
        check_agreement(&input);
    }
}

// ---------------------------------------------------------------- fuzz seeds

#[test]
fn replays_the_committed_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/parse");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/seeds/parse exists") {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let _ = parse(&bytes);
        check_agreement(&bytes);
        count += 1;
    }
    assert!(count >= 8, "only {count} seeds in {}", dir.display());
}
