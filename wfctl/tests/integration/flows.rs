//! The README's first steps: `orchestrator dev` takes the demo pushes to live, and `wfctl show`
//! from a second terminal shows the environment live with its resources.

use std::process::{Command, Stdio};

#[test]
fn dev_takes_the_demo_push_to_live_and_wfctl_shows_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("dev.sqlite");
    let dev = Command::new(testkit::binaries::sibling("orchestrator"))
        .arg("--db")
        .arg(&db)
        .args([
            "dev",
            "--exit-when-live",
            "--time-scale",
            "6000",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .env("ORCHESTRATOR__ENGINE__WAIT", "50ms")
        .stdin(Stdio::null())
        .output()
        .expect("dev runs");
    assert!(
        dev.status.success(),
        "{}",
        String::from_utf8_lossy(&dev.stderr)
    );
    let show = Command::new(env!("CARGO_BIN_EXE_wfctl"))
        .arg("--db")
        .arg(&db)
        .args(["-o", "json", "show", "demo", "--env", "dev"])
        .output()
        .expect("wfctl runs");
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&show.stdout).expect("json");
    assert_eq!(json[0]["state"], "live");
    assert!(json[0]["resources"]["auto_scaling_group"].is_string());
    let table = Command::new(env!("CARGO_BIN_EXE_wfctl"))
        .arg("--db")
        .arg(&db)
        .args(["show", "demo"])
        .output()
        .expect("wfctl runs");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("live"), "{text}");
}
