//! Leader election of controller replicas through a `coordination.k8s.io/v1` Lease
//! (ADR 0006).
//!
//! The rules are client-go's: a replica may take the Lease when it is free or when its record
//! has not changed for `leaseDurationSeconds` *as this replica observed it* (its own monotonic
//! clock, so clock skew between nodes does not matter); every write is an update with the
//! `resourceVersion` read, so two replicas racing for the Lease cannot both win. The leader
//! renews every `retry_period`; when it has not renewed for `renew_deadline` (less than the
//! lease duration) it steps down, so it has stopped before anyone can take over. On a clean
//! shutdown the leader releases the Lease so that the next one starts at once.
//!
//! [`Elector`] is the pure state machine; [`run`] drives it against the apiserver and
//! publishes the outcome in a [`Leadership`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::KubeError;

/// Timing of an election (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// How long a record holds without renewal.
    pub lease_duration: Duration,
    /// How long a leader tries to renew before stepping down.
    pub renew_deadline: Duration,
    /// Time between two attempts.
    pub retry_period: Duration,
}

/// What a Lease says, in the elector's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The holder (`None` or empty: free).
    pub holder: Option<String>,
    /// How long the holder's claim lasts after each renewal, in seconds.
    pub lease_duration_secs: Option<i32>,
    /// When the holder took it.
    pub acquire_time: Option<Timestamp>,
    /// When the holder last renewed.
    pub renew_time: Option<Timestamp>,
    /// How many times it changed hands.
    pub transitions: i32,
}

impl Record {
    fn from_lease(l: &Lease) -> Record {
        let spec = l.spec.clone().unwrap_or_default();
        Record {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            lease_duration_secs: spec.lease_duration_seconds,
            acquire_time: spec.acquire_time.map(|t| t.0),
            renew_time: spec.renew_time.map(|t| t.0),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }

    fn to_spec(&self) -> LeaseSpec {
        LeaseSpec {
            holder_identity: self.holder.clone(),
            lease_duration_seconds: self.lease_duration_secs,
            acquire_time: self.acquire_time.map(MicroTime),
            renew_time: self.renew_time.map(MicroTime),
            lease_transitions: Some(self.transitions),
            ..LeaseSpec::default()
        }
    }
}

/// What to do after observing the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Write `Record` (take or renew the Lease) with the observed resourceVersion.
    Write(Record),
    /// Someone else holds a live claim: stay a follower and look again later.
    Follow {
        /// The holder.
        holder: String,
    },
}

/// One replica's view of the election.
#[derive(Clone, Debug)]
pub struct Elector {
    identity: String,
    timing: Timing,
    /// The last record seen and when (this replica's clock) it was first seen unchanged.
    observed: Option<(Record, Instant)>,
    /// When this replica last wrote the Lease successfully as its holder.
    renewed_at: Option<Instant>,
}

impl Elector {
    /// A replica called `identity`.
    pub fn new(identity: impl Into<String>, timing: Timing) -> Self {
        Elector {
            identity: identity.into(),
            timing,
            observed: None,
            renewed_at: None,
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Notes the record read at `now` (`None`: no Lease yet).
    pub fn observe(&mut self, record: Option<&Record>, now: Instant) {
        match (record, &self.observed) {
            (Some(r), Some((seen, _))) if r == seen => {}
            (Some(r), _) => self.observed = Some((r.clone(), now)),
            (None, _) => self.observed = None,
        }
    }

    /// What to do at `now` (wall clock `wall`) given the last observation.
    pub fn decide(&self, now: Instant, wall: Timestamp) -> Action {
        let duration_secs = i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let take = |prev: Option<&Record>| {
            let prev_holder = prev.and_then(|r| r.holder.clone());
            let mine = prev_holder.as_deref() == Some(self.identity.as_str());
            let transitions = prev.map_or(0, |r| r.transitions);
            Action::Write(Record {
                holder: Some(self.identity.clone()),
                lease_duration_secs: Some(duration_secs),
                acquire_time: if mine {
                    prev.and_then(|r| r.acquire_time)
                } else {
                    Some(wall)
                },
                renew_time: Some(wall),
                transitions: if mine || prev_holder.is_none() && transitions == 0 {
                    transitions
                } else {
                    transitions + 1
                },
            })
        };
        let Some((record, seen_at)) = &self.observed else {
            return take(None);
        };
        match &record.holder {
            None => take(Some(record)),
            Some(h) if *h == self.identity => take(Some(record)),
            Some(h) => {
                let lasts = record
                    .lease_duration_secs
                    .and_then(|s| u64::try_from(s).ok())
                    .map_or(self.timing.lease_duration, Duration::from_secs);
                if now.duration_since(*seen_at) > lasts {
                    take(Some(record))
                } else {
                    Action::Follow { holder: h.clone() }
                }
            }
        }
    }

    /// Notes a successful write of `record` at `now`.
    pub fn wrote(&mut self, record: Record, now: Instant) {
        self.observed = Some((record, now));
        self.renewed_at = Some(now);
    }

    /// Notes that this replica is not (or no longer) the holder.
    pub fn lost(&mut self) {
        self.renewed_at = None;
    }

    /// Whether this replica leads at `now`: it renewed within the renew deadline.
    pub fn leading(&self, now: Instant) -> bool {
        self.renewed_at
            .is_some_and(|t| now.duration_since(t) < self.timing.renew_deadline)
    }
}

/// The outcome of the election, shared with whoever must act only as leader.
#[derive(Clone, Debug)]
pub struct Leadership {
    state: watch::Receiver<LeaderState>,
}

/// Who leads, as this replica knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderState {
    /// This replica leads.
    pub leading: bool,
    /// The holder last seen (this replica's identity when leading).
    pub holder: Option<String>,
}

impl Leadership {
    /// A replica that always leads (election disabled: a single replica).
    pub fn always() -> Leadership {
        let (tx, rx) = watch::channel(LeaderState {
            leading: true,
            holder: None,
        });
        // The receiver keeps the value after the sender is gone.
        drop(tx);
        Leadership { state: rx }
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        self.state.borrow().leading
    }

    /// The holder last seen.
    pub fn holder(&self) -> Option<String> {
        self.state.borrow().holder.clone()
    }

    /// A token cancelled when this replica stops leading (or at once if it does not lead).
    /// Waits until it leads or `shutdown`; `None` on shutdown.
    pub async fn term(&self, shutdown: &CancellationToken) -> Option<CancellationToken> {
        let mut rx = self.state.clone();
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = rx.wait_for(|s| s.leading) => { r.ok()?; }
        }
        let term = shutdown.child_token();
        let end = term.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = end.cancelled() => {}
                _ = rx.wait_for(|s| !s.leading) => end.cancel(),
            }
        });
        Some(term)
    }
}

/// Where the Lease is.
#[derive(Clone, Debug)]
pub struct LeaseRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// Starts the election and returns the [`Leadership`] it publishes; the task runs until
/// `shutdown`, then releases the Lease if it holds it.
pub fn start(
    client: kube::Client,
    lease: LeaseRef,
    elector: Elector,
    shutdown: CancellationToken,
) -> (Leadership, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(LeaderState::default());
    let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
    let task = tokio::spawn(run(api, lease.name, elector, tx, shutdown));
    (Leadership { state: rx }, task)
}

async fn run(
    api: Api<Lease>,
    name: String,
    mut elector: Elector,
    tx: watch::Sender<LeaderState>,
    shutdown: CancellationToken,
) {
    tracing::info!(lease = %name, identity = elector.identity(), "leader election started");
    loop {
        match step(&api, &name, &mut elector).await {
            Ok(holder) => publish(&tx, &elector, holder),
            Err(e) => {
                tracing::warn!(lease = %name, error = %crate::logging::error_chain(&e), "leader election: cannot reach the Lease");
                // Still leading until the renew deadline passes.
                let holder = tx.borrow().holder.clone();
                publish(&tx, &elector, holder);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(elector.timing.retry_period) => {}
        }
    }
    if elector.leading(Instant::now()) {
        tx.send_replace(LeaderState::default());
        if let Err(e) = release(&api, &name, elector.identity()).await {
            tracing::warn!(lease = %name, error = %crate::logging::error_chain(&e), "could not release the Lease");
        } else {
            tracing::info!(lease = %name, "Lease released");
        }
    }
}

fn publish(tx: &watch::Sender<LeaderState>, elector: &Elector, holder: Option<String>) {
    let state = LeaderState {
        leading: elector.leading(Instant::now()),
        holder,
    };
    let before = tx.borrow().clone();
    if before.leading != state.leading {
        if state.leading {
            tracing::info!(identity = elector.identity(), "became the leader");
        } else {
            tracing::warn!(identity = elector.identity(), holder = ?state.holder, "stopped leading");
        }
    }
    if before != state {
        tx.send_replace(state);
    }
}

/// One round: read, decide, write. Returns the holder afterwards.
async fn step(
    api: &Api<Lease>,
    name: &str,
    elector: &mut Elector,
) -> Result<Option<String>, KubeError> {
    let current = api
        .get_opt(name)
        .await
        .map_err(KubeError::api(format!("get Lease {name}")))?;
    let now = Instant::now();
    elector.observe(current.as_ref().map(Record::from_lease).as_ref(), now);
    match elector.decide(now, Timestamp::now()) {
        Action::Follow { holder } => {
            elector.lost();
            Ok(Some(holder))
        }
        Action::Write(record) => {
            let spec = record.to_spec();
            let result = match current {
                Some(mut lease) => {
                    lease.spec = Some(spec);
                    api.replace(name, &PostParams::default(), &lease).await
                }
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(name.to_owned()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(spec),
                    };
                    api.create(&PostParams::default(), &lease).await
                }
            };
            match result {
                Ok(written) => {
                    elector.wrote(Record::from_lease(&written), Instant::now());
                    Ok(record.holder)
                }
                // Another replica wrote first (resourceVersion changed, or it created the
                // Lease): follow it; the next round reads who.
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    elector.lost();
                    Ok(None)
                }
                Err(e) => Err(KubeError::api(format!("write Lease {name}"))(e)),
            }
        }
    }
}

/// Gives the Lease up (holder cleared, 1 s duration) if `identity` still holds it.
async fn release(api: &Api<Lease>, name: &str, identity: &str) -> Result<(), KubeError> {
    let Some(mut lease) = api
        .get_opt(name)
        .await
        .map_err(KubeError::api(format!("get Lease {name}")))?
    else {
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(identity) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    api.replace(name, &PostParams::default(), &lease)
        .await
        .map_err(KubeError::api(format!("release Lease {name}")))?;
    Ok(())
}

/// A shared, always-leading [`Leadership`] for roles without election.
pub fn always() -> Arc<Leadership> {
    Arc::new(Leadership::always())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timing = Timing {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };

    fn wall(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("time")
    }

    fn held_by(h: &str, transitions: i32) -> Record {
        Record {
            holder: Some(h.into()),
            lease_duration_secs: Some(15),
            acquire_time: Some(wall(0)),
            renew_time: Some(wall(0)),
            transitions,
        }
    }

    #[test]
    fn takes_a_missing_or_free_lease() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", T);
        e.observe(None, t0);
        let Action::Write(r) = e.decide(t0, wall(5)) else {
            panic!("should take a missing lease");
        };
        assert_eq!(
            r,
            Record {
                holder: Some("a".into()),
                lease_duration_secs: Some(15),
                acquire_time: Some(wall(5)),
                renew_time: Some(wall(5)),
                transitions: 0,
            }
        );
        // Released by its previous holder: taken at once, one more transition.
        let released = Record {
            holder: None,
            transitions: 3,
            ..held_by("b", 3)
        };
        e.observe(Some(&released), t0);
        let Action::Write(r) = e.decide(t0, wall(6)) else {
            panic!("should take a free lease");
        };
        assert_eq!((r.holder.as_deref(), r.transitions), (Some("a"), 4));
    }

    #[test]
    fn follows_a_live_holder_until_its_record_stops_changing_for_the_duration() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", T);
        e.observe(Some(&held_by("b", 1)), t0);
        assert_eq!(
            e.decide(t0 + Duration::from_secs(14), wall(14)),
            Action::Follow { holder: "b".into() }
        );
        // b renews at t0+10: the clock restarts from this replica's observation.
        let renewed = Record {
            renew_time: Some(wall(10)),
            ..held_by("b", 1)
        };
        e.observe(Some(&renewed), t0 + Duration::from_secs(10));
        assert_eq!(
            e.decide(t0 + Duration::from_secs(24), wall(24)),
            Action::Follow { holder: "b".into() }
        );
        // Unchanged for more than 15 s (as this replica saw it): taken over.
        e.observe(Some(&renewed), t0 + Duration::from_secs(20));
        let Action::Write(r) = e.decide(t0 + Duration::from_secs(26), wall(26)) else {
            panic!("should take an expired lease");
        };
        assert_eq!(
            (r.holder.as_deref(), r.transitions, r.acquire_time),
            (Some("a"), 2, Some(wall(26)))
        );
        // The remote wall clock does not matter: a renew_time far in the future expires the
        // same way.
        let skewed = Record {
            renew_time: Some(wall(10_000)),
            ..held_by("b", 1)
        };
        let mut e = Elector::new("a", T);
        e.observe(Some(&skewed), t0);
        assert!(matches!(
            e.decide(t0 + Duration::from_secs(16), wall(16)),
            Action::Write(_)
        ));
    }

    #[test]
    fn leader_renews_keeps_acquire_time_and_steps_down_after_the_deadline() {
        let t0 = Instant::now();
        let mut e = Elector::new("a", T);
        assert!(!e.leading(t0));
        let mine = held_by("a", 2);
        e.wrote(mine.clone(), t0);
        assert!(e.leading(t0 + Duration::from_secs(9)));
        let Action::Write(r) = e.decide(t0 + Duration::from_secs(2), wall(2)) else {
            panic!("should renew");
        };
        assert_eq!(
            (r.acquire_time, r.renew_time, r.transitions),
            (Some(wall(0)), Some(wall(2)), 2)
        );
        // No successful renewal for the renew deadline: no longer leading, well before the
        // lease duration lets another replica take over.
        assert!(!e.leading(t0 + Duration::from_secs(10)));
        assert!(T.renew_deadline < T.lease_duration);
        e.wrote(mine, t0 + Duration::from_secs(11));
        assert!(e.leading(t0 + Duration::from_secs(12)));
        e.lost();
        assert!(!e.leading(t0 + Duration::from_secs(12)));
    }

    #[tokio::test]
    async fn term_ends_when_leadership_ends() {
        let (tx, rx) = watch::channel(LeaderState::default());
        let l = Leadership { state: rx };
        let shutdown = CancellationToken::new();
        let waiter = {
            let l = l.clone();
            let s = shutdown.clone();
            tokio::spawn(async move { l.term(&s).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "waits while not leading");
        tx.send_replace(LeaderState {
            leading: true,
            holder: Some("a".into()),
        });
        let term = waiter.await.expect("join").expect("a term");
        assert!(!term.is_cancelled());
        assert!(l.is_leader());
        tx.send_replace(LeaderState::default());
        tokio::time::timeout(Duration::from_secs(2), term.cancelled())
            .await
            .expect("term cancelled when leadership ends");
        shutdown.cancel();
        assert_eq!(l.term(&shutdown).await, None);
    }
}
