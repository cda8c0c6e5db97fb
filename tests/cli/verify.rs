//! `compress verify`: an intact output passes; a flipped byte, a missing file, an extra file or
//! a lost checksum list each fail with exit 2 and a line naming the file.

use crate::common;
use std::path::Path;
use std::process::Command;

fn verify(dir: &Path) -> (Option<i32>, String, String) {
    let o = Command::new(common::bin())
        .args(["verify", dir.to_str().unwrap()])
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn fails(dir: &Path, needles: &[&str]) {
    let (code, _, err) = verify(dir);
    assert_eq!(code, Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`: {err}");
    }
}

#[test]
fn verify_passes_intact_output_and_names_every_kind_of_damage() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    common::run_rtn(
        d.path(),
        &common::ref_model(),
        &out,
        "bits: 4, group_size: 128",
    );

    let (code, stdout, err) = verify(&out);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        stdout.contains("intact") && stdout.contains("6 llama layers load"),
        "{stdout}"
    );

    // one flipped bit in the weights
    let c = d.path().join("flipped");
    copy_dir(&out, &c);
    let f = c.join("model.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    let i = b.len() / 2;
    b[i] ^= 1;
    std::fs::write(&f, b).unwrap();
    fails(&c, &["model.safetensors", "checksum mismatch"]);

    // a missing file
    let c = d.path().join("missing");
    copy_dir(&out, &c);
    std::fs::remove_file(c.join("config.json")).unwrap();
    fails(&c, &["config.json", "missing"]);

    // an extra file (a leftover spill, say)
    let c = d.path().join("extra");
    copy_dir(&out, &c);
    std::fs::write(c.join(".shard0.spill"), b"x").unwrap();
    fails(&c, &[".shard0.spill", "not listed"]);

    // no checksum list: not a (complete) compress output
    let c = d.path().join("nolist");
    copy_dir(&out, &c);
    std::fs::remove_file(c.join("checksums.sha256")).unwrap();
    fails(&c, &["checksums.sha256"]);

    // checksums consistent but the tensors inside are not: a truncated file re-listed
    let c = d.path().join("truncated");
    copy_dir(&out, &c);
    let f = c.join("model.safetensors");
    let b = std::fs::read(&f).unwrap();
    std::fs::write(&f, &b[..b.len() - 64]).unwrap();
    compress::runner::write_checksums(&c).unwrap();
    fails(&c, &["model.safetensors"]);
}
