//! Embeds the kernel object built by `cargo xtask build-ebpf` into the
//! agent. When it has not been built, an empty object is embedded and the
//! agent says how to build it; plain `cargo build` works on stable either way.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir.join("../target"));
    let candidates = match env::var_os("HEADWAY_BPF_OBJECT") {
        Some(path) => vec![PathBuf::from(path)],
        None => ["release", "debug"]
            .iter()
            .map(|profile| {
                target_dir
                    .join("bpfel-unknown-none")
                    .join(profile)
                    .join("headway")
            })
            .collect(),
    };
    println!("cargo:rerun-if-env-changed=HEADWAY_BPF_OBJECT");
    for path in &candidates {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap()).join("headway.bpf.o");
    match candidates.iter().find(|p| p.is_file()) {
        Some(object) => {
            fs::copy(object, &out).expect("copy the kernel object into OUT_DIR");
        }
        None => {
            println!(
                "cargo:warning=kernel object not built; the agent will refuse to start. \
                 Run `cargo xtask build-ebpf` and build again."
            );
            fs::write(&out, []).expect("write an empty kernel object");
        }
    }
}
