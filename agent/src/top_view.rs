//! What `headway top` shows: rates between two reads of the pinned maps
//! ([`build_view`], pure) and how they are drawn ([`draw`], ratatui).
use std::{collections::BTreeMap, time::Duration};

use ratatui::{
    Frame,
    layout::{Constraint, Layout},
    style::{Style, Stylize},
    text::Line,
    widgets::{Cell, Paragraph, Row, Table},
};

use crate::status::{Counters, Status, human_bytes, percent};

/// Per second between two readings of a counter `elapsed` apart. A counter
/// that went down was reset (its pod id went to a new pod), so everything
/// it holds now is new. None without an earlier reading or elapsed time.
pub fn rate(prev: Option<u64>, cur: u64, elapsed: Duration) -> Option<f64> {
    let prev = prev?;
    if elapsed.is_zero() {
        return None;
    }
    let delta = if cur >= prev { cur - prev } else { cur };
    Some(delta as f64 / elapsed.as_secs_f64())
}

/// Connection and byte rates of one pod or service.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Rates {
    pub connections: Option<f64>,
    pub bytes_sent: Option<f64>,
    pub bytes_received: Option<f64>,
}

impl Rates {
    pub fn between(prev: Option<&Counters>, cur: &Counters, elapsed: Duration) -> Rates {
        Rates {
            connections: rate(prev.map(Counters::connections), cur.connections(), elapsed),
            bytes_sent: rate(prev.map(|c| c.bytes_sent), cur.bytes_sent, elapsed),
            bytes_received: rate(prev.map(|c| c.bytes_received), cur.bytes_received, elapsed),
        }
    }
}

/// One line of the view: a service (its pods added up) or one of its pods.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewLine {
    pub name: String,
    pub state: String,
    pub rates: Rates,
    pub counters: Counters,
    pub dns_share: Option<f64>,
    pub connection_share: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub service: ViewLine,
    pub pods: Vec<ViewLine>,
}

/// Everything one screen shows.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub groups: Vec<Group>,
    pub hooks_attached: usize,
    pub hooks: usize,
    pub interval: Duration,
    /// Why the last read of the maps failed (the screen keeps the last
    /// good one).
    pub error: Option<String>,
}

/// The view of `cur`, with rates against `prev` read `elapsed` earlier.
pub fn build_view(
    prev: Option<(&Status, Duration)>,
    cur: &Status,
    interval: Duration,
    error: Option<String>,
) -> View {
    // (service ns, service, pod ns, pod) → counters at the previous read.
    let mut before: BTreeMap<(&str, &str, &str, &str), &Counters> = BTreeMap::new();
    let mut before_svc: BTreeMap<(&str, &str), &Counters> = BTreeMap::new();
    let elapsed = prev.map_or(Duration::ZERO, |(_, e)| e);
    if let Some((status, _)) = prev {
        for svc in &status.services {
            before_svc.insert((&svc.namespace, &svc.name), &svc.totals);
            for pod in &svc.pods {
                let key = (&*svc.namespace, &*svc.name, &*pod.namespace, &*pod.name);
                before.insert(key, &pod.counters);
            }
        }
    }
    let groups = cur
        .services
        .iter()
        .map(|svc| {
            let pods = svc
                .pods
                .iter()
                .map(|pod| {
                    let key = (&*svc.namespace, &*svc.name, &*pod.namespace, &*pod.name);
                    ViewLine {
                        name: pod.name.clone(),
                        state: if pod.state.is_empty() {
                            "not-ready".into()
                        } else {
                            pod.state.join(",")
                        },
                        rates: Rates::between(before.get(&key).copied(), &pod.counters, elapsed),
                        counters: pod.counters,
                        dns_share: pod.dns_share,
                        connection_share: pod.connection_share,
                    }
                })
                .collect();
            let prev_totals = before_svc.get(&(&*svc.namespace, &*svc.name)).copied();
            Group {
                service: ViewLine {
                    name: format!("{}/{}", svc.namespace, svc.name),
                    state: svc.policy.clone(),
                    rates: Rates::between(prev_totals, &svc.totals, elapsed),
                    counters: svc.totals,
                    dns_share: None,
                    connection_share: None,
                },
                pods,
            }
        })
        .collect();
    View {
        groups,
        hooks_attached: cur.programs.iter().filter(|p| p.attached).count(),
        hooks: cur.programs.len(),
        interval,
        error,
    }
}

const COLUMNS: [(&str, u16); 13] = [
    ("SERVICE / POD", 28),
    ("STATE / POLICY", 23),
    ("CONN/s", 8),
    ("CONNS", 8),
    ("ACTIVE", 7),
    ("SENT/s", 10),
    ("RECV/s", 10),
    ("SENT", 10),
    ("RECEIVED", 10),
    ("STEER-IN", 9),
    ("STEER-AWAY", 10),
    ("DNS%", 5),
    ("CONN%", 5),
];

fn per_second(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".into(), |r| format!("{r:.1}"))
}

fn bytes_per_second(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".into(), |r| format!("{}/s", human_bytes(r as u64)))
}

fn cells(line: &ViewLine, indent: &str) -> Vec<String> {
    let c = &line.counters;
    vec![
        format!("{indent}{}", line.name),
        line.state.clone(),
        per_second(line.rates.connections),
        c.connections().to_string(),
        c.active_tcp.to_string(),
        bytes_per_second(line.rates.bytes_sent),
        bytes_per_second(line.rates.bytes_received),
        human_bytes(c.bytes_sent),
        human_bytes(c.bytes_received),
        c.steered_in.to_string(),
        c.steered_away.to_string(),
        percent(line.dns_share),
        percent(line.connection_share),
    ]
}

/// Draws `view` on the whole frame: a summary line, then the table.
pub fn draw(frame: &mut Frame, view: &View) {
    let [head, body] =
        Layout::vertical([Constraint::Length(2), Constraint::Min(0)]).areas(frame.area());
    let pods: usize = view.groups.iter().map(|g| g.pods.len()).sum();
    let mut summary = vec![
        Line::from(format!(
            "headway top - {} services, {} pods, hooks {}/{} attached - every {} - q quits",
            view.groups.len(),
            pods,
            view.hooks_attached,
            view.hooks,
            humantime::format_duration(view.interval),
        ))
        .bold(),
    ];
    if let Some(e) = &view.error {
        summary.push(Line::from(format!("read failed, showing the last read: {e}")).red());
    }
    frame.render_widget(Paragraph::new(summary), head);

    let header = Row::new(COLUMNS.map(|(h, _)| Cell::from(h))).reversed();
    let mut rows = Vec::new();
    for group in &view.groups {
        rows.push(Row::new(cells(&group.service, "")).style(Style::new().bold()));
        for pod in &group.pods {
            rows.push(Row::new(cells(pod, "  ")));
        }
    }
    if view.groups.is_empty() {
        rows.push(Row::new(["(no headless services known)"]));
    }
    let table = Table::new(rows, COLUMNS.map(|(_, w)| Constraint::Length(w))).header(header);
    frame.render_widget(table, body);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{PodStatus, ServiceCountersStatus, ServiceStatus, fill_shares};
    use ratatui::{Terminal, backend::TestBackend};

    #[test]
    fn rate_is_the_increase_per_second() {
        let s = Duration::from_secs;
        assert_eq!(rate(Some(10), 30, s(2)), Some(10.0));
        assert_eq!(rate(Some(10), 10, s(1)), Some(0.0));
        assert_eq!(
            rate(Some(0), 5, Duration::from_millis(500)),
            Some(10.0),
            "sub-second intervals scale up"
        );
        // A reset counter (pod id reused) counts what it holds since.
        assert_eq!(rate(Some(100), 4, s(2)), Some(2.0));
        // Nothing to compare with yet.
        assert_eq!(rate(None, 5, s(1)), None);
        assert_eq!(rate(Some(1), 5, Duration::ZERO), None);
    }

    fn status(web0: Counters, web1: Counters) -> Status {
        let pod = |name: &str, counters| PodStatus {
            namespace: "demo".into(),
            name: name.into(),
            addresses: vec![],
            state: vec!["ready", "serving"],
            counters,
            dns_share: None,
            connection_share: None,
        };
        let mut svc = ServiceStatus {
            namespace: "demo".into(),
            name: "web".into(),
            policy: "failover".into(),
            topology: "none".into(),
            ports: Vec::new(),
            backends_v4: 0,
            backends_v6: 0,
            preferred_v4: 0,
            preferred_v6: 0,
            counters: ServiceCountersStatus::default(),
            totals: Counters::default(),
            pods: vec![pod("web-0", web0), pod("web-1", web1)],
        };
        fill_shares(&mut svc);
        Status {
            programs: vec![],
            steering: BTreeMap::new(),
            dns: BTreeMap::new(),
            sockets: BTreeMap::new(),
            services: vec![svc],
        }
    }

    fn tcp(n: u64, sent: u64) -> Counters {
        Counters {
            tcp_connects: n,
            bytes_sent: sent,
            ..Counters::default()
        }
    }

    #[test]
    fn view_has_rates_per_pod_and_per_service() {
        let before = status(tcp(10, 0), tcp(0, 0));
        let after = status(tcp(16, 4096), tcp(2, 0));
        let view = build_view(
            Some((&before, Duration::from_secs(2))),
            &after,
            Duration::from_secs(2),
            None,
        );
        let g = &view.groups[0];
        assert_eq!(g.service.name, "demo/web");
        assert_eq!(g.service.rates.connections, Some(4.0));
        assert_eq!(g.pods[0].rates.connections, Some(3.0));
        assert_eq!(g.pods[0].rates.bytes_sent, Some(2048.0));
        assert_eq!(g.pods[1].rates.connections, Some(1.0));
        assert_eq!(g.pods[0].counters.tcp_connects, 16);
        // First screen: totals, no rates yet.
        let first = build_view(None, &after, Duration::from_secs(1), None);
        assert_eq!(first.groups[0].pods[0].rates, Rates::default());
    }

    fn screen(view: &View, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|f| draw(f, view)).unwrap();
        let buf = terminal.backend().buffer().clone();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect()
    }

    #[test]
    fn screen_shows_each_service_then_its_pods() {
        let before = status(tcp(10, 0), tcp(0, 0));
        let after = status(tcp(16, 4096), tcp(2, 0));
        let view = build_view(
            Some((&before, Duration::from_secs(2))),
            &after,
            Duration::from_secs(2),
            None,
        );
        let lines = screen(&view, 160, 8);
        assert!(lines[0].contains("1 services, 2 pods"), "{lines:#?}");
        assert!(lines[2].starts_with("SERVICE / POD"), "{lines:#?}");
        let words =
            |i: usize| -> Vec<String> { lines[i].split_whitespace().map(str::to_string).collect() };
        assert_eq!(words(3)[..5], ["demo/web", "failover", "4.0", "18", "0"]);
        assert_eq!(
            words(4)[..5],
            ["web-0", "ready,serving", "3.0", "16", "0"],
            "{lines:#?}"
        );
        assert_eq!(words(5)[..4], ["web-1", "ready,serving", "1.0", "2"]);
    }

    #[test]
    fn a_failed_read_is_shown_above_the_table() {
        let view = build_view(
            None,
            &status(tcp(1, 0), tcp(0, 0)),
            Duration::from_secs(1),
            Some("nothing is pinned".into()),
        );
        let lines = screen(&view, 120, 6);
        assert!(lines[1].contains("nothing is pinned"), "{lines:#?}");
    }
}
