//! A child process for tests: stdout and stderr lines collected, every
//! wait bounded, killed on every path out. Shared by the crates' tests.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Lines {
    lines: Vec<String>,
    closed: usize,
}

/// A child process whose stdout and stderr lines are collected.
pub struct Proc {
    pub name: String,
    child: Child,
    out: Arc<(Mutex<Lines>, Condvar)>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let out: Arc<(Mutex<Lines>, Condvar)> = Arc::default();
        let so = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        let se = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        for stream in [so, se].into_iter().flatten() {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let (m, cv) = &*out;
                    m.lock().unwrap().lines.push(line);
                    cv.notify_all();
                }
                let (m, cv) = &*out;
                m.lock().unwrap().closed += 1;
                cv.notify_all();
            });
        }
        Proc {
            name: name.to_string(),
            child,
            out,
        }
    }

    /// Waits until a line matches `pred`; returns it.
    pub fn wait_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.out;
        let mut g = m.lock().unwrap();
        loop {
            if let Some(l) = g.lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero() && g.closed < 2,
                "{}: no matching line within {timeout:?}; output so far:\n{}",
                self.name,
                g.lines.join("\n")
            );
            g = cv.wait_timeout(g, left).unwrap().0;
        }
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                let (m, cv) = &*self.out;
                let mut g = m.lock().unwrap();
                while g.closed < 2 {
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(500));
                    let (ng, to) = cv.wait_timeout(g, left).unwrap();
                    g = ng;
                    if to.timed_out() {
                        break;
                    }
                }
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn output(&self) -> String {
        self.out.0.lock().unwrap().lines.join("\n")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
