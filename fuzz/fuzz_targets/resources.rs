//! Any bytes as a TrainingJob (YAML, as `radfm run` reads it) or a PromotionPolicy (as
//! `radfm gate --policy` reads it): parsed and validated, or refused naming the field.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = radfm_api::TrainingJob::from_yaml(text, "fuzz.yaml");
    if let Ok(policy) = serde_json::from_str::<radfm_api::site_validation::PromotionPolicy>(text) {
        let _ = policy.validate();
    }
});
