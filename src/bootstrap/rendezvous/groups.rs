//! A job of several instance groups: one server loop per group, each on
//! its own thread, hellos handed to their group's loop (or refused naming
//! the group), and one summary merged from every group's.

use super::*;

impl Scheduler {
    /// Several instance groups: one server loop per group, each on its own
    /// thread and channel; this thread hands each hello to its group's
    /// loop and merges what they saw.
    pub(super) fn serve_groups(&self, tx: &Sender<Event>, rx: &Receiver<Event>) -> Result<Summary> {
        let groups = self.cfg.groups;
        std::thread::scope(|scope| {
            let mut doors: Vec<Option<Sender<Event>>> = Vec::new();
            // Every group's channel first: all-groups barriers share them.
            let chans: Vec<_> = (0..groups)
                .map(|_| crossbeam_channel::unbounded())
                .collect();
            let span = Arc::new(span::Span::new(chans.iter().map(|c| c.0.clone()).collect()));
            for (g, (gtx, grx)) in (0..groups).zip(chans) {
                let (cfg, done, own) = (&self.cfg, tx.clone(), gtx.clone());
                let span = span.clone();
                std::thread::Builder::new()
                    .name(format!("afmesh-sched-g{g}"))
                    .spawn_scoped(scope, move || {
                        let mut server = Server::new(cfg, own, Some(g));
                        server.span = Some(span);
                        let result = server.serve(&grx);
                        let _ = done.send(Event::Finished { group: g, result });
                    })
                    .map_err(|e| Error::io("spawn instance group server", e))?;
                doors.push(Some(gtx));
            }
            let mut results: Vec<Option<Result<Summary>>> = (0..groups).map(|_| None).collect();
            let (mut dropped, mut auth_failures) = (0, 0);
            while results.iter().any(Option::is_none) {
                // Never disconnected: this thread holds a sender.
                let Ok(ev) = rx.recv() else { break };
                match ev {
                    Event::Hello(mut j) => match doors.get(j.ask.group as usize) {
                        Some(Some(door)) => {
                            let _ = door.send(Event::Hello(j));
                        }
                        Some(None) => {
                            let reason = format!(
                                "instance group {}'s mesh is over: this scheduler has finished it",
                                j.ask.group
                            );
                            refuse(&mut j, &reason);
                        }
                        None => {
                            let reason = format!(
                                "{} names instance group {} of {}, this job has {groups} groups: start every process with the same DMLC_GROUP_SIZE",
                                j.name(),
                                j.ask.group,
                                j.ask.groups
                            );
                            tracing::warn!(from = %j.from, "refusing rank: {reason}");
                            refuse(&mut j, &reason);
                        }
                    },
                    Event::Dropped => dropped += 1,
                    Event::AuthFailed => auth_failures += 1,
                    Event::Finished { group, result } => {
                        if let Err(e) = &result {
                            tracing::warn!("instance group {group}: {e}");
                        }
                        doors[group as usize] = None;
                        results[group as usize] = Some(result);
                    }
                    Event::Said { .. } | Event::Gone { .. } | Event::ReleaseAll { .. } => {}
                }
            }
            merge(results, groups, dropped, auth_failures)
        })
    }
}

/// One summary of every group's: counts added, reports ranked as
/// StepMesh's instances; the first group's error, if any failed.
fn merge(
    results: Vec<Option<Result<Summary>>>,
    groups: u32,
    dropped: u32,
    auth_failures: u32,
) -> Result<Summary> {
    let mut all = Vec::new();
    for r in results {
        all.push(r.unwrap_or_else(|| {
            Err(Error::Shutdown(
                "an instance group's server ended unheard".into(),
            ))
        })?);
    }
    let mut reports = Vec::new();
    for (g, s) in all.iter_mut().enumerate() {
        reports.extend(
            s.reports
                .drain(..)
                .map(|(role, r, t)| (role, r * groups + g as u32, t)),
        );
    }
    reports.sort_by_key(|(role, r, _)| (*role == Role::Ffn, *r));
    Ok(Summary {
        epoch: all.first().map_or(0, |s| s.epoch),
        groups,
        attention: all.first().map_or(0, |s| s.attention),
        ffn: all.first().map_or(0, |s| s.ffn),
        dropped: dropped + all.iter().map(|s| s.dropped).sum::<u32>(),
        auth_failures: auth_failures + all.iter().map(|s| s.auth_failures).sum::<u32>(),
        failed_attempts: all.iter().map(|s| s.failed_attempts).sum(),
        reports,
    })
}
