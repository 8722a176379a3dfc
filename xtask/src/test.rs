//! `cargo xtask test`: everything a fresh machine needs, then every test.
use crate::{
    build_ebpf,
    util::{self, cargo, workspace_root},
};

#[derive(clap::Args)]
pub struct Options {
    /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    build_ebpf::run(&build_ebpf::Options { release: true })?;
    // Binaries first: the privileged tests drive the agent and the peer.
    util::run(
        cargo()
            .current_dir(workspace_root())
            .args(["build", "--bins"]),
    )?;
    // Privileged tests share kernel state (cgroups, bpffs): one at a time.
    let mut test = cargo();
    test.current_dir(workspace_root())
        .args(["test", "--no-fail-fast"])
        .args(&opts.cargo_test_args)
        .args(["--", "--test-threads=1"]);
    util::run(&mut test)
}
