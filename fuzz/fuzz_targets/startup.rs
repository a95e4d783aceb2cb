//! The startup-packet decoder and libpq `options` parser never panic.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgferry_protocol::{decode_startup, startup::parse_options};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = decode_startup(&mut buf) {}
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_options(s);
    }
});
