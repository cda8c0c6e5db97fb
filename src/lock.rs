//! One run per output at a time: the exclusive lock `.NAME.lock` beside the output.
//!
//! The lock is an `flock` on a kept file, so it goes with the process: a crashed or killed run
//! never leaves it held. But it goes only when the *last* thread of the killed process is gone
//! — after the kernel has torn down its memory (`exit_mm` runs before `exit_files`). A batch
//! system that SIGKILLs a job and starts the retry at once (`kill -9 $PID; compress … --resume`)
//! therefore finds the lock still held for a moment, and on a busy machine, where the dying
//! threads wait for a core, for tens or hundreds of milliseconds (issue #44: six of six resumes
//! refused this way with both cores busy). So the holder writes its PID into the file, and a run
//! that finds the lock taken looks at that process: alive and not exiting → refused at once, as
//! before (a duplicate job must not interleave with a live one); killed, exiting or already
//! reaped → wait for the kernel to release the lock, bounded.

use anyhow::{bail, Context, Result};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a run waits for a lock whose holder is exiting (a dying process with a large
/// address space can take seconds to unmap on a loaded machine).
const DYING_WAIT: Duration = Duration::from_secs(120);
/// How long a run retries when the holder's PID names no process here (it was reaped between
/// the failed attempt and the look, or the PID has not been written yet).
const UNKNOWN_WAIT: Duration = Duration::from_secs(2);

/// What the process named in a lock file is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Running, no fatal signal pending: a live run.
    Live,
    /// SIGKILL pending, exiting (`PF_EXITING`), a zombie or dead: the lock is about to go.
    Dying,
    /// No such process, or its state cannot be read (another PID namespace, not Linux).
    Unknown,
}

/// `PF_EXITING` in `/proc/PID/stat`'s flags field (include/linux/sched.h).
const PF_EXITING: u64 = 0x4;
/// SIGKILL's bit in the pending-signal masks of `/proc/PID/status`.
const SIGKILL_BIT: u64 = 1 << (9 - 1);

/// Classify process `pid` from `/proc` (Linux).
pub fn holder_state(pid: u32) -> Holder {
    let base = PathBuf::from(format!("/proc/{pid}"));
    let (Ok(stat), Ok(status)) = (
        std::fs::read_to_string(base.join("stat")),
        std::fs::read_to_string(base.join("status")),
    ) else {
        return Holder::Unknown;
    };
    classify(&stat, &status)
}

/// [`holder_state`] from the texts of `/proc/PID/stat` and `/proc/PID/status`.
pub fn classify(stat: &str, status: &str) -> Holder {
    // "pid (comm) S ppid pgrp session tty tpgid flags …": comm may hold spaces and parentheses
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return Holder::Unknown;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (Some(state), Some(flags)) = (f.first(), f.get(6).and_then(|s| s.parse::<u64>().ok()))
    else {
        return Holder::Unknown;
    };
    if matches!(*state, "Z" | "X" | "x") || flags & PF_EXITING != 0 {
        return Holder::Dying;
    }
    // SIGKILL sent but not yet acted on: every thread and the shared set carry it until a
    // thread is scheduled to begin the exit
    let pending = status.lines().filter_map(|l| {
        let (k, v) = l.split_once(':')?;
        matches!(k, "SigPnd" | "ShdPnd")
            .then(|| u64::from_str_radix(v.trim(), 16).ok())
            .flatten()
    });
    for p in pending {
        if p & SIGKILL_BIT != 0 {
            return Holder::Dying;
        }
    }
    Holder::Live
}

/// The PID recorded in a lock file, if any.
fn recorded_pid(f: &mut std::fs::File) -> Option<u32> {
    let mut s = String::new();
    f.rewind().ok()?;
    f.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// Take the exclusive lock of `output` (the file `.NAME.lock` beside it, kept), or fail at once
/// naming it when a live process holds it. A holder that is being killed or exiting is waited
/// for (see the module docs).
pub fn lock_output(output: &Path) -> Result<std::fs::File> {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "output".into());
    let path = output.with_file_name(format!(".{name}.lock"));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create lock file {}", path.display()))?;
    let t0 = Instant::now();
    let mut unknown_since: Option<Instant> = None;
    let mut said = false;
    loop {
        match f.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        let pid = recorded_pid(&mut f);
        let state = pid.map(holder_state).unwrap_or(Holder::Unknown);
        let refuse = || {
            anyhow::anyhow!(
                "another compress run is writing {} ({} holds {}); wait for it or stop it",
                output.display(),
                pid.map(|p| format!("pid {p}"))
                    .unwrap_or_else(|| "it".into()),
                path.display()
            )
        };
        match state {
            Holder::Live => return Err(refuse()),
            Holder::Dying => {
                unknown_since = None;
                if !said {
                    crate::info!(
                        "the previous run of {} (pid {}) is exiting: waiting for it to release {}",
                        output.display(),
                        pid.unwrap_or(0),
                        path.display()
                    );
                    said = true;
                }
                if t0.elapsed() > DYING_WAIT {
                    bail!(
                        "{} is still held by pid {} after {} s although that process is exiting",
                        path.display(),
                        pid.unwrap_or(0),
                        DYING_WAIT.as_secs()
                    );
                }
            }
            Holder::Unknown => {
                let since = *unknown_since.get_or_insert_with(Instant::now);
                if since.elapsed() > UNKNOWN_WAIT {
                    return Err(refuse());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // record the holder for the next run that finds the lock taken
    let write = |f: &mut std::fs::File| -> std::io::Result<()> {
        f.set_len(0)?;
        f.rewind()?;
        f.write_all(format!("{}\n", std::process::id()).as_bytes())?;
        f.flush()
    };
    write(&mut f).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_process_state() {
        // this process: alive
        assert_eq!(holder_state(std::process::id()), Holder::Live);
        // no such process
        assert_eq!(holder_state(u32::MAX - 7), Holder::Unknown);
        let st = |state: &str, flags: u64| {
            format!("123 (a) b (c)) {state} 1 2 3 4 5 {flags} 0 0 0 0 0 0 0 0 0 0 0 0")
        };
        let status = |sig: &str, shd: &str| format!("Name:\tx\nSigPnd:\t{sig}\nShdPnd:\t{shd}\n");
        let quiet = status("0000000000000000", "0000000000000000");
        assert_eq!(classify(&st("R", 0x400040), &quiet), Holder::Live);
        assert_eq!(classify(&st("S", 0x400044), &quiet), Holder::Dying);
        assert_eq!(classify(&st("Z", 0), &quiet), Holder::Dying);
        // SIGKILL pending (bit 8), per thread or shared; SIGTERM (bit 14) is not fatal here
        let killed = status("0000000000000100", "0000000000000000");
        assert_eq!(classify(&st("R", 0), &killed), Holder::Dying);
        let shared = status("0000000000000000", "0000000000000100");
        assert_eq!(classify(&st("S", 0), &shared), Holder::Dying);
        let term = status("0000000000004000", "0000000000004000");
        assert_eq!(classify(&st("S", 0), &term), Holder::Live);
        assert_eq!(classify("garbage", &quiet), Holder::Unknown);
    }

    #[test]
    fn a_live_holder_is_refused_at_once_and_the_pid_is_recorded() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("o");
        let held = lock_output(&out).unwrap();
        let lock = d.path().join(".o.lock");
        assert_eq!(
            std::fs::read_to_string(&lock).unwrap().trim(),
            std::process::id().to_string()
        );
        // flock is per open file description: a second open in this (live) process conflicts
        let t = Instant::now();
        let e = lock_output(&out).unwrap_err().to_string();
        assert!(e.contains("another compress run is writing"), "{e}");
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1));
        drop(held);
        drop(lock_output(&out).unwrap());
    }
}
