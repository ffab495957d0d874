//! Writes the JSON Schema files of the persisted and queued shapes into `state-schemas/schemas/`.
//!
//! Run `cargo run -p state-schemas --bin write-schemas` after changing a persisted shape, and
//! commit the result together with new fixtures (see the crate's README).

use std::fs;
use std::path::Path;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for file in state_schemas::schema_files() {
        let path = dir.join(&file.file_name);
        let unchanged = fs::read_to_string(&path).is_ok_and(|old| old == file.contents);
        if unchanged {
            println!("unchanged {}", path.display());
            continue;
        }
        fs::write(&path, &file.contents).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
