//! End-to-end tests of the `statecast` binary: record traces, bench them,
//! and check what a user sees (the demo's own tests are in tests/demo.rs).

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_statecast");

/// A fresh directory for one test's files.
fn scratch(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn statecast(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the statecast binary runs")
}

/// Runs and expects success; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = statecast(args);
    assert!(
        out.status.success(),
        "statecast {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs and expects failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = statecast(args);
    assert!(
        !out.status.success(),
        "statecast {args:?} should have failed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).unwrap()
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing or not a number in {v:#}"))
}

#[test]
fn cubes_trace_records_in_challenge_format_and_benches_exactly() {
    let dir = scratch("cubes");
    let trace = dir.join("cubes.trace");
    let trace = trace.to_str().unwrap();
    let summary = ok(&[
        "trace", "record", "--world", "cubes", "--ticks", "60", "--out", trace,
    ]);
    assert!(summary.contains("recorded 60 frames of cubes"), "{summary}");
    // Headerless: 60 frames of 901 records of eight i32.
    let bytes = std::fs::read(trace).unwrap();
    assert_eq!(bytes.len(), 60 * 901 * 8 * 4);

    let report = json(&ok(&["trace", "bench", "--trace", trace, "--json"]));
    assert_eq!(report["exact"], Value::Bool(true), "{report:#}");
    assert_eq!(report["packets"], 54);
    assert_eq!(report["frames"], 60);
    assert_eq!(report["entities"], 901);
    assert_eq!(report["world"], "cubes");
    let bytes_per_packet = num(&report, "bytes_per_packet");
    let full = num(&report, "full_bytes_per_packet");
    assert!(
        bytes_per_packet > 0.0 && bytes_per_packet < full,
        "{report:#}"
    );
    // The challenge's uncompressed quantized size: 901 x 73 bits.
    assert_eq!(full, 8222.0);
    assert!(num(&report, "bitpack_bytes_per_packet") > 0.0);
    assert_eq!(report["bitpack_exact"], Value::Bool(true));
    assert!(num(&report, "bytes_per_packet_no_prediction") > 0.0);
    let ratio = num(&report, "ratio_vs_bitpack");
    let expected = bytes_per_packet / num(&report, "bitpack_bytes_per_packet");
    assert!((ratio - expected).abs() < 1e-9);
    let kbps = num(&report, "kbps");
    assert!((kbps - bytes_per_packet * 8.0 * 60.0 / 1000.0).abs() < 1e-6);
    assert!(num(&report, "encode_us") > 0.0 && num(&report, "decode_us") > 0.0);

    // The human table names every codec and the ratio to the baseline.
    let table = ok(&["trace", "bench", "--trace", trace, "--lag", "10"]);
    for needle in [
        "statecast (with prediction)",
        "statecast (no prediction)",
        "bit-packed baseline",
        "full quantized snapshot",
        "x bitpack",
        "50 ",
    ] {
        assert!(table.contains(needle), "{needle:?} missing from\n{table}");
    }
}

#[test]
fn plaza_trace_records_as_sctrace_and_benches_exactly() {
    let dir = scratch("plaza");
    let trace = dir.join("plaza.trace");
    let trace = trace.to_str().unwrap();
    ok(&[
        "trace",
        "record",
        "--world",
        "plaza",
        "--avatars",
        "400",
        "--ticks",
        "20",
        "--seed",
        "7",
        "--out",
        trace,
    ]);
    let bytes = std::fs::read(trace).unwrap();
    assert!(bytes.starts_with(b"SCTRACE1"));
    let schema_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let schema: Value = serde_json::from_slice(&bytes[12..12 + schema_len]).unwrap();
    assert_eq!(schema["name"], "plaza");

    let report = json(&ok(&[
        "trace", "bench", "--trace", trace, "--lag", "2", "--hz", "20", "--json",
    ]));
    assert_eq!(report["exact"], Value::Bool(true), "{report:#}");
    assert_eq!(report["format"], "sctrace1");
    assert_eq!(report["packets"], 18);
    assert_eq!(report["entities"], 400);
    let bytes_per_packet = num(&report, "bytes_per_packet");
    assert!(bytes_per_packet > 0.0 && bytes_per_packet < num(&report, "full_bytes_per_packet"));
    // No bit-packed baseline outside cubes.
    assert!(report["bitpack_bytes_per_packet"].is_null());
    assert!(report["ratio_vs_bitpack"].is_null());
    assert!((num(&report, "kbps") - bytes_per_packet * 8.0 * 20.0 / 1000.0).abs() < 1e-6);
}

#[test]
fn damaged_traces_fail_with_a_clear_error() {
    let dir = scratch("damaged");
    let trace = dir.join("cubes.trace");
    let path = trace.to_str().unwrap();
    ok(&[
        "trace", "record", "--world", "cubes", "--ticks", "10", "--out", path,
    ]);
    let mut bytes = std::fs::read(&trace).unwrap();
    bytes.truncate(bytes.len() - 100);
    std::fs::write(&trace, &bytes).unwrap();
    let err = fails(&["trace", "bench", "--trace", path]);
    assert!(err.contains("truncated cubes trace"), "{err}");
    assert!(err.contains(path), "the error names the file: {err}");
    assert!(!err.contains("panicked"), "{err}");

    // An SCTRACE1 file cut inside a frame.
    let plaza = dir.join("plaza.trace");
    let plaza_path = plaza.to_str().unwrap();
    ok(&[
        "trace",
        "record",
        "--world",
        "plaza",
        "--avatars",
        "50",
        "--ticks",
        "5",
        "--out",
        plaza_path,
    ]);
    let mut bytes = std::fs::read(&plaza).unwrap();
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&plaza, &bytes).unwrap();
    let err = fails(&["trace", "bench", "--trace", plaza_path]);
    assert!(err.contains("truncated trace: frame 4"), "{err}");

    // Values outside the challenge's ranges.
    let mut bytes = vec![0u8; 901 * 32 * 7];
    bytes[6 * 4..7 * 4].copy_from_slice(&(-5i32).to_le_bytes());
    std::fs::write(&trace, &bytes).unwrap();
    let err = fails(&["trace", "bench", "--trace", path]);
    assert!(
        err.contains("frame 0") && err.contains("position_z"),
        "{err}"
    );

    // Too short for the lag, a missing file, an empty file.
    ok(&[
        "trace", "record", "--world", "cubes", "--ticks", "3", "--out", path,
    ]);
    let err = fails(&["trace", "bench", "--trace", path]);
    assert!(err.contains("3 frames"), "{err}");
    let missing = dir.join("missing.trace");
    let err = fails(&["trace", "bench", "--trace", missing.to_str().unwrap()]);
    assert!(err.contains("cannot read trace"), "{err}");
    std::fs::write(&trace, b"").unwrap();
    let err = fails(&["trace", "bench", "--trace", path]);
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn unknown_worlds_and_bad_arguments_are_refused() {
    let dir = scratch("unknown");
    let out = dir.join("x.trace");
    let err = fails(&[
        "trace",
        "record",
        "--world",
        "moon",
        "--ticks",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        err.contains("unknown world") && err.contains("plaza"),
        "{err}"
    );
    let err = fails(&[
        "trace",
        "record",
        "--world",
        "cubes",
        "--avatars",
        "5",
        "--ticks",
        "5",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("plaza world only"), "{err}");
    let err = fails(&["demo", "--duration", "0"]);
    assert!(err.contains("--duration"), "{err}");
}
