//! Only the leader changes anything: on a follower replica, the CSI Controller RPCs that
//! mutate storage are answered `UNAVAILABLE` (which every kubernetes-csi sidecar retries with
//! backoff) before they reach the handlers; reads (GetCapacity, ListVolumes, Validate,
//! capabilities) are served by every replica. ADR 0006 says why.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::server::NamedService;

use crate::k8s::leader::Leadership;

/// The CSI Controller methods that change storage.
pub const MUTATING: &[&str] = &[
    "CreateVolume",
    "DeleteVolume",
    "ControllerPublishVolume",
    "ControllerUnpublishVolume",
    "CreateSnapshot",
    "DeleteSnapshot",
    "ControllerExpandVolume",
    "ControllerModifyVolume",
];

/// Whether a gRPC path (`/csi.v1.Controller/CreateVolume`) is a mutating method.
pub fn is_mutating(path: &str) -> bool {
    MUTATING.contains(&path.rsplit('/').next().unwrap_or_default())
}

/// A gRPC service whose mutating calls are refused unless this replica leads.
#[derive(Clone, Debug)]
pub struct LeaderGate<S> {
    inner: S,
    leadership: Leadership,
}

impl<S> LeaderGate<S> {
    /// Gates `inner` on `leadership`.
    pub fn new(inner: S, leadership: Leadership) -> Self {
        LeaderGate { inner, leadership }
    }
}

impl<S: NamedService> NamedService for LeaderGate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<http::Request<B>> for LeaderGate<S>
where
    S: tower::Service<
        http::Request<B>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if is_mutating(req.uri().path()) && !self.leadership.is_leader() {
            let holder = self.leadership.holder().map_or_else(
                || "none elected yet".to_owned(),
                |h| format!("the leader is {h}"),
            );
            let status = tonic::Status::unavailable(format!(
                "this controller replica is not the leader ({holder}); retry"
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutating_table() {
        let cases = [
            ("/csi.v1.Controller/CreateVolume", true),
            ("/csi.v1.Controller/DeleteSnapshot", true),
            ("/csi.v1.Controller/ControllerPublishVolume", true),
            ("/csi.v1.Controller/GetCapacity", false),
            ("/csi.v1.Controller/ListVolumes", false),
            ("/csi.v1.Controller/ValidateVolumeCapabilities", false),
            ("/csi.v1.Controller/ControllerGetCapabilities", false),
            ("/csi.v1.Controller/ControllerGetVolume", false),
            ("", false),
        ];
        for (path, want) in cases {
            assert_eq!(is_mutating(path), want, "{path}");
        }
    }
}
