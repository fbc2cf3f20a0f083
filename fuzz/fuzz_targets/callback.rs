#![no_main]
//! See `pandagate::fuzzing::callback` for the input shape and the properties.

libfuzzer_sys::fuzz_target!(|data: &[u8]| pandagate::fuzzing::callback(data));
