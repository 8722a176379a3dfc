//! headway's development tasks: `cargo xtask <task>`.
mod bench;
mod bench_acct;
mod bench_control_plane;
mod bench_dns;
mod bench_hooks;
mod bpf_stats;
mod build_ebpf;
mod demo;
mod floor;
mod image;
mod test;
mod toolchain;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "headway development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the kernel object (with BTF), setting up the nightly's
    /// rust-src and a matching bpf-linker first when they are missing.
    BuildEbpf(build_ebpf::Options),
    /// Set up the toolchain, build everything and run the whole test suite
    /// (the privileged tests need root).
    Test(test::Options),
    /// Run the agent on a demo cluster of network namespaces built from the
    /// manifests in `examples/demo/`, connect a client, print the status.
    Demo(demo::Options),
    /// Measure the DNS interceptor per packet with BPF_PROG_TEST_RUN and
    /// print its programs' verified instruction counts (needs root).
    BenchDns(bench_dns::Options),
    /// Measure every attached hook's cost per run (bpf_stats) while a
    /// client makes real connections, per steering case (needs root).
    BenchHooks(bench_hooks::Options),
    /// Measure per-pod accounting (sock_ops, byte counters) live with
    /// bpf_stats during real transfers, against unmarked sockets (needs root).
    BenchAcct(bench_acct::Options),
    /// Benchmark headway against direct connections, kube-proxy-style
    /// iptables DNAT and HAProxy on a cluster of network namespaces;
    /// writes bench/results/latest.{md,json,png} (needs root).
    Bench(bench::Options),
    /// Measure the kube source at scale against the fake API server:
    /// time to sync, EndpointSlice event to map write, peak RSS (root).
    BenchControlPlane(bench_control_plane::Options),
    /// The bench's paired client (hidden): run by `bench` inside its client
    /// namespace, never by hand.
    #[command(hide = true)]
    PairedClient(bench::paired::ClientOptions),
    /// Build the container image (deploy/Containerfile) with podman, docker
    /// or buildah, whichever works here; says so when none does.
    Image(image::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf(opts) => build_ebpf::run(&opts).map(|object| {
            println!("{}", object.display());
        }),
        Task::Test(opts) => test::run(&opts),
        Task::Demo(opts) => demo::run(&opts),
        Task::BenchDns(opts) => bench_dns::run(&opts),
        Task::BenchHooks(opts) => bench_hooks::run(&opts),
        Task::BenchAcct(opts) => bench_acct::run(&opts),
        Task::Bench(opts) => bench::run(&opts),
        Task::BenchControlPlane(opts) => bench_control_plane::run(&opts),
        Task::Image(opts) => image::run(&opts),
        Task::PairedClient(opts) => bench::paired::client(&opts),
    }
}
