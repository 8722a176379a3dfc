//! `cargo xtask build-ebpf`: the kernel object, with BTF.
use std::{path::PathBuf, process::Command};

use anyhow::Context;

use crate::{
    toolchain,
    util::{self, target_dir, workspace_root},
};

pub const BPF_TARGET: &str = "bpfel-unknown-none";

#[derive(clap::Args)]
pub struct Options {
    /// Accepted for older command lines: the object is always built with
    /// the release profile, which the agent embeds. The dev profile's
    /// unoptimized programs overflow the 512-byte BPF stack and cannot be
    /// linked at all.
    #[arg(long)]
    pub release: bool,
}

/// Builds the object and returns its path.
pub fn run(_opts: &Options) -> anyhow::Result<PathBuf> {
    let linker = toolchain::ensure()?;
    let linker_dir = linker.parent().context("bpf-linker has no directory")?;
    // Make sure the linker we checked is the one rustc finds.
    let path = std::env::join_paths(std::iter::once(linker_dir.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;

    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args([toolchain::NIGHTLY, "build", "--package", "headway-ebpf"])
        .args(["--target", BPF_TARGET, "-Z", "build-std=core"])
        .env("PATH", path)
        // Only the BPF target gets these flags; host crates stay untouched.
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C debuginfo=2 -C link-arg=--btf",
        )
        // Set by an outer `cargo run`; they would point at the stable toolchain.
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CARGO");
    cmd.arg("--release");
    util::run(&mut cmd).context("building the kernel object failed")?;
    Ok(object_path())
}

pub fn object_path() -> PathBuf {
    target_dir()
        .join(BPF_TARGET)
        .join("release")
        .join("headway")
}
