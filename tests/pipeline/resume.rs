//! A run killed mid-way (SIGKILL) resumes from its last complete layer and writes exactly the
//! bytes of an uninterrupted run; a changed pipeline is refused.

use crate::common;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn pipeline(dir: &Path, out: &Path, damp: f64) -> std::path::PathBuf {
    let p = dir.join(format!("p-{damp}.yaml"));
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\ncalibration: {{path: {}, samples: 64, seq_len: 256, seed: 1}}\n\
             passes:\n  - gptq: {{bits: 4, group_size: 128, damp: {damp}}}\n\
             export: {{format: compressed-tensors}}\n",
            common::ref_model().display(),
            out.display(),
            common::shared().join("data/calib/c4_calib.jsonl").display()
        ),
    )
    .unwrap();
    p
}

/// Start a run and SIGKILL it once at least `layers` layers are checkpointed.
fn run_and_kill(p: &Path, out: &Path, layers: usize) {
    let work = out.with_file_name(format!(
        ".{}.partial",
        out.file_name().unwrap().to_string_lossy()
    ));
    let state = work.join(".resume/state.json");
    let mut child = Command::new(common::bin())
        .arg(p)
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Ok(b) = std::fs::read(&state) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
                if v["next_layer"].as_u64().unwrap_or(0) as usize >= layers {
                    break;
                }
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "run finished before it could be killed"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !out.exists(),
        "an interrupted run must not publish its output"
    );
    assert!(work.exists(), "the work folder is kept for --resume");
}

fn resume(p: &Path) -> std::process::Output {
    Command::new(common::bin())
        .arg(p)
        .args(["--quiet", "--resume"])
        .output()
        .unwrap()
}

#[test]
fn killed_run_resumes_byte_identical() {
    let d = tempfile::tempdir().unwrap();
    let full = d.path().join("full");
    common::run_ok(&pipeline(d.path(), &full, 0.01));

    let out = d.path().join("resumed");
    let p = pipeline(d.path(), &out, 0.01);
    run_and_kill(&p, &out, 2);
    let o = resume(&p);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["model.safetensors", "config.json"] {
        assert!(
            std::fs::read(full.join(f)).unwrap() == std::fs::read(out.join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
    assert!(!out.join(".resume").exists());
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        r["layers"].as_array().unwrap().len(),
        42,
        "records of every layer survive"
    );
}

/// A different build of `compress` may compute different bits: it may not finish a run that
/// another build started.
#[test]
fn resume_refuses_another_executable() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    run_and_kill(&pipeline(d.path(), &out, 0.01), &out, 1);
    // the same program with one byte appended past its end: still runs, other bytes
    let other = d.path().join("compress-other");
    let mut b = std::fs::read(common::bin()).unwrap();
    b.push(0);
    std::fs::write(&other, b).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = Command::new(&other)
        .arg(pipeline(d.path(), &out, 0.01))
        .args(["--quiet", "--resume"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot resume") && err.contains("the compress executable changed"),
        "{err}"
    );
    // the original binary still resumes it
    let o = resume(&pipeline(d.path(), &out, 0.01));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn resume_refuses_a_changed_pipeline() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    run_and_kill(&pipeline(d.path(), &out, 0.01), &out, 1);
    let o = resume(&pipeline(d.path(), &out, 0.02));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot resume") && err.contains("the pipeline changed"),
        "{err}"
    );
    assert!(!out.exists());
}

/// A second run of the same output while the first is live (a duplicated batch job) is refused
/// at once, even with --overwrite or --resume, and does not disturb the first run.
#[test]
fn concurrent_run_of_the_same_output_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let p = pipeline(d.path(), &out, 0.01);
    let work = d.path().join(".o.partial");
    let mut first = Command::new(common::bin())
        .arg(&p)
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !work.join(".resume/state.json").exists() {
        assert!(first.try_wait().unwrap().is_none(), "first run ended early");
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for extra in [&[][..], &["--overwrite"][..], &["--resume"][..]] {
        let o = Command::new(common::bin())
            .arg(&p)
            .arg("--quiet")
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{extra:?}: {err}");
        assert!(err.contains("another compress run is writing"), "{err}");
        assert!(work.exists(), "the live run's work folder was touched");
    }
    let o = first.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.safetensors").exists() && !work.exists());
    // and once it is done the lock is free again: a rerun gets as far as the existing output
    let o = Command::new(common::bin())
        .arg(&p)
        .arg("--quiet")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("already exists"), "{err}");
}

/// Kill the run again and again — before its first checkpoint, while a resumed run starts,
/// a little after various layers, after the last layer (shard assembly, report) — resuming
/// each time: the output that finally appears is byte for byte the uninterrupted run's.
#[test]
fn repeated_kills_at_many_moments_still_resume_to_identical_bytes() {
    let d = tempfile::tempdir().unwrap();
    let full = d.path().join("full");
    common::run_ok(&pipeline(d.path(), &full, 0.01));

    let out = d.path().join("chaos");
    let p = pipeline(d.path(), &out, 0.01);
    let state = d.path().join(".chaos.partial/.resume/state.json");
    let next_layer = || -> usize {
        std::fs::read(&state)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["next_layer"].as_u64())
            .unwrap_or(0) as usize
    };
    // (kill once this many layers are checkpointed, then after this many more ms)
    let schedule = [
        (0, 300),
        (1, 0),
        (1, 150),
        (2, 40),
        (2, 0),
        (4, 90),
        (6, 0),
        (6, 60),
    ];
    let mut kills = 0;
    for (layers, ms) in schedule {
        let mut child = Command::new(common::bin())
            .arg(&p)
            .args(["--quiet", "--resume"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while next_layer() < layers && child.try_wait().unwrap().is_none() {
            assert!(t0.elapsed() < Duration::from_secs(300), "no progress");
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        let s = child.wait().unwrap();
        if out.exists() {
            assert!(s.success(), "a run published its output and failed");
            break;
        }
    }
    if !out.exists() {
        let o = Command::new(common::bin())
            .arg(&p)
            .args(["--quiet", "--resume"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    eprintln!("{kills} kills");
    assert!(kills >= 5, "the schedule killed the run only {kills} times");
    for f in ["model.safetensors", "config.json"] {
        assert!(
            std::fs::read(full.join(f)).unwrap() == std::fs::read(out.join(f)).unwrap(),
            "{f} differs after {kills} kills"
        );
    }
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["layers"].as_array().unwrap().len(), 42);
}

/// SIGTERM (a scheduler stopping the job) after a checkpoint: exit 130, one line saying the work
/// folder is kept, the same in JSON on stdout; --resume then completes.
#[test]
fn sigterm_says_what_is_kept_and_resumes() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o");
    let p = pipeline(d.path(), &out, 0.01);
    let work = d.path().join(".o.partial");
    let child = Command::new(common::bin())
        .arg(&p)
        .args(["--quiet", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !work.join(".resume/state.json").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let k = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(k.success());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("interrupted") && err.contains("--resume"),
        "{err}"
    );
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["status"], "interrupted");
    assert_eq!(j["resume_from"].as_str().unwrap(), work.to_str().unwrap());
    assert!(!out.exists() && work.exists());
    let o = resume(&p);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.safetensors").exists());
}

/// The model fingerprint covers headers and sizes; the weights of the layers already done are
/// re-hashed on resume, so an in-place edit (same size, same header) is refused too.
#[test]
fn resume_refuses_changed_weights_of_a_finished_layer() {
    let d = tempfile::tempdir().unwrap();
    let m = common::model_copy(d.path());
    let out = d.path().join("o");
    let p = d.path().join("p.yaml");
    let text = std::fs::read_to_string(pipeline(d.path(), &out, 0.01)).unwrap();
    std::fs::write(
        &p,
        text.replace(
            &common::ref_model().display().to_string(),
            &m.display().to_string(),
        ),
    )
    .unwrap();
    run_and_kill(&p, &out, 2);
    // flip one bit of layer 0's q_proj, keeping the file's size and header
    let f = m.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let (t, _) = compress::safetensors_file::parse_header(&bytes, &f).unwrap();
    let i = &t["model.layers.0.self_attn.q_proj.weight"];
    bytes[i.start + 100] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    let o = resume(&p);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cannot resume") && err.contains("weights of layer 0"),
        "{err}"
    );
}
