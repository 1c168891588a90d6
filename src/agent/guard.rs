//! Per-object operation guard: a second concurrent operation on the same volume or snapshot
//! is refused at once (ABORTED on the wire) instead of queueing behind the first.
//!
//! The guards also tell reconciliation which objects changed while it was reading durable
//! state: [`Guards::mark`] starts a window, [`Guards::changed_since`] says whether an
//! operation on a key was running, started or finished since then. A record read inside the
//! window may predate such an operation, so reconciliation must not act on it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::AgentError;

#[derive(Debug, Default)]
struct State {
    /// Ids with an operation in progress.
    busy: HashSet<String>,
    /// The window number in which each id was last claimed or released (only ids touched
    /// since the current window began).
    touched: HashMap<String, u64>,
    /// The current window.
    window: u64,
}

/// The set of ids with an operation in progress.
#[derive(Clone, Debug, Default)]
pub struct Guards {
    // Protects the busy set and the change record; held only for a few map operations,
    // never across `.await`.
    state: Arc<Mutex<State>>,
}

/// Held for the duration of one operation; releases the id when dropped.
#[derive(Debug)]
pub struct Guard {
    state: Arc<Mutex<State>>,
    key: String,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Guards {
    /// Claims `key`, or fails with [`AgentError::Busy`] when it is already claimed.
    pub fn try_lock(&self, key: &str) -> Result<Guard, AgentError> {
        let mut st = lock(&self.state);
        if !st.busy.insert(key.to_owned()) {
            return Err(AgentError::Busy(key.to_owned()));
        }
        let w = st.window;
        st.touched.insert(key.to_owned(), w);
        Ok(Guard {
            state: self.state.clone(),
            key: key.to_owned(),
        })
    }

    /// True when `key` is claimed (for status reporting).
    pub fn is_busy(&self, key: &str) -> bool {
        lock(&self.state).busy.contains(key)
    }

    /// Starts a new window and returns its number.
    pub fn mark(&self) -> u64 {
        let mut st = lock(&self.state);
        st.window += 1;
        // Entries of earlier windows can only matter to an older mark.
        st.touched.clear();
        st.window
    }

    /// True when an operation on `key` is running now, or was claimed or released since
    /// window `mark` began.
    pub fn changed_since(&self, key: &str, mark: u64) -> bool {
        let st = lock(&self.state);
        st.busy.contains(key) || st.touched.get(key).is_some_and(|w| *w >= mark)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        st.busy.remove(&self.key);
        let w = st.window;
        st.touched.insert(std::mem::take(&mut self.key), w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_busy_until_drop() {
        let g = Guards::default();
        let first = g.try_lock("v1").unwrap();
        assert!(matches!(g.try_lock("v1"), Err(AgentError::Busy(k)) if k == "v1"));
        let other = g.try_lock("v2").unwrap();
        drop(first);
        assert!(!g.is_busy("v1"));
        let _again = g.try_lock("v1").unwrap();
        drop(other);
    }

    #[test]
    fn changes_are_seen_by_the_window_they_overlap() {
        let g = Guards::default();
        let before = g.try_lock("running").unwrap();
        drop(g.try_lock("done-before").unwrap());
        let m = g.mark();
        let during = g.try_lock("started").unwrap();
        drop(during);
        assert_eq!(
            ["running", "done-before", "started", "untouched"].map(|k| g.changed_since(k, m)),
            [true, false, true, false]
        );
        drop(before);
        assert!(g.changed_since("running", m), "released inside the window");
        let next = g.mark();
        assert!(!g.changed_since("running", next) && !g.changed_since("started", next));
    }
}
