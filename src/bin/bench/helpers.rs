//! Helpers shared by several bench commands: byte formatting, RSS readings from `/proc` and
//! `getrusage`, the reference model's default path, running `compress` as a measured child
//! process, and best-of-three timing.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub(super) fn default_ref_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models/ref-llama-9m")
}

pub(super) fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

fn proc_status_kb(path: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub(super) fn own_rss() -> Option<u64> {
    proc_status_kb("/proc/self/status", "VmRSS:")
}

/// Reset this process's RSS high-water mark to its current RSS (Linux ≥ 4.0).
pub(super) fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(target_os = "linux")]
mod rusage {
    use std::os::raw::{c_int, c_long};

    /// `struct rusage` of Linux: two `struct timeval` then fourteen `long`s.
    #[repr(C)]
    struct RUsage {
        utime: [c_long; 2],
        stime: [c_long; 2],
        maxrss: c_long,
        rest: [c_long; 13],
    }

    extern "C" {
        fn getrusage(who: c_int, usage: *mut RUsage) -> c_int;
    }

    const RUSAGE_CHILDREN: c_int = -1;

    /// (max RSS of any reaped child in bytes, children's user seconds, system seconds).
    pub fn children() -> Option<(u64, f64, f64)> {
        let mut u = RUsage {
            utime: [0; 2],
            stime: [0; 2],
            maxrss: 0,
            rest: [0; 13],
        };
        // SAFETY: `u` has the layout of Linux's `struct rusage` and outlives the call.
        let rc = unsafe { getrusage(RUSAGE_CHILDREN, &mut u) };
        if rc != 0 {
            return None;
        }
        let secs = |t: [c_long; 2]| t[0] as f64 + t[1] as f64 * 1e-6;
        Some((u.maxrss as u64 * 1024, secs(u.utime), secs(u.stime)))
    }
}

#[cfg(not(target_os = "linux"))]
mod rusage {
    pub fn children() -> Option<(u64, f64, f64)> {
        None
    }
}

pub(super) struct ChildRun {
    pub(super) wall: f64,
    pub(super) report: Value,
    pub(super) rusage_maxrss: Option<u64>,
    pub(super) user_s: f64,
    pub(super) sys_s: f64,
    pub(super) polled_hwm: Option<u64>,
    pub(super) polled_peak_rss: u64,
    pub(super) polled_peak_at: f64,
    pub(super) samples: usize,
    pub(super) bench_floor: Option<u64>,
}

pub(super) fn run_child(compress_bin: &Path, yaml: &Path, overwrite: bool) -> Result<ChildRun> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let bench_floor = compress::util::peak_rss_bytes();
    let mut cmd = Command::new(compress_bin);
    cmd.arg("run")
        .arg(yaml)
        .arg("--json")
        .arg("--quiet")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if overwrite {
        cmd.arg("--overwrite");
    }
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run {}", compress_bin.display()))?;
    let mut stdout = child.stdout.take().context("no child stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let status_path = format!("/proc/{}/status", child.id());
    let (mut hwm, mut peak, mut peak_at, mut samples) = (None, 0u64, 0.0, 0usize);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if let Some(h) = proc_status_kb(&status_path, "VmHWM:") {
            hwm = Some(h);
        }
        if let Some(r) = proc_status_kb(&status_path, "VmRSS:") {
            samples += 1;
            if r > peak {
                peak = r;
                peak_at = t0.elapsed().as_secs_f64();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = t0.elapsed().as_secs_f64();
    let text = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("{} exited with {status}", compress_bin.display());
    }
    let report: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("{}: stdout is not one JSON report", compress_bin.display()))?;
    let ru = rusage::children();
    Ok(ChildRun {
        wall,
        report,
        rusage_maxrss: ru.map(|r| r.0),
        user_s: ru.map(|r| r.1).unwrap_or(0.0),
        sys_s: ru.map(|r| r.2).unwrap_or(0.0),
        polled_hwm: hwm,
        polled_peak_rss: peak,
        polled_peak_at: peak_at,
        samples,
        bench_floor,
    })
}

pub(super) fn best_of_three(mut f: impl FnMut()) -> f64 {
    f();
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}
