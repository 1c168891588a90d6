//! Session repair: getting iscsid out of a reconnect loop it cannot leave by itself.
//!
//! When a connection drops again while iscsid is re-opening it (a target that accepts the
//! TCP connection and closes it at once, a portal flapping), the kernel marks the
//! connection "being cleaned up" and refuses to bind a new socket to it until iscsid stops
//! the connection for recovery. open-iscsi (2.1.x, Debian 12 and 13) does not stop it on that
//! path: it reconnects every 2-3 s forever, logging `can't bind conn N:0 to session N,
//! retcode -107`, and the session never comes back even once the target answers again
//! (open-iscsi issue 387; observed in our e2e suite). Restarting iscsid gets it out (it
//! re-syncs every session with a stop), at the price of reconnecting every healthy session
//! on the host.
//!
//! The node service instead sends that one stop itself ([`super::Initiator::reset_connection`]):
//! a session of ours that has not been `LOGGED_IN` for `after` gets its connection stopped
//! for recovery, then again every `after` while it stays down. iscsid's next attempt binds
//! and logs in as soon as the target answers. For a session that is down only because its
//! target is (storage node away), the stop changes nothing: iscsid keeps retrying as before.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::initiator::{SysSession, SESSION_LOGGED_IN};
use super::Node;
use crate::agent::ids::TARGET_IQN_PREFIX;
use crate::metrics::Counter;

/// What session repair did since the process started (for the metrics endpoint).
#[derive(Debug, Default)]
pub struct RepairCounts {
    /// Connections stopped for recovery.
    pub stopped: Counter,
    /// Stops that failed (refused by the kernel, or netlink unreachable).
    pub failed: Counter,
}

/// A session being watched while it is down.
#[derive(Clone, Debug)]
struct Down {
    target: String,
    since: Instant,
    last_reset: Option<Instant>,
}

/// Which of our sessions have been down long enough to be reset; holds only the sessions
/// down now (a session that logs in again or goes away is forgotten).
#[derive(Debug)]
pub struct SessionRepair {
    after: Duration,
    down: HashMap<u32, Down>,
}

/// A session to reset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// Session id.
    pub sid: u32,
    /// Its target.
    pub target: String,
    /// Its state.
    pub state: String,
    /// How long it has been seen down.
    pub down_for: Duration,
}

impl SessionRepair {
    /// Resets a session down for `after`, then every `after` while it stays down.
    pub fn new(after: Duration) -> Self {
        SessionRepair {
            after,
            down: HashMap::new(),
        }
    }

    /// The sessions to reset now, given every session the host has at `now`. Other
    /// projects' sessions are never picked.
    pub fn due(&mut self, now: Instant, sessions: &[SysSession]) -> Vec<Due> {
        let down: Vec<&SysSession> = sessions
            .iter()
            .filter(|s| s.target.starts_with(TARGET_IQN_PREFIX) && s.state != SESSION_LOGGED_IN)
            .collect();
        // A sid reused for another target starts a new watch.
        self.down
            .retain(|sid, d| down.iter().any(|s| s.sid == *sid && s.target == d.target));
        let mut out = Vec::new();
        for s in down {
            let d = self.down.entry(s.sid).or_insert_with(|| Down {
                target: s.target.clone(),
                since: now,
                last_reset: None,
            });
            let last = d.last_reset.unwrap_or(d.since);
            if now.saturating_duration_since(last) >= self.after {
                d.last_reset = Some(now);
                out.push(Due {
                    sid: s.sid,
                    target: s.target.clone(),
                    state: s.state.clone(),
                    down_for: now.saturating_duration_since(d.since),
                });
            }
        }
        out.sort_by_key(|d| d.sid);
        out
    }
}

impl Node {
    /// One round of session repair (see the module documentation): the sessions reset.
    /// Each reset holds the target's lock and first checks the session is still there and
    /// still down; a failed reset is logged and retried `after` later.
    pub async fn repair_sessions(
        &self,
        repair: &mut SessionRepair,
    ) -> Result<Vec<u32>, super::NodeError> {
        let sessions = self.initiator.session_states().await?;
        let mut reset = Vec::new();
        for due in repair.due(Instant::now(), &sessions) {
            let _lock = self.targets.lock(&due.target).await;
            let still_down = self.initiator.session_states().await?.iter().any(|s| {
                s.sid == due.sid && s.target == due.target && s.state != SESSION_LOGGED_IN
            });
            if !still_down {
                continue;
            }
            match self.initiator.reset_connection(due.sid).await {
                Ok(()) => {
                    tracing::warn!(
                        sid = due.sid,
                        target = %due.target,
                        state = %due.state,
                        down_secs = due.down_for.as_secs(),
                        "session down: its connection was stopped for recovery so iscsid can log in again"
                    );
                    self.repairs.stopped.inc();
                    reset.push(due.sid);
                }
                Err(e) => {
                    self.repairs.failed.inc();
                    tracing::warn!(
                        sid = due.sid,
                        target = %due.target,
                        error = %crate::logging::error_chain(&e),
                        "session down and its connection cannot be stopped for recovery"
                    )
                }
            }
        }
        Ok(reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(sid: u32, target: &str, state: &str) -> SysSession {
        SysSession {
            sid,
            target: target.into(),
            state: state.into(),
        }
    }

    const OURS: &str = "iqn.2026-01.dev.cinderblock:volume-a";
    const THEIRS: &str = "iqn.2003-01.org.example:disk1";

    #[test]
    fn a_session_down_for_the_delay_is_reset_then_again_every_delay() {
        let mut r = SessionRepair::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let failed = vec![s(3, OURS, "FAILED")];
        assert_eq!(r.due(at(0), &failed), vec![]);
        assert_eq!(r.due(at(29), &failed), vec![]);
        let first = r.due(at(30), &failed);
        assert_eq!(
            first,
            vec![Due {
                sid: 3,
                target: OURS.into(),
                state: "FAILED".into(),
                down_for: Duration::from_secs(30)
            }]
        );
        assert_eq!(r.due(at(45), &[s(3, OURS, "FREE")]), vec![]);
        let second = r.due(at(60), &[s(3, OURS, "FREE")]);
        assert_eq!(
            second
                .iter()
                .map(|d| (d.sid, d.down_for))
                .collect::<Vec<_>>(),
            vec![(3, Duration::from_secs(60))]
        );
    }

    #[test]
    fn logged_in_and_other_projects_sessions_are_never_reset() {
        let mut r = SessionRepair::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let all = vec![
            s(1, OURS, "LOGGED_IN"),
            s(2, THEIRS, "FAILED"),
            s(3, "iqn.2026-01.dev.cinderblock:volume-b", "FAILED"),
        ];
        assert_eq!(r.due(t0, &all), vec![]);
        let due = r.due(t0 + Duration::from_secs(100), &all);
        assert_eq!(due.iter().map(|d| d.sid).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn a_session_back_up_or_reused_starts_a_new_watch() {
        let mut r = SessionRepair::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(r.due(at(0), &[s(4, OURS, "FAILED")]), vec![]);
        // Back up at 5 s: the watch ends.
        assert_eq!(r.due(at(5), &[s(4, OURS, "LOGGED_IN")]), vec![]);
        assert_eq!(r.due(at(8), &[s(4, OURS, "FAILED")]), vec![]);
        assert_eq!(r.due(at(17), &[s(4, OURS, "FAILED")]), vec![]);
        assert_eq!(r.due(at(18), &[s(4, OURS, "FAILED")]).len(), 1);
        // sid 4 now names another target: its watch starts again.
        let other = "iqn.2026-01.dev.cinderblock:volume-c";
        assert_eq!(r.due(at(19), &[s(4, other, "FAILED")]), vec![]);
        assert_eq!(r.due(at(29), &[s(4, other, "FAILED")]).len(), 1);
    }
}
