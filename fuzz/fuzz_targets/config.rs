//! Config text → `Config::from_document` / `Config::parse`.
//!
//! Never panics. A config that loads, written back as YAML from its
//! defaulted form (`raw`) and loaded again, has the same hash: the hash
//! covers what the config means, not how it was written.
#![no_main]

use istio_vault_webhook::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::parse(text);
    let Ok(config) = Config::from_document(text) else {
        return;
    };
    let yaml = serde_yaml_ng::to_string(&config.raw).expect("raw config serializes");
    let again = Config::parse(&yaml)
        .unwrap_or_else(|e| panic!("re-serialized config does not load: {e}\n{yaml}"));
    assert_eq!(
        config.hash, again.hash,
        "hash changed after a round trip:\n{yaml}"
    );
});
