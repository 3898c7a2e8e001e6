//! Every wire kind decoded from arbitrary bytes: an error or a value, never a panic,
//! an overflow or a hang; what decodes encodes again, and that encoding decodes and
//! encodes to the same bytes (compared as bytes: a NaN is not equal to itself).
#![no_main]

use clawbus_wire::*;
use libfuzzer_sys::fuzz_target;

fn roundtrip<T: Kind>(bytes: &[u8]) {
    if let Ok(env) = decode::<T>(bytes) {
        let again = encode(&env).expect("a decoded envelope encodes");
        let back = decode::<T>(&again).expect("an encoded envelope decodes");
        assert_eq!(encode(&back).expect("and encodes again"), again);
    }
}

/// Round-trips the input as every kind.
struct Roundtrip<'a>(&'a [u8]);

impl KindVisitor for Roundtrip<'_> {
    fn visit<T: Kind>(&mut self) {
        roundtrip::<T>(self.0);
    }
}

fuzz_target!(|bytes: &[u8]| {
    let _ = decode_any(bytes);
    visit_kinds(&mut Roundtrip(bytes));
});
