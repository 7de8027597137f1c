//! The bench's progress on stderr: a bar when stderr is a terminal (what
//! point of how many, what it is doing, time so far), plain lines
//! otherwise (one per point of a series), so logs and pipes stay readable.

use std::cell::RefCell;
use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    /// Plain lines for each point (a series), or none (a single point).
    lines: bool,
    /// What the current point is, for the bar's message.
    point: RefCell<String>,
}

impl Progress {
    /// Progress over `total` points; `lines`: announce each point on a
    /// plain line when stderr is not a terminal.
    pub fn new(total: usize, lines: bool) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} afmesh bench [{elapsed_precise}] {bar:24} {pos}/{len} {wide_msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Progress {
            bar,
            total,
            lines,
            point: RefCell::new(String::new()),
        }
    }

    /// Point `i` (from 0), described by `what`, starts.
    pub fn point(&self, i: usize, what: &str) {
        *self.point.borrow_mut() = what.to_string();
        match &self.bar {
            Some(b) => {
                b.set_position(i as u64);
                b.set_message(what.to_string());
            }
            None if self.lines => {
                eprintln!("afmesh bench: point {}/{}: {what}", i + 1, self.total)
            }
            None => {}
        }
    }

    /// The current point is now doing `what` (the bar only).
    pub fn phase(&self, what: &str) {
        if let Some(b) = &self.bar {
            b.set_message(format!("{}: {what}", self.point.borrow()));
        }
    }

    /// Point `i` is done.
    pub fn done(&self, i: usize) {
        if let Some(b) = &self.bar {
            b.set_position(i as u64 + 1);
        }
    }

    /// Prints `line` on stdout without tearing the bar.
    pub fn out(&self, line: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| println!("{line}")),
            None => println!("{line}"),
        }
    }

    /// Prints `line` on stderr without tearing the bar.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(b) => b.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
