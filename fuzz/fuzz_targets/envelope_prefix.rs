#![no_main]
//! See `pandagate::fuzzing::envelope_prefix` for the input shape and the properties.

libfuzzer_sys::fuzz_target!(|data: &[u8]| pandagate::fuzzing::envelope_prefix(data));
