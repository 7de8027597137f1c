//! Admitted members after their hello: a watcher thread per member that
//! reports what it says and when it is gone, the setup barrier, running
//! barriers, and leaving.

use super::*;

impl Server<'_> {
    /// A member said something. `Ok(Some(epoch))`: every rank has left.
    pub(super) fn said(
        &mut self,
        a: &mut Attempt,
        id: u64,
        msg: Message,
    ) -> Result<Option<u64>, Failed> {
        let Some(i) = a.members.iter().position(|m| m.id == id) else {
            return Ok(None);
        };
        match (a.phase, msg) {
            (Phase::Barrier { epoch }, Message::BarrierEnter { epoch: e }) if e == epoch => {
                a.members[i].entered = true;
                if a.members.iter().all(|m| m.entered) {
                    let io_to = self.cfg.hello_timeout;
                    for mem in &mut a.members {
                        let j = &mut mem.joiner;
                        let release = Message::BarrierRelease { epoch };
                        if let Err(e) = send(&mut j.stream, &release, io_to, &j.from.to_string()) {
                            // It died after entering; the others go on and
                            // find out on their links.
                            tracing::warn!(from = %j.from, "barrier release not sent: {e}");
                        }
                    }
                    a.phase = Phase::Running { epoch };
                    tracing::info!(epoch, "{}mesh {} formed", self.prefix(), a.size());
                }
                Ok(None)
            }
            (Phase::Running { .. }, Message::Bye) => Ok(self.left(a, i)),
            (Phase::Running { .. }, Message::Report { text }) => {
                a.members[i].report = Some(text);
                Ok(None)
            }
            (Phase::Running { .. }, Message::SyncEnter { seq, roles, scope }) => {
                self.sync_scoped(a, i, seq, roles, scope);
                Ok(None)
            }
            (Phase::Gathering | Phase::Barrier { .. }, Message::Bye) => Err(Failed {
                cause: FailCause::Lost,
                rank: Some(a.rank_of(i)),
                reason: "left during setup (its own setup failed: see its log)".into(),
            }),
            (Phase::Running { .. }, other) => {
                tracing::warn!(
                    "{} sent an unexpected {} after the barrier",
                    a.name(i),
                    other.kind()
                );
                Ok(None)
            }
            (_, other) => Err(Failed {
                cause: FailCause::Mismatch,
                rank: Some(a.rank_of(i)),
                reason: format!(
                    "{} sent an unexpected {} during setup",
                    a.name(i),
                    other.kind()
                ),
            }),
        }
    }

    /// Member `i` entered running barrier `seq` of `roles`: once every
    /// member of those roles has, each hears the release. A member out of
    /// step (a barrier it does not take part in, a number it is not at) is
    /// logged and ignored: it times out waiting, its peers too.
    pub(super) fn sync(&mut self, a: &mut Attempt, i: usize, seq: u64, roles: Roles) {
        let k = match (roles.attention, roles.ffn) {
            (true, false) => 0,
            (false, true) => 1,
            _ => 2,
        };
        let role = a.members[i].joiner.ask.role;
        if !roles.has(role) || a.members[i].synced[k] != seq {
            tracing::warn!(
                "{}{} entered barrier {seq} of {roles} ranks out of step (it is at {})",
                self.prefix(),
                a.name(i),
                a.members[i].synced[k]
            );
            return;
        }
        a.members[i].synced[k] += 1;
        let all = a
            .members
            .iter()
            .filter(|m| roles.has(m.joiner.ask.role))
            .all(|m| m.synced[k] > seq);
        if !all {
            return;
        }
        let io_to = self.cfg.hello_timeout;
        let release = Message::SyncRelease {
            seq,
            roles,
            scope: crate::proto::Scope::Group,
        };
        for mem in a
            .members
            .iter_mut()
            .filter(|m| roles.has(m.joiner.ask.role))
        {
            let j = &mut mem.joiner;
            if let Err(e) = send(&mut j.stream, &release, io_to, &j.from.to_string()) {
                tracing::warn!(from = %j.from, "barrier release not sent: {e}");
            }
        }
    }

    /// A member's connection ended.
    pub(super) fn gone(
        &mut self,
        a: &mut Attempt,
        id: u64,
        why: &str,
    ) -> Result<Option<u64>, Failed> {
        let Some(i) = a.members.iter().position(|m| m.id == id) else {
            return Ok(None);
        };
        match a.phase {
            Phase::Running { .. } => Ok(self.left(a, i)),
            _ => Err(Failed {
                cause: FailCause::Lost,
                rank: Some(a.rank_of(i)),
                reason: format!("died during setup (its scheduler connection ended: {why})"),
            }),
        }
    }

    /// Member `i` left a running mesh; `Some(epoch)` once all have.
    pub(super) fn left(&mut self, a: &mut Attempt, i: usize) -> Option<u64> {
        let mem = &mut a.members[i];
        mem.left = true;
        let _ = mem.joiner.stream.shutdown(Shutdown::Both);
        match a.phase {
            Phase::Running { epoch } if a.members.iter().all(|m| m.left) => Some(epoch),
            _ => None,
        }
    }

    /// A thread that reports what the member says, and when it is gone.
    pub(super) fn watch(&self, id: u64, j: &Joiner) -> Result<()> {
        let mut s = j
            .stream
            .try_clone()
            .map_err(|e| Error::io("clone rank connection", e))?;
        let from = j.from.to_string();
        let tx = self.tx.clone();
        std::thread::Builder::new()
            .name("afmesh-sched-rank".into())
            .spawn(move || loop {
                match recv_by(&mut s, None, &from) {
                    Ok(msg) => {
                        let bye = msg == Message::Bye;
                        if tx.send(Event::Said { id, msg }).is_err() || bye {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Event::Gone {
                            id,
                            why: e.to_string(),
                        });
                        return;
                    }
                }
            })
            .map(|_| ())
            .map_err(|e| Error::io("spawn rank watcher", e))
    }
}
