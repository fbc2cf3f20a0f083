#![no_main]
//! See `pandagate::fuzzing::request_edge` for the input shape and the properties.

libfuzzer_sys::fuzz_target!(|data: &[u8]| pandagate::fuzzing::request_edge(data));
