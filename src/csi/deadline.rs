//! The deadline of the CSI call being served, handed on to the agent calls it makes.
//!
//! A CSI caller sends its deadline in gRPC's `grpc-timeout` header (the external-provisioner's
//! `--timeout`). While the controller serves that call, its calls to agents end by the same
//! deadline instead of a fixed one: a create queued behind a burst on its agent waits as long
//! as its caller does, and no longer. Calls that came without a deadline leave the agent
//! client's default in force.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::codegen::http;
use tonic::server::NamedService;

tokio::task_local! {
    /// When the CSI call being served must be answered by.
    static DEADLINE: Instant;
}

/// The deadline of the CSI call this task serves, when its caller sent one.
pub fn caller_deadline() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// Runs `f` as serving a call due by `deadline`.
pub async fn within<F: Future>(deadline: Instant, f: F) -> F::Output {
    DEADLINE.scope(deadline, f).await
}

/// gRPC's `grpc-timeout` value: at most 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A gRPC service whose calls run with their caller's deadline (see the module).
#[derive(Clone, Debug)]
pub struct CallerDeadline<S> {
    inner: S,
}

impl<S> CallerDeadline<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        CallerDeadline { inner }
    }
}

impl<S: NamedService> NamedService for CallerDeadline<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, R> tower::Service<http::Request<B>> for CallerDeadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|t| Instant::now() + t);
        let fut = self.inner.call(req);
        match deadline {
            Some(d) => Box::pin(within(d, fut)),
            None => Box::pin(fut),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_values() {
        let cases = [
            ("10S", Some(Duration::from_secs(10))),
            ("2H", Some(Duration::from_secs(7200))),
            ("3M", Some(Duration::from_secs(180))),
            ("250m", Some(Duration::from_millis(250))),
            ("99999999u", Some(Duration::from_micros(99_999_999))),
            ("7n", Some(Duration::from_nanos(7))),
            ("123456789S", None),
            ("S", None),
            ("", None),
            ("10s", None),
            ("-1S", None),
            ("1.5S", None),
        ];
        for (v, want) in cases {
            assert_eq!(parse_grpc_timeout(v), want, "{v:?}");
        }
    }

    #[tokio::test]
    async fn the_deadline_is_seen_inside_the_call_only() {
        assert_eq!(caller_deadline(), None);
        let d = Instant::now() + Duration::from_secs(5);
        assert_eq!(within(d, async { caller_deadline() }).await, Some(d));
        assert_eq!(caller_deadline(), None);
    }
}
