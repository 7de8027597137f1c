//! Barriers across instance groups (StepMesh's `instance_barrier=True`).
//!
//! A job of several instance groups runs one server loop per group, each
//! on its own thread (see `Scheduler::serve_groups`). A running barrier of
//! scope [`Scope::AllGroups`] spans them: each group's loop counts its own
//! ranks of the barrier's roles in, exactly as for a barrier of its own
//! mesh; once all of them have entered, it marks its group done in the
//! [`Span`] the group loops share. The loop that marks the last group
//! done sends [`Event::ReleaseAll`] into every group loop's channel, and
//! each loop then releases its own ranks (it alone writes to their
//! connections). Nothing polls: a group waits for the others by not
//! hearing from them, and a barrier some rank never enters is bounded by
//! the ranks' own timeouts, as a group barrier is.
//!
//! A job of one group has no span: an all-groups barrier is that group's
//! (the ranks already send it as a group barrier; a stray one is served
//! the same way, under its own count).

use std::collections::HashMap;
use std::sync::Mutex;

use crossbeam_channel::Sender;

use super::{send, Attempt, Event, Server};
use crate::proto::{Message, Roles, Scope};

/// Role set → index into a member's barrier counts (attention, ffn, both).
pub(super) fn role_set(roles: Roles) -> usize {
    match (roles.attention, roles.ffn) {
        (true, false) => 0,
        (false, true) => 1,
        _ => 2,
    }
}

/// What the group loops of one job share: which groups have every rank
/// inside each all-groups barrier, and a door into each loop.
#[derive(Debug)]
pub(super) struct Span {
    /// Each group loop's channel, by group.
    doors: Vec<Sender<Event>>,
    /// Barriers some but not all groups are done with, by (role set,
    /// number): which groups are.
    done: Mutex<HashMap<(usize, u64), Vec<bool>>>,
}

impl Span {
    /// A span over the groups whose loops listen on `doors` (by group).
    pub(super) fn new(doors: Vec<Sender<Event>>) -> Span {
        Span {
            doors,
            done: Mutex::new(HashMap::new()),
        }
    }

    /// Group `group` has every rank of `roles` inside all-groups barrier
    /// `seq`. Once every group has, each group loop hears
    /// [`Event::ReleaseAll`]; returns whether that happened now.
    pub(super) fn group_done(&self, group: u32, seq: u64, roles: Roles) -> bool {
        let groups = self.doors.len();
        let key = (role_set(roles), seq);
        {
            let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
            let marks = done.entry(key).or_insert_with(|| vec![false; groups]);
            if let Some(m) = marks.get_mut(group as usize) {
                *m = true;
            }
            if !marks.iter().all(|&m| m) {
                return false;
            }
            done.remove(&key);
        }
        for (g, door) in self.doors.iter().enumerate() {
            if door.send(Event::ReleaseAll { seq, roles }).is_err() {
                // That group's loop has finished: its ranks all left.
                tracing::debug!("instance group {g} has finished; no barrier release for it");
            }
        }
        true
    }
}

impl Server<'_> {
    /// Member `i` entered running barrier `seq` of `roles` in `scope` (the
    /// hook `said` calls for every `SyncEnter`).
    pub(super) fn sync_scoped(
        &mut self,
        a: &mut Attempt,
        i: usize,
        seq: u64,
        roles: Roles,
        scope: Scope,
    ) {
        match scope {
            Scope::Group => self.sync(a, i, seq, roles),
            Scope::AllGroups => self.sync_all(a, i, seq, roles),
        }
    }

    /// Member `i` entered all-groups barrier `seq` of `roles`: counted as
    /// a group barrier is, under its own number; once every member of
    /// those roles in this group has entered, the group is done (with a
    /// span) or the barrier released (without: the job has one group). A
    /// member out of step is logged and ignored, as for a group barrier.
    fn sync_all(&mut self, a: &mut Attempt, i: usize, seq: u64, roles: Roles) {
        let k = role_set(roles);
        let role = a.members[i].joiner.ask.role;
        let at = a.members[i].synced_all[k];
        if !roles.has(role) || at != seq {
            tracing::warn!(
                "{}{} entered barrier {seq} of {roles} ranks of every instance group out of step (it is at {at})",
                self.prefix(),
                a.name(i),
            );
            return;
        }
        a.members[i].synced_all[k] += 1;
        let all = a
            .members
            .iter()
            .filter(|m| roles.has(m.joiner.ask.role))
            .all(|m| m.synced_all[k] > seq);
        if !all {
            return;
        }
        match (&self.span, self.group) {
            (Some(span), Some(g)) => {
                tracing::debug!(
                    "{}every {roles} rank entered barrier {seq} of every instance group",
                    self.prefix()
                );
                span.group_done(g, seq, roles);
            }
            _ => self.release_all(a, seq, roles),
        }
    }

    /// Every group has every rank of `roles` inside all-groups barrier
    /// `seq`: releases this group's (those that entered it).
    pub(super) fn release_all(&mut self, a: &mut Attempt, seq: u64, roles: Roles) {
        let k = role_set(roles);
        let io_to = self.cfg.hello_timeout;
        let release = Message::SyncRelease {
            seq,
            roles,
            scope: Scope::AllGroups,
        };
        for mem in a
            .members
            .iter_mut()
            .filter(|m| roles.has(m.joiner.ask.role) && m.synced_all[k] == seq + 1)
        {
            let j = &mut mem.joiner;
            if let Err(e) = send(&mut j.stream, &release, io_to, &j.from.to_string()) {
                tracing::warn!(from = %j.from, "barrier release not sent: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FFN: Roles = Roles {
        attention: false,
        ffn: true,
    };
    const BOTH: Roles = Roles {
        attention: true,
        ffn: true,
    };

    #[test]
    fn the_last_group_done_wakes_every_group() {
        let (tx0, rx0) = crossbeam_channel::unbounded();
        let (tx1, rx1) = crossbeam_channel::unbounded();
        let (tx2, rx2) = crossbeam_channel::unbounded();
        let span = Span::new(vec![tx0, tx1, tx2]);
        assert!(!span.group_done(1, 0, FFN));
        assert!(!span.group_done(0, 0, FFN));
        // Another barrier (another role set) is counted apart.
        assert!(!span.group_done(2, 0, BOTH));
        for rx in [&rx0, &rx1, &rx2] {
            assert!(rx.try_recv().is_err());
        }
        assert!(span.group_done(2, 0, FFN));
        for rx in [&rx0, &rx1, &rx2] {
            match rx.try_recv() {
                Ok(Event::ReleaseAll { seq, roles }) => assert_eq!((seq, roles), (0, FFN)),
                _ => panic!("no release"),
            }
            assert!(rx.try_recv().is_err());
        }
        // The next barrier of the same roles starts from nobody.
        assert!(!span.group_done(0, 1, FFN));
    }

    #[test]
    fn a_finished_group_loop_does_not_stop_the_others_release() {
        let (tx0, rx0) = crossbeam_channel::unbounded();
        let (tx1, rx1) = crossbeam_channel::unbounded();
        let span = Span::new(vec![tx0, tx1]);
        drop(rx1);
        assert!(!span.group_done(0, 4, BOTH));
        assert!(span.group_done(1, 4, BOTH));
        assert!(matches!(
            rx0.try_recv(),
            Ok(Event::ReleaseAll { seq: 4, .. })
        ));
    }
}
