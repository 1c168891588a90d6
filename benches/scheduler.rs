//! Scheduler decision time for 100, 1 000 and 10 000 pools.
//!
//! Each pool count gets a deterministic fleet (varied capacity, thin/thick, reserve, zones,
//! capabilities, a few unhealthy or unknown-capacity pools) and a rotation of requests that
//! exercise every filter and weigher. After a warm-up, each of `DECISIONS` decisions is timed on
//! its own: `Scheduler::schedule` and `Decision::best`, which is what placing a volume needs.
//!
//! stdout gets exactly one line per pool count, in the project's bench format; the baseline is
//! the decision budget itself (1 ms at p50), so the ratio must stay at or below 1.00:
//!
//! ```text
//! bench: scheduler_p50_10000_pools = 412.3 us (baseline budget = 1000 us, ratio 0.41, goal <= 1.00)
//! ```
//!
//! The p99, the time to also sort the full ranking (`Decision::ranked`, computed on demand) and
//! the fleet's shape go to stderr, for information.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use cinderblock::scheduler::{
    Capacity, PoolRef, PoolSet, PoolState, Request, Scheduler, SchedulerConfig, SchedulerError,
    WeigherConfig, WeigherKind, PROVISIONING_TYPE_KEY,
};
use cinderblock::types::Bytes;

const POOL_COUNTS: [usize; 3] = [100, 1_000, 10_000];
const WARMUP: usize = 20;
const DECISIONS: usize = 200;
/// The p50 budget per decision, in microseconds.
const BUDGET_US: f64 = 1_000.0;
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
const MEDIA: [&str; 3] = ["ssd", "hdd", "nvme"];
const POOLS_PER_AGENT: usize = 4;

/// SplitMix64: a tiny deterministic generator, so every run measures the same fleet.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

fn agent_name(i: usize) -> String {
    format!("node-{:05}", i / POOLS_PER_AGENT)
}

fn build_pool(i: usize, rng: &mut Rng) -> PoolState {
    let id = PoolRef::new(agent_name(i), format!("vg{}", i % POOLS_PER_AGENT));
    let total = Bytes::gib(512 * (1 + rng.below(32)));
    let mut p = PoolState::new(id, rng.pick(&ZONES), total);
    let used = total.get() / 100 * rng.below(100);
    p.free = Capacity::Known(Bytes(total.get() - used));
    p.reserved_percentage = [0, 5, 10][rng.below(3) as usize];
    if rng.below(2) == 0 {
        p.thin_provisioning = true;
        p.thick_provisioning = rng.below(2) == 0;
        p.max_over_subscription_ratio = 1.0 + rng.below(20) as f64;
        p.provisioned = Bytes(used.saturating_mul(1 + rng.below(4)));
    } else {
        p.provisioned = Bytes(used);
    }
    p.allocated = p.provisioned;
    p.volume_count = rng.below(500);
    match rng.below(100) {
        0 => p.free = Capacity::Unknown,
        1 => p.free = Capacity::Infinite,
        2 | 3 => p.healthy = false,
        _ => {}
    }
    let caps: BTreeMap<String, String> = [
        ("media", rng.pick(&MEDIA).to_string()),
        (
            "multiattach",
            ["True", "False"][rng.below(2) as usize].to_string(),
        ),
        ("iops", (1_000 * (1 + rng.below(20))).to_string()),
        ("features", "[compression, dedup]".to_string()),
        ("vendor", "cinderblock".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    p.capabilities = caps;
    p
}

fn build_pools(n: usize) -> Result<PoolSet, SchedulerError> {
    let mut rng = Rng(n as u64);
    PoolSet::from_pools((0..n).map(|i| build_pool(i, &mut rng)))
}

fn specs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A rotation of requests touching every filter, operator family and zone option.
fn requests(n: usize) -> Vec<Request> {
    let mut plain = Request::new(Bytes::gib(10));
    plain.preferred_zones = vec![ZONES[0].to_string()];

    let mut fast = Request::new(Bytes::gib(100));
    fast.extra_specs = specs(&[
        ("capabilities:media", "<or> ssd <or> nvme"),
        ("iops", ">= 5000"),
        ("qos:read_iops_sec", "20000"),
    ]);
    fast.requisite_zones = ZONES[..2].iter().map(|z| z.to_string()).collect();
    fast.preferred_zones = vec![ZONES[1].to_string(), ZONES[0].to_string()];

    let mut shared = Request::new(Bytes::gib(50));
    shared.extra_specs = specs(&[
        ("multiattach", "<is> True"),
        ("capabilities:features", "<all-in> compression"),
        ("vendor", "s== cinderblock"),
        (PROVISIONING_TYPE_KEY, "thick"),
    ]);

    let mut big = Request::new(Bytes::gib(2048));
    big.extra_specs = specs(&[("media", "<in> d")]);
    big.different_backend_as = (0..8).map(|i| agent_name(i * POOLS_PER_AGENT)).collect();

    let mut retry = Request::new(Bytes::gib(5));
    for i in 0..3.min(n) {
        retry.exclude_pool(PoolRef::new(
            agent_name(i),
            format!("vg{}", i % POOLS_PER_AGENT),
        ));
    }

    vec![plain, fast, shared, big, retry]
}

fn scheduler() -> Result<Scheduler, SchedulerError> {
    Scheduler::new(SchedulerConfig {
        weighers: vec![
            WeigherKind::CapacityWeigher.into(),
            WeigherKind::VolumeNumberWeigher.into(),
            WeigherConfig::new(WeigherKind::AllocatedCapacityWeigher, -0.5),
        ],
        ..SchedulerConfig::default()
    })
}

/// The `q` quantile (0..=1) of sorted `xs`, nearest rank.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Percentiles of one timed series.
struct Times {
    p50: Duration,
    p99: Duration,
}

impl Times {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        Times {
            p50: quantile(&samples, 0.5),
            p99: quantile(&samples, 0.99),
        }
    }
}

/// Decision times, then decision-plus-full-ranking times, over `n` pools.
fn run(n: usize, scheduler: &Scheduler) -> Result<(Times, Times), SchedulerError> {
    let pools = build_pools(n)?;
    let requests = requests(n);
    let mut decide = Vec::with_capacity(DECISIONS);
    let mut rank = Vec::with_capacity(DECISIONS);
    let mut candidates = 0;
    for round in 0..WARMUP + DECISIONS {
        let request = &requests[round % requests.len()];

        let start = Instant::now();
        let decision = scheduler.schedule(black_box(&pools), black_box(request))?;
        black_box(decision.best());
        let decided = start.elapsed();

        let start = Instant::now();
        let decision = scheduler.schedule(black_box(&pools), black_box(request))?;
        black_box(decision.ranked());
        let ranked = start.elapsed();

        if round >= WARMUP {
            decide.push(decided);
            rank.push(ranked);
            candidates += decision.ranked().len();
        }
    }
    eprintln!(
        "note: {n} pools: {:.0} candidates per decision on average",
        candidates as f64 / DECISIONS as f64
    );
    Ok((Times::of(decide), Times::of(rank)))
}

fn main() -> ExitCode {
    let scheduler = match scheduler() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench: bad scheduler config: {e}");
            return ExitCode::FAILURE;
        }
    };
    for n in POOL_COUNTS {
        let (decide, rank) = match run(n, &scheduler) {
            Ok(times) => times,
            Err(e) => {
                eprintln!("bench: scheduling over {n} pools failed: {e}");
                return ExitCode::FAILURE;
            }
        };
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!(
            "bench: scheduler_p50_{n}_pools = {:.1} us (baseline budget = {BUDGET_US:.0} us, ratio {:.2}, goal <= 1.00)",
            us(decide.p50),
            us(decide.p50) / BUDGET_US
        );
        eprintln!(
            "note: scheduler_p99_{n}_pools = {:.1} us; with the full ranking sorted: p50 {:.1} us, p99 {:.1} us",
            us(decide.p99),
            us(rank.p50),
            us(rank.p99)
        );
    }
    ExitCode::SUCCESS
}
