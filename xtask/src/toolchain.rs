//! Sets up what the kernel build needs on a fresh machine: the nightly's
//! `rust-src`, and a bpf-linker linked against the nightly's own LLVM
//! (the default bpf-linker build wants a newer LLVM than the nightly has).
use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::util::{output, run};

/// bpf-linker release known to build against LLVM 22 with `llvm-22`.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The nightly toolchain the kernel crate builds with.
pub const NIGHTLY: &str = "+nightly";

/// Makes sure both pieces are in place; cheap when they already are.
pub fn ensure() -> anyhow::Result<PathBuf> {
    let sysroot = nightly_sysroot()?;
    ensure_rust_src(&sysroot)?;
    ensure_bpf_linker(&sysroot)
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args([NIGHTLY, "--print", "sysroot"])).context(
        "the nightly toolchain is missing: install it with \
         `rustup toolchain install nightly` (this machine kind ships one)",
    )?;
    Ok(PathBuf::from(sysroot))
}

fn ensure_rust_src(sysroot: &Path) -> anyhow::Result<()> {
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("cannot add rust-src to the nightly; run `rustup component add rust-src --toolchain nightly`")
}

/// The nightly's shared LLVM library, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn nightly_llvm(sysroot: &Path) -> anyhow::Result<(PathBuf, u32)> {
    let lib = sysroot.join("lib");
    for entry in fs::read_dir(&lib).with_context(|| format!("cannot read {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if let Some(version) = name.strip_prefix("libLLVM.so.") {
            let major = version
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .with_context(|| format!("cannot read the LLVM version from {name}"))?;
            return Ok((lib.join(name), major));
        }
    }
    bail!(
        "no libLLVM.so.* in {}: this nightly does not ship its LLVM as a shared library",
        lib.display()
    )
}

/// Where the LLVM prefix for bpf-linker lives. It must outlive `cargo clean`,
/// because the installed bpf-linker keeps an rpath to it.
fn llvm_prefix(major: u32) -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_DATA_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => {
            PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".local/share")
        }
    };
    Ok(base.join(format!("headway/llvm-{major}")))
}

fn cargo_bin_dir() -> anyhow::Result<PathBuf> {
    Ok(match std::env::var_os("CARGO_HOME") {
        Some(dir) => PathBuf::from(dir).join("bin"),
        None => {
            PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cargo/bin")
        }
    })
}

/// A bpf-linker is usable when it names exactly the nightly's LLVM library
/// (it links it dynamically) and starts.
fn linker_matches(linker: &Path, llvm_soname: &str) -> bool {
    let Ok(bytes) = fs::read(linker) else {
        return false;
    };
    let names_our_llvm = bytes
        .windows(llvm_soname.len())
        .any(|w| w == llvm_soname.as_bytes());
    names_our_llvm
        && Command::new(linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
}

fn ensure_bpf_linker(sysroot: &Path) -> anyhow::Result<PathBuf> {
    let (llvm_lib, major) = nightly_llvm(sysroot)?;
    let soname = llvm_lib
        .file_name()
        .and_then(|n| n.to_str())
        .context("LLVM library name is not UTF-8")?
        .to_string();
    let linker = cargo_bin_dir()?.join("bpf-linker");
    if linker_matches(&linker, &soname) {
        return Ok(linker);
    }
    if linker.exists() {
        eprintln!(
            "bpf-linker at {} is not linked against {soname}; rebuilding it",
            linker.display()
        );
    } else {
        eprintln!("bpf-linker is missing; building it against {soname} (about a minute)");
    }

    let prefix = llvm_prefix(major)?;
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    for name in ["libLLVM.so", soname.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(&llvm_lib, &link)
            .with_context(|| format!("cannot link {} to {}", link.display(), llvm_lib.display()))?;
    }
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--force", "--locked"])
        .args(["--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))
    .with_context(|| {
        format!(
            "cannot build bpf-linker; by hand: LLVM_PREFIX={} cargo install bpf-linker \
             --version {BPF_LINKER_VERSION} --locked --no-default-features --features llvm-{major}",
            prefix.display()
        )
    })?;
    if !linker_matches(&linker, &soname) {
        bail!(
            "bpf-linker was installed but {} does not use {soname}; is another bpf-linker \
             earlier on PATH or CARGO_HOME set differently?",
            linker.display()
        );
    }
    Ok(linker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_linker_that_names_another_llvm_is_rejected() {
        let dir = std::env::temp_dir().join(format!("xtask-linker-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("bpf-linker");
        // Runs fine, but was built against LLVM 23.
        fs::write(
            &fake,
            "#!/bin/sh\n# needs libLLVM.so.23.1-rust-1.99.0-nightly\necho ok\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(!linker_matches(
            &fake,
            "libLLVM.so.22.1-rust-1.97.0-nightly"
        ));
        assert!(linker_matches(&fake, "libLLVM.so.23.1-rust-1.99.0-nightly"));
        assert!(!linker_matches(
            &dir.join("missing"),
            "libLLVM.so.23.1-rust-1.99.0-nightly"
        ));
        fs::remove_dir_all(&dir).unwrap();
    }
}
