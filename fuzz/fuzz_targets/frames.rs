//! Any byte stream, cut anywhere, decodes to the same frames as in one piece,
//! and decoding never panics or buffers past the limit.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pgferry_protocol::decode_frame;

const MAX: usize = 1 << 16;

fn decode_all(chunks: &[&[u8]]) -> (Vec<(u8, Vec<u8>)>, bool) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match decode_frame(&mut buf, MAX) {
                Ok(Some(f)) => out.push((f.tag, f.body().to_vec())),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
        assert!(buf.capacity() <= 2 * MAX + 8192);
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let cut = data[0] as usize % data.len();
    let rest = &data[1..];
    let cut = cut.min(rest.len());
    let whole = decode_all(&[rest]);
    let split = decode_all(&[&rest[..cut], &rest[cut..]]);
    assert_eq!(whole, split);
});
