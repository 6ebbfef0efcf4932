#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| key_authority_fuzz::webhook_target(data));
