//! CSI Identity service: plugin name and version, capabilities, and a `Probe` that reports
//! ready only when the role's dependencies answer.

use tonic::{Request, Response, Status};

use crate::health::Readiness;
use crate::proto::csi::{
    identity_server::Identity, plugin_capability, GetPluginCapabilitiesRequest,
    GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse, PluginCapability,
    ProbeRequest, ProbeResponse,
};

/// Which CSI services this process serves; decides the advertised plugin capabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Services {
    /// The Controller service is served.
    pub controller: bool,
    /// The Node service is served.
    pub node: bool,
}

/// The Identity service of one process.
#[derive(Debug)]
pub struct IdentityService {
    services: Services,
    readiness: Readiness,
}

impl IdentityService {
    /// Identity for a process serving `services`, ready when `readiness` passes.
    pub fn new(services: Services, readiness: Readiness) -> Self {
        IdentityService {
            services,
            readiness,
        }
    }

    /// The capabilities advertised for `services`.
    pub fn capabilities(services: Services) -> Vec<PluginCapability> {
        use plugin_capability::service::Type as S;
        use plugin_capability::volume_expansion::Type as E;
        let service = |t: S| PluginCapability {
            r#type: Some(plugin_capability::Type::Service(
                plugin_capability::Service { r#type: t as i32 },
            )),
        };
        let mut caps = Vec::new();
        if services.controller {
            caps.push(service(S::ControllerService));
            caps.push(PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(
                    plugin_capability::VolumeExpansion {
                        r#type: E::Online as i32,
                    },
                )),
            });
        }
        // Volumes and nodes both carry topology.cinderblock.dev/zone.
        caps.push(service(S::VolumeAccessibilityConstraints));
        caps
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: super::DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: Self::capabilities(self.services),
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        let ready = match self.readiness.check().await {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(reason = %e, "probe: not ready");
                false
            }
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plugin_capability::service::Type as S;

    fn service_types(caps: &[PluginCapability]) -> Vec<i32> {
        caps.iter()
            .filter_map(|c| match &c.r#type {
                Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn capabilities_follow_services() {
        let ctl = IdentityService::capabilities(Services {
            controller: true,
            node: false,
        });
        assert_eq!(
            service_types(&ctl),
            vec![
                S::ControllerService as i32,
                S::VolumeAccessibilityConstraints as i32
            ]
        );
        assert_eq!(ctl.len(), 3, "controller also advertises online expansion");
        let node = IdentityService::capabilities(Services {
            controller: false,
            node: true,
        });
        assert_eq!(
            service_types(&node),
            vec![S::VolumeAccessibilityConstraints as i32]
        );
    }
}
