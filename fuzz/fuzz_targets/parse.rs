//! Feeds arbitrary bytes to the PROXY protocol parser.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mmproxy::proxy_protocol::fuzz_parse(data));
