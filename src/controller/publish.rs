//! ControllerPublishVolume / ControllerUnpublishVolume: Cinder's initialize_connection and
//! terminate_connection, through the agent's ExportVolume / UnexportVolume.

use super::guard::{volume_key, Operation};
use super::{
    access_is_multi_node, meta, Capability, Controller, ControllerError, NodeId, PublishInfo,
};
use crate::agent::VolumeId;

impl Controller {
    /// Exports a volume to the node's initiator. Publishing again to the same node returns the
    /// same answer; a single-node volume already published elsewhere is FAILED_PRECONDITION.
    pub async fn publish_volume(
        &self,
        raw_id: &str,
        raw_node: &str,
        cap: &Capability,
    ) -> Result<PublishInfo, ControllerError> {
        let not_found = || ControllerError::VolumeNotFound(raw_id.to_owned());
        let id = VolumeId::parse(raw_id).map_err(|_| not_found())?;
        let node = NodeId::parse(raw_node)
            .ok_or_else(|| ControllerError::NodeNotFound(raw_node.into()))?;
        let _guard = self.guards.try_lock(volume_key(&id), Operation::Publish)?;
        let entry = self.lookup_volume(&id).await?.ok_or_else(not_found)?;
        let vtype = self.stored_type(&entry.info.volume_type);
        cap.check(&vtype)
            .map_err(ControllerError::UnsupportedCapability)?;
        let fresh = self.observe_volume(&entry).await?.ok_or_else(not_found)?;
        let iqn = node.iqn.as_str();
        let already_here = fresh.info.exported_to.iter().any(|i| i == iqn);
        if !already_here {
            let stored_multi = fresh
                .info
                .metadata
                .get(meta::ACCESS)
                .is_none_or(|a| access_is_multi_node(a));
            if let Some(other) = super::published_nodes(&fresh.info).into_iter().next() {
                if !cap.mode.is_multi_node() || !stored_multi {
                    return Err(ControllerError::PublishedElsewhere { id, other });
                }
            }
        }
        let agent = self.agent(&fresh.agent)?.clone();
        // Record the node first, so published_node_ids survive a restart of the controller.
        let key = format!("{}{iqn}", meta::NODE_PREFIX);
        if fresh.info.metadata.get(&key) != Some(&node.host) {
            let mut metadata = fresh.info.metadata.clone();
            metadata.insert(key, node.host.clone());
            agent
                .update_volume(&id, "", Some(metadata))
                .await
                .map_err(ControllerError::agent(&fresh.agent, "UpdateVolume"))?;
        }
        let export = agent
            .export_volume(&id, &node.iqn, &node.host)
            .await
            .map_err(ControllerError::agent(&fresh.agent, "ExportVolume"))?;
        self.observe_volume(&fresh).await?;
        tracing::info!(volume = %id, node = %node, target = %export.target_iqn, "published");
        Ok(PublishInfo {
            portals: export.portals,
            target_iqn: export.target_iqn,
            lun: export.lun,
            chap_user: export.chap_username,
        })
    }

    /// Removes the node's initiator from the export (`raw_node` empty: every node). A volume
    /// or node that does not exist is already unpublished.
    pub async fn unpublish_volume(
        &self,
        raw_id: &str,
        raw_node: &str,
    ) -> Result<(), ControllerError> {
        let Ok(id) = VolumeId::parse(raw_id) else {
            return Ok(());
        };
        let node = if raw_node.is_empty() {
            None
        } else {
            match NodeId::parse(raw_node) {
                Some(n) => Some(n),
                None => return Ok(()), // no such node, so not published there
            }
        };
        let _guard = self
            .guards
            .try_lock(volume_key(&id), Operation::Unpublish)?;
        let Some(entry) = self.lookup_volume(&id).await? else {
            return Ok(());
        };
        let agent = self.agent(&entry.agent)?.clone();
        match agent
            .unexport_volume(&id, node.as_ref().map(|n| &n.iqn))
            .await
        {
            Ok(()) => {}
            Err(e) if e.kind == crate::agent_rpc::client::AgentErrorKind::NotFound => {
                self.state().volumes.remove(&id);
                return Ok(());
            }
            Err(e) => return Err(ControllerError::agent(&entry.agent, "UnexportVolume")(e)),
        }
        let Some(fresh) = self.observe_volume(&entry).await? else {
            return Ok(());
        };
        // Forget the node records of initiators no longer exported to.
        let mut metadata = fresh.info.metadata.clone();
        metadata.retain(|k, _| match k.strip_prefix(meta::NODE_PREFIX) {
            Some(iqn) => fresh.info.exported_to.iter().any(|i| i == iqn),
            None => true,
        });
        if metadata != fresh.info.metadata {
            let info = agent
                .update_volume(&id, "", Some(metadata))
                .await
                .map_err(ControllerError::agent(&entry.agent, "UpdateVolume"))?;
            self.remember_volume(&entry.agent, info);
        }
        tracing::info!(volume = %id, node = raw_node, "unpublished");
        Ok(())
    }
}
