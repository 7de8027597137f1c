//! What a rank keeps besides its links: the scheduler session, for an
//! orderly goodbye, and an embedded scheduler, if it runs one.

use crate::bootstrap::rendezvous::SchedulerHandle;
use crate::bootstrap::{Entered, Session};

/// The rank's ties to the rendezvous (none on a simulated mesh).
#[derive(Debug, Default)]
pub(crate) struct Support {
    session: Option<Session>,
    scheduler: Option<SchedulerHandle>,
}

impl Support {
    pub(crate) fn new(session: Session, scheduler: Option<SchedulerHandle>) -> Support {
        Support {
            session: Some(session),
            scheduler,
        }
    }

    /// Hands the scheduler this rank's results for its job summary.
    pub(crate) fn report(&mut self, text: &str) -> crate::error::Result<()> {
        match &mut self.session {
            Some(s) => s.report(text),
            None => Err(crate::error::Error::invalid(
                "report: this rank has no scheduler (a simulated mesh)",
            )),
        }
    }

    /// Enters a barrier of the running mesh, or goes on with the one this
    /// rank is still inside (see `Session::sync_enter`).
    pub(crate) fn sync_enter(
        &mut self,
        roles: crate::proto::Roles,
        scope: crate::proto::Scope,
    ) -> crate::error::Result<Entered> {
        match &mut self.session {
            Some(s) => s.sync_enter(roles, scope),
            None => Err(crate::error::Error::invalid(
                "barrier: this rank has no scheduler (a simulated mesh)",
            )),
        }
    }

    /// Whether the barrier `entered` was released, waiting up to `wait`
    /// (see `Session::sync_released`).
    pub(crate) fn sync_released(
        &mut self,
        entered: &Entered,
        wait: std::time::Duration,
    ) -> crate::error::Result<bool> {
        match &mut self.session {
            Some(s) => s.sync_released(entered, wait),
            None => Err(crate::error::Error::invalid(
                "barrier: this rank has no scheduler (a simulated mesh)",
            )),
        }
    }

    /// Says goodbye to the scheduler. Bounded; never blocks on an embedded
    /// scheduler.
    pub(crate) fn shutdown(&mut self) {
        if let Some(s) = &mut self.session {
            s.bye();
        }
        // An embedded scheduler finishes on its own once every rank has
        // left; dropping the handle detaches it so this never blocks.
        self.scheduler.take();
    }
}
