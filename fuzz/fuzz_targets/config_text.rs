#![no_main]
//! See `pandagate::fuzzing::config_text` for the input shape and the properties.

libfuzzer_sys::fuzz_target!(|data: &[u8]| pandagate::fuzzing::config_text(data));
