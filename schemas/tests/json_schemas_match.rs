//! The checked-in JSON Schemas under `schemas/json/` must equal what the types generate.
//! Run with `KILN_BLESS=1` to rewrite them after a deliberate change.

use std::path::PathBuf;

#[test]
fn checked_in_json_schemas_match_the_types() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json");
    let bless = std::env::var_os("KILN_BLESS").is_some();
    if bless {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let mut drifted = vec![];
    let generated = kiln_schemas::json_schemas::all();
    for (name, schema) in &generated {
        let path = dir.join(format!("{name}.json"));
        let want = serde_json::to_string_pretty(schema).unwrap() + "\n";
        if bless {
            std::fs::write(&path, &want).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(want.as_str()) {
            drifted.push(name.to_string());
        }
    }
    let names: Vec<String> = generated.iter().map(|(n, _)| format!("{n}.json")).collect();
    let stale: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|f| !names.contains(f)).collect())
        .unwrap_or_default();
    assert!(
        drifted.is_empty() && stale.is_empty(),
        "JSON Schemas drifted from the types: {drifted:?}, stale files: {stale:?}; run `KILN_BLESS=1 cargo test -p kiln-schemas` and commit"
    );
}
