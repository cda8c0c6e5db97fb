//! Every subcommand's `--help` starts with its own description (a doc comment once sat on the
//! wrong variant, leaving `report`'s help describing `inspect` and `inspect`'s empty).

mod common;

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
