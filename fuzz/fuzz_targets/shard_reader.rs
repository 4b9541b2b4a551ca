//! Any bytes as a shard: every sample is yielded or reported bad, the shard is read or refused
//! with an error naming it; never a panic, an abort or an allocation the bytes do not justify.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let reader = radfm_data::ShardReader::new(std::io::Cursor::new(data), "fuzz.tar");
    let _ = reader.for_each(|_| ());
});
