//! Capsule documents: YAML loading under the default limits, validation,
//! and the `${{ }}` expressions inside them.
#![no_main]

use anumate_capsule::{Limits, expr, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse(src, &Limits::default());
    if let Ok(found) = expr::find_expressions(src) {
        for e in found {
            let _ = expr::references(e.body);
        }
    }
});
