//! Any bytes as `index.json`: refused, or valid with sizes the loader can order without
//! allocating more than the entries justify.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(index) = serde_json::from_slice::<radfm_data::DatasetIndex>(data) else {
        return;
    };
    if index.validate().is_err() {
        return;
    }
    let samples = index.samples();
    assert!(samples <= radfm_data::index::MAX_SAMPLES);
    if samples <= 100_000 {
        let order = radfm_data::loader::epoch_order(&index.shards, 7, 1);
        assert_eq!(order.len() as u64, samples);
        for world in 1..4 {
            let _ = radfm_data::loader::per_rank(samples, world, 8);
        }
    }
});
