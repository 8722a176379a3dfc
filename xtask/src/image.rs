//! `cargo xtask image`: builds the container image from
//! `deploy/Containerfile` with the first container engine that works here.
//!
//! "Works" means the engine answers `info`: a docker client without a
//! reachable daemon is installed but cannot build, and is passed over with
//! the reason shown.
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::util::{self, workspace_root};

/// Engines in the order they are tried. podman and buildah need no daemon.
const ENGINES: [&str; 3] = ["podman", "docker", "buildah"];

/// The image name the manifests use (deploy/base/kustomization.yaml).
const IMAGE: &str = "headway";

#[derive(clap::Args)]
pub struct Options {
    /// Use this engine (podman, docker or buildah) instead of the first
    /// that works.
    #[arg(long)]
    pub engine: Option<String>,
    /// Extra tag besides `headway:<version>` (the kind example uses `dev`).
    #[arg(long, default_value = "dev")]
    pub tag: String,
    /// Print the build command instead of running it.
    #[arg(long)]
    pub dry_run: bool,
}

/// Why an engine cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub struct Unusable {
    pub engine: String,
    pub reason: String,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let candidates: Vec<&str> = match &opts.engine {
        Some(engine) if ENGINES.contains(&engine.as_str()) => vec![engine.as_str()],
        Some(engine) => bail!("unknown engine {engine:?}: expected one of {ENGINES:?}"),
        None => ENGINES.to_vec(),
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    let engine = match pick_engine(&candidates, &path) {
        Ok(engine) => engine,
        Err(unusable) => bail!("{}", no_engine_message(&unusable)),
    };
    let mut cmd = build_command(&engine, &workspace_root(), &tags(&opts.tag));
    if opts.dry_run {
        println!("{}", util::describe(&cmd));
        return Ok(());
    }
    util::run(&mut cmd).context("building the image failed")?;
    println!("built {}", tags(&opts.tag).join(", "));
    Ok(())
}

/// `headway:<version>` (what deploy/base pins) and `headway:<extra>`.
fn tags(extra: &str) -> Vec<String> {
    let version = format!("{IMAGE}:{}", env!("CARGO_PKG_VERSION"));
    let extra = format!("{IMAGE}:{extra}");
    if extra == version {
        vec![version]
    } else {
        vec![version, extra]
    }
}

/// The first engine on `path` that answers `info`, or why none does.
pub fn pick_engine(candidates: &[&str], path: &OsString) -> Result<PathBuf, Vec<Unusable>> {
    let mut unusable = Vec::new();
    for engine in candidates {
        let Some(binary) = find_on_path(engine, path) else {
            unusable.push(Unusable {
                engine: engine.to_string(),
                reason: "not installed".into(),
            });
            continue;
        };
        match Command::new(&binary).arg("info").output() {
            Ok(out) if out.status.success() => return Ok(binary),
            Ok(out) => unusable.push(Unusable {
                engine: engine.to_string(),
                reason: format!(
                    "`{engine} info` failed ({}): {}",
                    out.status,
                    first_line(&String::from_utf8_lossy(&out.stderr))
                ),
            }),
            Err(e) => unusable.push(Unusable {
                engine: engine.to_string(),
                reason: format!("cannot run {}: {e}", binary.display()),
            }),
        }
    }
    Err(unusable)
}

fn no_engine_message(unusable: &[Unusable]) -> String {
    let mut msg =
        String::from("no working container engine here, so the image was not built. Tried:\n");
    for u in unusable {
        msg.push_str(&format!("  {}: {}\n", u.engine, u.reason));
    }
    msg.push_str(
        "Install podman or buildah (no daemon needed), or start docker's daemon, then run \
         `cargo xtask image` again. By hand: \
         docker build -f deploy/Containerfile -t headway:dev .",
    );
    msg
}

fn first_line(s: &str) -> &str {
    s.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("no output")
}

fn find_on_path(name: &str, path: &OsString) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `<engine> build -f deploy/Containerfile -t ... <workspace>`; buildah and
/// podman take the same arguments as docker here.
fn build_command(engine: &Path, root: &Path, tags: &[String]) -> Command {
    let mut cmd = Command::new(engine);
    cmd.current_dir(root)
        .arg("build")
        .arg("--file")
        .arg(root.join("deploy/Containerfile"))
        .arg("--build-arg")
        .arg(format!("HEADWAY_VERSION={}", env!("CARGO_PKG_VERSION")));
    for tag in tags {
        cmd.arg("--tag").arg(tag);
    }
    cmd.arg(root);
    cmd
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt};

    use super::*;

    /// A directory of stand-in engines: each answers `info` with the given
    /// exit code, like a docker client whose daemon is down (1) or a
    /// working podman (0).
    fn engines(dir: &Path, answers: &[(&str, i32)]) -> OsString {
        fs::create_dir_all(dir).unwrap();
        for (name, code) in answers {
            let path = dir.join(name);
            fs::write(
                &path,
                format!("#!/bin/sh\necho '{name} says {code}' >&2\nexit {code}\n"),
            )
            .unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir.as_os_str().to_owned()
    }

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("xtask-image-{name}-{}", std::process::id()))
    }

    #[test]
    fn a_docker_client_without_daemon_is_passed_over() {
        let dir = scratch("pass-over");
        let path = engines(&dir, &[("docker", 1), ("buildah", 0)]);
        let picked = pick_engine(&ENGINES, &path).unwrap();
        assert_eq!(picked, dir.join("buildah"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_working_engine_says_why_for_each() {
        let dir = scratch("none");
        let path = engines(&dir, &[("docker", 1)]);
        let unusable = pick_engine(&ENGINES, &path).unwrap_err();
        let reasons: Vec<(&str, &str)> = unusable
            .iter()
            .map(|u| (u.engine.as_str(), u.reason.as_str()))
            .collect();
        assert_eq!(reasons[0], ("podman", "not installed"));
        assert_eq!(reasons[1].0, "docker");
        assert!(
            reasons[1].1.contains("docker says 1"),
            "the daemon's complaint is shown: {reasons:?}"
        );
        assert_eq!(reasons[2], ("buildah", "not installed"));
        let msg = no_engine_message(&unusable);
        assert!(msg.starts_with("no working container engine"), "{msg}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn build_command_names_the_containerfile_and_both_tags() {
        let cmd = build_command(
            Path::new("/usr/bin/podman"),
            Path::new("/src"),
            &tags("dev"),
        );
        let line = util::describe(&cmd);
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            line,
            format!(
                "/usr/bin/podman build --file /src/deploy/Containerfile --build-arg \
                 HEADWAY_VERSION={version} --tag headway:{version} --tag headway:dev /src"
            )
        );
        assert_eq!(tags(version), vec![format!("headway:{version}")]);
    }
}
