//! A minimal Prometheus endpoint: `GET /metrics` over plain HTTP/1.1, answered in the text
//! exposition format (version 0.0.4), one connection per request.
//!
//! Deliberately small: counters are atomics ([`Counter`]) or a bounded map of label values
//! ([`CounterVec`]); gauges are read when scraped, by a [`Collector`] that writes every
//! family into an [`Exposition`]. Each role that serves metrics (the agent today) has its own
//! collector; this module knows nothing about them.
//!
//! The endpoint has no authentication and no TLS: bind it to a loopback or cluster-internal
//! address. Requests are bounded (head size, time, concurrent connections).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Largest request head read (request line and headers); longer requests get 400.
const MAX_HEAD: usize = 8 << 10;
/// Time one connection gets, from accept to the last byte of the answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 8;
/// The exposition format's content type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listening socket could not be bound.
    #[error("cannot listen for metrics on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------------------------------
// Values

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (or is replaced), read at each scrape.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Replaces the value.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counts per combination of label values, at most `max_series` combinations: once full, new
/// combinations are counted under every label set to `other` (label values may come from
/// clients, and must not grow the map without bound).
#[derive(Debug)]
pub struct CounterVec {
    labels: &'static [&'static str],
    max_series: usize,
    // Label values → count. Locked briefly, never across an `.await`.
    series: Mutex<BTreeMap<Vec<String>, u64>>,
}

/// The label value that collects combinations beyond a [`CounterVec`]'s limit.
pub const OVERFLOW_LABEL: &str = "other";

impl CounterVec {
    /// Counts per values of `labels`.
    pub fn new(labels: &'static [&'static str], max_series: usize) -> Self {
        CounterVec {
            labels,
            max_series,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// The label names.
    pub fn labels(&self) -> &'static [&'static str] {
        self.labels
    }

    /// Adds one to the series of `values` (one per label, in order).
    pub fn inc(&self, values: &[&str]) {
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        if !series.contains_key(&key) && series.len() >= self.max_series {
            let other = vec![OVERFLOW_LABEL.to_owned(); self.labels.len()];
            *series.entry(other).or_insert(0) += 1;
            return;
        }
        *series.entry(key).or_insert(0) += 1;
    }

    /// Every series with its count, sorted by label values.
    pub fn snapshot(&self) -> Vec<(Vec<String>, u64)> {
        self.series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// Latency buckets (seconds) for RPC histograms: 5 ms to 5 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// One series of a histogram: a count per bucket (not cumulative), their sum and count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramData {
    /// Observations in each bucket (those above the last bucket are only in `count`).
    pub counts: Vec<u64>,
    /// Sum of the observations.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

/// Observations per combination of label values, bounded like [`CounterVec`].
#[derive(Debug)]
pub struct HistogramVec {
    labels: &'static [&'static str],
    buckets: &'static [f64],
    max_series: usize,
    // Label values → data. Locked briefly, never across an `.await`.
    series: Mutex<BTreeMap<Vec<String>, HistogramData>>,
}

impl HistogramVec {
    /// A histogram over `labels` with upper bounds `buckets` (ascending).
    pub fn new(
        labels: &'static [&'static str],
        buckets: &'static [f64],
        max_series: usize,
    ) -> Self {
        HistogramVec {
            labels,
            buckets,
            max_series,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records `value` in the series of `values`.
    pub fn observe(&self, values: &[&str], value: f64) {
        let mut key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        if !series.contains_key(&key) && series.len() >= self.max_series {
            key = vec![OVERFLOW_LABEL.to_owned(); self.labels.len()];
        }
        let data = series.entry(key).or_insert_with(|| HistogramData {
            counts: vec![0; self.buckets.len()],
            ..HistogramData::default()
        });
        if let Some(i) = self.buckets.iter().position(|le| value <= *le) {
            data.counts[i] += 1;
        }
        data.sum += value;
        data.count += 1;
    }

    /// Every series, sorted by label values.
    pub fn snapshot(&self) -> Vec<(Vec<String>, HistogramData)> {
        self.series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// The text format

/// What a metric family is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (names end in `_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in cumulative buckets (`_bucket`, `_sum`, `_count` samples).
    Histogram,
}

/// A scrape's answer being written: families of samples in the text exposition format.
#[derive(Debug, Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// Starts the family `name`: its `# HELP` and `# TYPE` lines. Samples follow.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.sample_text(name, labels, &value.to_string());
    }

    /// One sample whose value is already formatted (floats, `+Inf`).
    fn sample_text(&mut self, name: &str, labels: &[(&str, &str)], value: &str) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape_label(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family with one unlabelled sample.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: u64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    /// A counter family from a [`CounterVec`].
    pub fn counter_vec(&mut self, name: &str, help: &str, counts: &CounterVec) {
        self.family(name, Kind::Counter, help);
        for (values, n) in counts.snapshot() {
            let labels: Vec<(&str, &str)> = counts
                .labels()
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            self.sample(name, &labels, n);
        }
    }

    /// A histogram family from a [`HistogramVec`] (seconds).
    pub fn histogram_vec(&mut self, name: &str, help: &str, h: &HistogramVec) {
        self.family(name, Kind::Histogram, help);
        for (values, data) in h.snapshot() {
            let mut labels: Vec<(&str, &str)> = h
                .labels
                .iter()
                .copied()
                .zip(values.iter().map(String::as_str))
                .collect();
            let bucket = format!("{name}_bucket");
            let bounds: Vec<String> = h.buckets.iter().map(f64::to_string).collect();
            let mut cumulative = 0;
            for (i, le) in bounds.iter().enumerate() {
                cumulative += data.counts.get(i).copied().unwrap_or(0);
                labels.push(("le", le));
                self.sample(&bucket, &labels, cumulative);
                labels.pop();
            }
            labels.push(("le", "+Inf"));
            self.sample(&bucket, &labels, data.count);
            labels.pop();
            self.sample_text(&format!("{name}_sum"), &labels, &data.sum.to_string());
            self.sample(&format!("{name}_count"), &labels, data.count);
        }
    }

    /// The text written so far.
    pub fn into_text(self) -> String {
        self.text
    }
}

/// A label value as the format wants it: `\`, `"` and newlines escaped.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// What a role exposes: writes every family at each scrape.
#[async_trait::async_trait]
pub trait Collector: Send + Sync {
    /// Writes the current values.
    async fn collect(&self, out: &mut Exposition);

    /// What `GET /healthz` answers: `Ok` (200 `ok`) or why not (503). Default: the process
    /// answers, so it is alive.
    async fn healthy(&self) -> Result<(), String> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The HTTP side

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// `GET /metrics` (`head_only` for `HEAD`).
    Metrics { head_only: bool },
    /// `GET /healthz`.
    Healthz { head_only: bool },
    /// Another path.
    NotFound,
    /// Another method.
    MethodNotAllowed,
    /// Not an HTTP/1.x request line.
    BadRequest,
}

/// Routes a request by its head (request line and headers).
fn route(head: &str) -> Route {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Route::BadRequest;
    }
    let path = target.split('?').next().unwrap_or_default();
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Route::MethodNotAllowed,
    };
    match path {
        "/metrics" => Route::Metrics { head_only },
        "/healthz" => Route::Healthz { head_only },
        _ => Route::NotFound,
    }
}

/// Binds the metrics listener (at start, so that a taken port stops the role at once).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Answers scrapes on `listener` with `collector`'s metrics until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    collector: Arc<dyn Collector>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics serving on /metrics");
    }
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, go on.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: too many connections; closed");
            continue;
        };
        let collector = collector.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(CONNECTION_TIMEOUT, answer(stream, collector.as_ref())).await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "metrics: connection failed"),
                Err(_) => tracing::debug!(%peer, "metrics: connection timed out"),
            }
        });
    }
}

/// Reads one request head and writes the answer.
async fn answer(mut stream: TcpStream, collector: &dyn Collector) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let complete = loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break true;
        }
        if head.len() > MAX_HEAD {
            break false;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break false;
        }
        head.extend_from_slice(&buf[..n]);
    };
    let route = if complete {
        route(&String::from_utf8_lossy(&head))
    } else {
        Route::BadRequest
    };
    let (status, extra, body, head_only) = match route {
        Route::Metrics { head_only } => {
            let mut out = Exposition::default();
            collector.collect(&mut out).await;
            ("200 OK", "", out.into_text(), head_only)
        }
        Route::Healthz { head_only } => match collector.healthy().await {
            Ok(()) => ("200 OK", "", "ok\n".to_owned(), head_only),
            Err(why) => ("503 Service Unavailable", "", format!("{why}\n"), head_only),
        },
        Route::NotFound => (
            "404 Not Found",
            "",
            "not found: try /metrics\n".into(),
            false,
        ),
        Route::MethodNotAllowed => (
            "405 Method Not Allowed",
            "Allow: GET, HEAD\r\n",
            "method not allowed\n".into(),
            false,
        ),
        Route::BadRequest => ("400 Bad Request", "", "bad request\n".into(), false),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let cases = [
            (
                "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                Route::Metrics { head_only: false },
            ),
            (
                "GET /metrics?x=1 HTTP/1.0\r\n\r\n",
                Route::Metrics { head_only: false },
            ),
            (
                "HEAD /metrics HTTP/1.1\r\n\r\n",
                Route::Metrics { head_only: true },
            ),
            ("GET / HTTP/1.1\r\n\r\n", Route::NotFound),
            (
                "GET /healthz HTTP/1.1\r\n\r\n",
                Route::Healthz { head_only: false },
            ),
            ("GET /metricsx HTTP/1.1\r\n\r\n", Route::NotFound),
            ("POST /metrics HTTP/1.1\r\n\r\n", Route::MethodNotAllowed),
            ("GET /metrics\r\n\r\n", Route::BadRequest),
            ("GET /metrics HTTP/2\r\n\r\n", Route::BadRequest),
            ("GET metrics HTTP/1.1\r\n\r\n", Route::BadRequest),
            ("", Route::BadRequest),
        ];
        for (head, want) in cases {
            assert_eq!(route(head), want, "{head:?}");
        }
    }

    #[test]
    fn text_format() {
        let mut out = Exposition::default();
        out.single("a_total", Kind::Counter, "Things.\nMore.", 3);
        out.family("b_bytes", Kind::Gauge, "Bytes by pool.");
        out.sample("b_bytes", &[("pool", "p\"1\\\n"), ("x", "y")], 42);
        assert_eq!(
            out.into_text(),
            "# HELP a_total Things.\\nMore.\n# TYPE a_total counter\na_total 3\n\
             # HELP b_bytes Bytes by pool.\n# TYPE b_bytes gauge\n\
             b_bytes{pool=\"p\\\"1\\\\\\n\",x=\"y\"} 42\n"
        );
    }

    #[test]
    fn histogram_text() {
        static B: &[f64] = &[0.1, 1.0];
        let h = HistogramVec::new(&["rpc"], B, 8);
        h.observe(&["A"], 0.0625);
        h.observe(&["A"], 0.5);
        h.observe(&["A"], 3.0);
        let mut out = Exposition::default();
        out.histogram_vec("d_seconds", "D.", &h);
        assert_eq!(
            out.into_text(),
            "# HELP d_seconds D.\n# TYPE d_seconds histogram\n\
             d_seconds_bucket{rpc=\"A\",le=\"0.1\"} 1\n\
             d_seconds_bucket{rpc=\"A\",le=\"1\"} 2\n\
             d_seconds_bucket{rpc=\"A\",le=\"+Inf\"} 3\n\
             d_seconds_sum{rpc=\"A\"} 3.5625\n\
             d_seconds_count{rpc=\"A\"} 3\n"
        );
    }

    #[test]
    fn counter_vec_is_bounded() {
        let c = CounterVec::new(&["rpc", "code"], 2);
        c.inc(&["A", "OK"]);
        c.inc(&["A", "OK"]);
        c.inc(&["B", "OK"]);
        c.inc(&["C", "OK"]);
        c.inc(&["D", "NotFound"]);
        c.inc(&["A", "OK"]);
        let text = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            c.snapshot(),
            vec![
                (text(&["A", "OK"]), 3),
                (text(&["B", "OK"]), 1),
                (text(&["other", "other"]), 2),
            ]
        );
        let mut out = Exposition::default();
        out.counter_vec("r_total", "R.", &c);
        assert!(out
            .into_text()
            .contains("r_total{rpc=\"other\",code=\"other\"} 2\n"),);
    }

    struct Fixed;

    #[async_trait::async_trait]
    impl Collector for Fixed {
        async fn collect(&self, out: &mut Exposition) {
            out.single("up", Kind::Gauge, "Up.", 1);
        }
    }

    async fn http(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_scrapes_over_http() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(Fixed), shutdown.clone()));

        let body = "# HELP up Up.\n# TYPE up gauge\nup 1\n";
        assert_eq!(
            http(addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await,
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            )
        );
        let head = http(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        let lines = |s: String| s.lines().next().unwrap_or_default().to_owned();
        assert_eq!(
            lines(http(addr, "GET /x HTTP/1.1\r\n\r\n").await),
            "HTTP/1.1 404 Not Found"
        );
        assert_eq!(
            lines(http(addr, "DELETE /metrics HTTP/1.1\r\n\r\n").await),
            "HTTP/1.1 405 Method Not Allowed"
        );
        // A head that never ends: exactly what the server reads before giving up (1 KiB
        // reads), so it closes with nothing unread and the client sees the answer.
        let huge = "a".repeat(MAX_HEAD + 1024);
        assert_eq!(lines(http(addr, &huge).await), "HTTP/1.1 400 Bad Request");

        shutdown.cancel();
        server.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }
}
