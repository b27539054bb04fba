//! The gRPC adapter of tenant settings. Who may call each RPC (any role or a
//! platform service reads; `admin` updates) is enforced before the handler
//! by the auth layer (the proto's `authz` options).

use anumate_documents::Actor;
use anumate_proto::registry::v1 as pb;
use pb::tenant_settings_service_server::{TenantSettingsService, TenantSettingsServiceServer};
use tonic::{Request, Response, Status};

use crate::settings::TenantSettingsStore;

/// Largest accepted request: a settings message and a mask are tiny.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Tenant settings behind the generated `TenantSettingsService` trait.
#[derive(Clone)]
pub struct TenantSettingsGrpc {
    settings: TenantSettingsStore,
}

impl TenantSettingsGrpc {
    /// Wraps the settings store.
    pub fn new(settings: TenantSettingsStore) -> Self {
        TenantSettingsGrpc { settings }
    }

    /// The tonic server (requests above 64 KiB are refused from their length).
    pub fn into_server(self) -> TenantSettingsServiceServer<TenantSettingsGrpc> {
        TenantSettingsServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

/// The caller, as the auth layer verified it.
fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    let principal = anumate_auth::principal(req)?;
    Ok(Actor {
        tenant: principal.tenant_id,
        subject: principal.subject,
    })
}

#[tonic::async_trait]
impl TenantSettingsService for TenantSettingsGrpc {
    async fn get_tenant_settings(
        &self,
        req: Request<pb::GetTenantSettingsRequest>,
    ) -> Result<Response<pb::GetTenantSettingsResponse>, Status> {
        let actor = actor(&req)?;
        let settings = self.settings.get(&actor.tenant).await?;
        Ok(Response::new(pb::GetTenantSettingsResponse {
            settings: Some(settings),
        }))
    }

    async fn update_tenant_settings(
        &self,
        req: Request<pb::UpdateTenantSettingsRequest>,
    ) -> Result<Response<pb::UpdateTenantSettingsResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let settings = self
            .settings
            .update(&actor, r.settings.as_ref(), r.update_mask.as_ref(), &r.etag)
            .await?;
        Ok(Response::new(pb::UpdateTenantSettingsResponse {
            settings: Some(settings),
        }))
    }
}
