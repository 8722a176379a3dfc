//! `cargo xtask test`: everything a fresh machine needs, then every test.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::util::{self, cargo, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    // Binaries first: the privileged tests drive the agent and the peer.
    util::build_all()?;
    // Privileged tests share kernel state (cgroups, bpffs): one at a time.
    let mut test = cargo();
    test.current_dir(workspace_root())
        .args(["test", "--no-fail-fast"])
        .args(&opts.cargo_test_args)
        .args(["--", "--test-threads=1"]);
    run_counting(&mut test)
}

/// Runs `cargo test`, passing its output through, and ends with one line
/// that totals every test binary's result (cargo prints one per binary,
/// and the last is often an empty doc-test run).
fn run_counting(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {}", util::describe(cmd));
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start cargo test")?;
    let stdout = child.stdout.take().context("cargo test has no stdout")?;
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        totals.add_line(&line);
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds a `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result:") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_cargo_result_lines() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 29 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.52s");
        t.add_line(
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            Totals {
                passed: 30,
                failed: 2,
                ignored: 1
            }
        );
    }
}
