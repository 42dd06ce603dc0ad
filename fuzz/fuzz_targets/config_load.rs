#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| midcall::testing::config_load(data));
