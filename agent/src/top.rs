//! `headway top`: reads the pinned maps every interval and redraws the
//! rates (see [`crate::top_view`]) until `q`, Esc or Ctrl-C. The terminal
//! is restored on every way out, a panic included (ratatui's hook).
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use ratatui::{
    DefaultTerminal,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
};

use crate::{
    status::{self, Status},
    top_view::{build_view, draw},
};

/// Runs the live view. Fails before touching the terminal when nothing is
/// pinned or the maps cannot be read (e.g. not root), with the same
/// message as `headway status`.
pub fn run(bpffs: &Path, interval: Duration) -> anyhow::Result<()> {
    if interval.is_zero() {
        anyhow::bail!("--interval must be longer than zero");
    }
    let first = status::read(bpffs)?;
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let result = watch(&mut terminal, bpffs, interval, first);
    ratatui::restore();
    result
}

/// One read of the maps, and when it was made.
struct Reading {
    at: Instant,
    status: Status,
}

fn watch(
    terminal: &mut DefaultTerminal,
    bpffs: &Path,
    interval: Duration,
    first: Status,
) -> anyhow::Result<()> {
    let mut prev: Option<Reading> = None;
    let mut cur = Reading {
        at: Instant::now(),
        status: first,
    };
    let mut error: Option<String> = None;
    loop {
        let view = build_view(
            prev.as_ref()
                .map(|p| (&p.status, cur.at.duration_since(p.at))),
            &cur.status,
            interval,
            error.clone(),
        );
        terminal.draw(|frame| draw(frame, &view))?;
        if wait_for_quit(cur.at + interval)? {
            return Ok(());
        }
        match status::read(bpffs) {
            Ok(status) => {
                let next = Reading {
                    at: Instant::now(),
                    status,
                };
                prev = Some(std::mem::replace(&mut cur, next));
                error = None;
            }
            Err(e) => error = Some(e.to_string()),
        }
    }
}

/// Handles keys until `deadline`; true when the user asked to quit. A
/// resize returns early so the screen is redrawn at the new size.
fn wait_for_quit(deadline: Instant) -> anyhow::Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !event::poll(left)? {
            return Ok(false);
        }
        match event::read()? {
            Event::Key(key) if key.kind == KeyEventKind::Press => {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c || matches!(key.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                    return Ok(true);
                }
            }
            Event::Resize(..) => return Ok(false),
            _ => {}
        }
    }
}
