//! The bench's child processes (ranks, floor peers): spawned to die with
//! the bench, stopped on SIGTERM/SIGINT, waited for within a deadline with
//! their output drained, and killed and reaped on every path out.

use super::*;

/// Kills its children on every path out.
pub struct Children(pub Vec<(String, Child)>);

impl Children {
    /// Spawns `cmd` as a child that dies with this process: the kernel
    /// kills it when the spawning thread ends, however that happens (a
    /// SIGKILL of the bench included), so no rank outlives the bench.
    /// Call from the thread that waits for the children (the main one).
    pub fn spawn(&mut self, name: String, cmd: &mut Command) -> Result<&mut Child> {
        stop_requested()?;
        let parent = std::process::id();
        // SAFETY: the closure runs between fork and exec, where only
        // async-signal-safe calls are allowed: `die_with_parent` makes two
        // system calls (prctl, getppid) and does not allocate.
        unsafe {
            cmd.pre_exec(move || sys::die_with_parent(parent));
        }
        let child = cmd.spawn().with_context(|| format!("spawning {name}"))?;
        self.0.push((name, child));
        Ok(&mut self.0.last_mut().expect("just pushed").1)
    }
}

/// An error once SIGTERM or SIGINT has come (see [`sys::on_terminate`]):
/// the caller returns, and dropping its [`Children`] kills and reaps them.
pub(super) fn stop_requested() -> Result<()> {
    match sys::terminated() {
        Some(sig) => bail!("stopped by signal {sig}; ranks killed"),
        None => Ok(()),
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_all(children: &mut Children, deadline: Instant) -> Result<Vec<String>> {
    // Drain every child's stdout as it is written: a report larger than a
    // pipe's buffer would otherwise block the child before it can exit.
    let readers: Vec<_> = children
        .0
        .iter_mut()
        .map(|(_, c)| {
            c.stdout.take().map(|mut o| {
                std::thread::spawn(move || {
                    let mut s = String::new();
                    let _ = o.read_to_string(&mut s);
                    s
                })
            })
        })
        .collect();
    let mut done = vec![false; children.0.len()];
    loop {
        stop_requested()?;
        for (i, (name, c)) in children.0.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Some(st) = c.try_wait()? {
                done[i] = true;
                if !st.success() {
                    bail!("{name} failed ({st}); its stderr is above");
                }
            }
        }
        if done.iter().all(|d| *d) {
            // The children have exited, so their pipes are at EOF.
            return Ok(readers
                .into_iter()
                .map(|r| r.map(|h| h.join().unwrap_or_default()).unwrap_or_default())
                .collect());
        }
        if Instant::now() > deadline {
            bail!("ranks did not finish in time");
        }
        // Poll exit status at a modest rate so the bench itself stays off
        // the cores the ranks use.
        std::thread::sleep(Duration::from_millis(20));
    }
}
