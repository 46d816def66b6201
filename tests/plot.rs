//! `ferry demo --plot`: a real migration between two processes draws a valid SVG
//! with every series, each with a point per progress sample.
//!
//! Runs on KVM wherever /dev/kvm exists (FERRY_REQUIRE_KVM=1 makes that mandatory),
//! else on the host-thread fallback.

mod common;

use std::process::Command;

use ferry::plot::SERIES;

/// (stroke colour, point count) of every polyline, and every text, of an SVG.
fn parse(svg: &str) -> (Vec<(String, usize)>, Vec<String>) {
    let inv = ferry::plot::inspect_svg(svg).expect("the plot is well-formed XML");
    (inv.polylines, inv.texts)
}

#[test]
fn demo_draws_the_migration() {
    let _guard = common::guest_lock();
    let threads = common::backend() == minivm::Backend::Threads;
    let dir = std::env::temp_dir().join(format!("ferry-plot-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg_path = dir.join("F.svg");
    let json_path = dir.join("report.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.args(["demo", "--mem", "256M", "--vcpus", "2"])
        .args(["--workload", "working-set=4096"])
        .arg("--plot")
        .arg(&svg_path)
        .arg("--json")
        .arg(&json_path);
    if threads {
        cmd.arg("--threads");
    }
    let out = cmd.output().expect("run ferry demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ferry demo failed: {stderr}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("plot: "), "{stderr}");

    let svg = std::fs::read_to_string(&svg_path).expect("the plot was written");
    let (lines, texts) = parse(&svg);
    for s in SERIES {
        assert!(
            texts.iter().any(|t| t == s.label),
            "legend label {:?} missing; texts: {texts:?}",
            s.label
        );
        let hex = s.stroke_hex();
        let points = lines
            .iter()
            .filter(|(c, _)| *c == hex)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        assert!(
            points >= 2,
            "series {:?} ({hex}) has {points} point(s)",
            s.label
        );
    }
    // The demo completed: the downtime it reported is marked on the picture.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let downtime = report["query-migrate"]["downtime"]
        .as_u64()
        .expect("a completed migration reports its downtime");
    let label = format!("downtime {downtime} ms");
    assert!(
        texts.iter().any(|t| t == &label),
        "{label:?} missing; texts: {texts:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unwritable_plot_path_is_refused_before_migrating() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["demo", "--mem", "64M", "--vcpus", "1", "--threads"])
        .args(["--plot", "/nonexistent-dir/F.svg"])
        .output()
        .expect("run ferry demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--plot /nonexistent-dir/F.svg"), "{stderr}");
    assert!(
        !stderr.contains("source guest"),
        "it booted a guest: {stderr}"
    );
}
