use std::process::Command;

use crate::{shipped, tool};

#[test]
fn systemd_analyze_accepts_the_unit_files() {
    let analyze = tool("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    for unit in [
        "baton.service",
        "baton.socket",
        "baton-notify-reload.service",
    ] {
        std::fs::write(
            dir.path().join(unit),
            shipped(&format!("systemd/{unit}"), &config),
        )
        .unwrap();
    }
    let verify = |units: &[&str]| {
        let out = Command::new(&analyze)
            .arg("verify")
            .args(units.iter().map(|u| dir.path().join(u)))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, complaints) = verify(&["baton.service", "baton.socket"]);
    assert!(
        ok && complaints.trim().is_empty(),
        "systemd-analyze verify: {complaints}"
    );

    // Type=notify-reload parses from systemd 253 on.
    let version = Command::new(&analyze).arg("--version").output().unwrap();
    let version: u32 = String::from_utf8_lossy(&version.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    let (ok, complaints) = verify(&["baton-notify-reload.service"]);
    if version >= 253 {
        assert!(
            ok && complaints.trim().is_empty(),
            "systemd {version}: {complaints}"
        );
    } else {
        assert!(
            complaints.contains("notify-reload"),
            "systemd {version} only does not know Type=notify-reload: {complaints}"
        );
        assert_eq!(
            complaints.lines().count(),
            1,
            "and nothing else is wrong: {complaints}"
        );
    }
}
