//! A full disk mid-run (and a read-only filesystem): one clear error naming the file, exit 2,
//! no output folder; the work folder is kept only when it holds a resumable state, and
//! `--resume` after space is freed gives the same bytes as a run that never failed.
//!
//! The disk is a size-limited tmpfs mounted inside a private user + mount namespace
//! (`unshare -Urm`, no privileges needed), so writes fail with a real ENOSPC. Where user
//! namespaces are not allowed, the same scenario runs with a per-file size limit instead
//! (`ulimit -f` with SIGXFSZ ignored: writes fail with EFBIG), which exercises the same paths.

use crate::common;
use std::path::{Path, PathBuf};
use std::process::Command;

const SHARD: usize = 2 << 20; // bytes per safetensors shard: several shards

fn pipeline(dir: &Path, out: &Path) -> PathBuf {
    let p = dir.join("p.yaml");
    std::fs::write(
        &p,
        format!(
            "model: {}\noutput: {}\n\
             calibration: {{path: {}, samples: 8, seq_len: 64, seed: 0, batch: 4}}\n\
             passes:\n  - gptq: {{bits: 4, group_size: 128}}\n\
             export: {{format: compressed-tensors, max_shard_bytes: {SHARD}}}\n",
            common::ref_model().display(),
            out.display(),
            common::shared().join("data/calib/c4_calib.jsonl").display(),
        ),
    )
    .unwrap();
    p
}

/// Files whose bytes must not depend on how the run went (the report holds timings).
fn artifact(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            !n.starts_with("report.") && n != "checksums.sha256"
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn userns_tmpfs_works() -> bool {
    Command::new("unshare")
        .args(["-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Run the pipeline into `fs/out` with the disk (or file size) limited to `limit` bytes, then
/// lift the limit and run it again with --resume. Results land in `res`.
fn scenario(res: &Path, limit: usize, tmpfs: bool) {
    let fs = res.join("fs");
    std::fs::create_dir_all(&fs).unwrap();
    let p = pipeline(res, &fs.join("out"));
    let bin = common::bin();
    let (b, p, f, r) = (bin.display(), p.display(), fs.display(), res.display());
    let script = if tmpfs {
        format!(
            "mount -t tmpfs -o size={limit} tmpfs {f} || exit 90\n\
             {b} {p} --quiet --json > {r}/json1 2> {r}/err1; echo $? > {r}/rc1\n\
             ls -A {f} > {r}/ls1\n\
             mount -o remount,size=512m {f}\n\
             {b} {p} --quiet --resume 2> {r}/err2; echo $? > {r}/rc2\n\
             cp -r {f}/out {r}/out 2>/dev/null; true\n"
        )
    } else {
        let kib = limit / 1024;
        format!(
            "trap '' XFSZ\n\
             (ulimit -f {kib}; exec {b} {p} --quiet --json > {r}/json1 2> {r}/err1); echo $? > {r}/rc1\n\
             ls -A {f} > {r}/ls1\n\
             {b} {p} --quiet --resume 2> {r}/err2; echo $? > {r}/rc2\n\
             cp -r {f}/out {r}/out 2>/dev/null; true\n"
        )
    };
    let mut cmd = if tmpfs {
        let mut c = Command::new("unshare");
        c.args(["-Urm", "bash", "-c", &script]);
        c
    } else {
        let mut c = Command::new("bash");
        c.args(["-c", &script]);
        c
    };
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn read(p: PathBuf) -> String {
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn disk_full_fails_cleanly_and_resumes_to_identical_bytes() {
    let d = tempfile::tempdir().unwrap();
    // The uninterrupted reference run.
    let refdir = d.path().join("ref");
    std::fs::create_dir_all(&refdir).unwrap();
    let p = pipeline(&refdir, &refdir.join("out"));
    common::run_ok(&p);
    let reference = artifact(&refdir.join("out"));
    assert!(
        reference
            .iter()
            .filter(|(n, _)| n.ends_with(".safetensors"))
            .count()
            > 1
    );

    // ulimit always; the real ENOSPC (and a read-only filesystem) too where user namespaces
    // allow it. (tests/cli/bad_input.rs covers an uncreatable output path without them.)
    let mut mechanisms = vec![false];
    if userns_tmpfs_works() {
        mechanisms.push(true);
        read_only_filesystem(d.path());
    } else {
        eprintln!("user namespaces unavailable: disk-full simulated with ulimit -f only");
    }
    for tmpfs in mechanisms {
        check(d.path(), &reference, tmpfs);
    }
}

/// The output folder's filesystem is mounted read-only (EROFS): one line, exit 2, nothing left.
fn read_only_filesystem(dir: &Path) {
    let res = dir.join("ro");
    let fs = res.join("fs");
    std::fs::create_dir_all(&fs).unwrap();
    let p = pipeline(&res, &fs.join("out"));
    let (b, p, f, r) = (
        common::bin().display().to_string(),
        p.display(),
        fs.display(),
        res.display(),
    );
    let script = format!(
        "mount -t tmpfs -o ro,size=1m tmpfs {f} || exit 90\n\
         {b} {p} --quiet 2> {r}/err1; echo $? > {r}/rc1\n\
         ls -A {f} > {r}/ls1\n"
    );
    let o = Command::new("unshare")
        .args(["-Urm", "bash", "-c", &script])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = read(res.join("err1"));
    assert_eq!(read(res.join("rc1")).trim(), "2", "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
    assert!(err.contains(&*fs.to_string_lossy()), "{err}");
    assert_eq!(read(res.join("ls1")).trim(), "", "{err}");
}

fn check(dir: &Path, reference: &[(String, Vec<u8>)], tmpfs: bool) {
    let total: usize = reference.iter().map(|(_, b)| b.len()).sum();
    // Limits that run out before the first layer is done, mid-way through the layers, and
    // while the final shard files are assembled from the spill files.
    let limits: Vec<usize> = if tmpfs {
        vec![256 << 10, total / 2, total + total / 2]
    } else {
        // A per-file limit: the largest shard's spill file fits exactly, its final file
        // (header + spill) does not, so the run fails at the end with a resumable state.
        let biggest = reference
            .iter()
            .filter(|(n, _)| n.ends_with(".safetensors"))
            .map(|(_, b)| b.len())
            .max()
            .unwrap();
        vec![64 << 10, biggest / 1024 * 1024]
    };
    let mut resumed_mid_run = 0;
    for (i, &limit) in limits.iter().enumerate() {
        let res = dir.join(format!("{}{i}", if tmpfs { "tmpfs" } else { "ulimit" }));
        scenario(&res, limit, tmpfs);
        let err = read(res.join("err1"));
        let why = format!("tmpfs {tmpfs}, limit {limit}: {err}");
        eprintln!("{why}");
        assert_eq!(read(res.join("rc1")).trim(), "2", "{why}");
        assert_eq!(err.trim().lines().count(), 1, "{why}");
        assert!(err.contains("disk full?"), "{why}");
        assert!(
            err.contains("No space left on device") || err.contains("File too large"),
            "{why}"
        );
        assert!(
            err.contains(&*res.join("fs/.out.partial").to_string_lossy()),
            "{why}"
        );
        // what the failed run left on the disk, besides its (released) lock file
        let left: String = read(res.join("ls1"))
            .lines()
            .filter(|l| *l != ".out.lock")
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(!left.lines().any(|l| l == "out"), "output appeared: {why}");
        // --json answers on stdout too, with where a resume would start from
        let j: serde_json::Value = serde_json::from_str(&read(res.join("json1"))).unwrap();
        assert_eq!(j["status"], "error", "{why}");
        assert_eq!(
            j["error"].as_str().unwrap(),
            err.trim().trim_start_matches("error: ")
        );
        if err.contains("--resume") {
            // kept for resuming, and said so
            assert_eq!(left.trim(), ".out.partial", "{why}");
            assert_eq!(
                j["resume_from"].as_str().unwrap(),
                res.join("fs/.out.partial").to_str().unwrap()
            );
            resumed_mid_run += 1;
        } else {
            assert_eq!(
                left.trim(),
                "",
                "work folder left behind without a resume state: {why}"
            );
        }
        assert_eq!(
            read(res.join("rc2")).trim(),
            "0",
            "{}",
            read(res.join("err2"))
        );
        assert!(
            artifact(&res.join("out")) == reference,
            "limit {limit}: output after the failure differs from the uninterrupted run"
        );
    }
    assert!(
        resumed_mid_run >= 1,
        "tmpfs {tmpfs}: no limit left a resumable state"
    );
}
