//! Every subcommand's `--help` starts with its own description (a doc comment once sat on the
//! wrong variant, leaving `report`'s help describing `inspect` and `inspect`'s empty).

use crate::common;
#[test]
fn each_subcommand_describes_itself() {
    for (cmd, words) in [
        ("run", "Run a pipeline"),
        ("eval", "Perplexity of a checkpoint"),
        ("report", "Re-render report.md and report.html"),
        ("compare", "Several runs' reports side by side"),
        ("inspect", "Describe a checkpoint"),
        ("logits", "Logits of a checkpoint"),
        ("verify", "Check an output folder"),
    ] {
        let o = std::process::Command::new(common::bin())
            .args([cmd, "--help"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{cmd} --help");
        let text = String::from_utf8_lossy(&o.stdout);
        let first = text.lines().next().unwrap_or("");
        assert!(
            first.starts_with(words),
            "`{cmd} --help` starts with {first:?}"
        );
    }
}

/// `compress … --json | head`: the reader leaves before the result is written. That must not
/// be a panic (`println!` on EPIPE) but a quiet exit 0, as ripgrep and coreutils do.
#[test]
fn a_reader_that_goes_away_is_not_a_panic() {
    use std::process::{Command, Stdio};
    for args in [vec!["inspect", "--json"], vec!["inspect"]] {
        let mut cmd = Command::new(common::bin());
        cmd.args(&args[..1])
            .arg(common::ref_model())
            .args(&args[1..]);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the read end closes before anything is written
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !err.contains("panicked"),
            "{args:?}: status {:?}, stderr {err}",
            out.status
        );
    }
}
