//! headway's node agent as a library: the Kubernetes → desired-state model,
//! the sources that feed it, the datapath lifecycle (load, pin, attach), the
//! writer that puts the desired state into the pinned maps, and `status`.
//! The `headway` binary is a thin CLI over these modules.

pub mod addr_filter;
pub mod addr_table;
pub mod agent;
pub mod bpf_sys;
pub mod cgroup;
pub mod choice_table;
pub mod datapath;
pub mod dns_index;
pub mod generation;
pub mod http;
pub mod kernel_log;
pub mod log_once;
pub mod map_plan;
pub mod map_writer;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod pinned;
pub mod pod_stats_upgrade;
pub mod reconcile;
pub mod retained;
pub mod service_steering;
pub mod shared_mapping;
pub mod sock_table_v1;
pub mod source;
pub mod status;
pub mod top;
pub mod top_view;
