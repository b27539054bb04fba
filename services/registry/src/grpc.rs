//! The gRPC adapter: decode, call [`Registry`], encode. Who may call each RPC
//! is enforced before the handler by the auth layer (the proto's `authz` options).

use anumate_documents::Transition;
use anumate_errors::Error;
use anumate_proto::google::api::HttpBody;
use anumate_proto::registry::v1 as pb;
use pb::registry_service_server::{RegistryService, RegistryServiceServer};
use tonic::{Request, Response, Status};

use crate::{Actor, Registry, VersionSelector};

/// The registry behind the generated `RegistryService` trait.
#[derive(Clone)]
pub struct RegistryGrpc {
    registry: Registry,
}

impl RegistryGrpc {
    /// Wraps a registry.
    pub fn new(registry: Registry) -> Self {
        RegistryGrpc { registry }
    }

    /// The tonic server, with request size limits matching the document limit.
    pub fn into_server(self) -> RegistryServiceServer<RegistryGrpc> {
        // Room for the document plus the other request fields; larger messages are
        // refused by tonic from their length prefix, before anything is buffered
        // (`anumate_errors::layer` gives that PAYLOAD_TOO_LARGE), smaller oversize
        // documents get PAYLOAD_TOO_LARGE from the registry itself.
        let limit = self
            .registry
            .limits()
            .max_document_bytes
            .saturating_mul(2)
            .saturating_add(64 * 1024);
        RegistryServiceServer::new(self).max_decoding_message_size(limit)
    }
}

/// The caller, as the auth layer verified it and admitted it by the RPC's
/// `(anumate.common.v1.authz)` rule.
fn actor<T>(req: &Request<T>) -> Result<Actor, Status> {
    let principal = anumate_auth::principal(req)?;
    Ok(Actor {
        tenant: principal.tenant_id,
        subject: principal.subject,
    })
}

fn status_filter(value: i32) -> Result<pb::VersionStatus, Status> {
    pb::VersionStatus::try_from(value).map_err(|_| {
        Error::invalid_argument("status", format!("unknown VersionStatus value {value}")).into()
    })
}

#[tonic::async_trait]
impl RegistryService for RegistryGrpc {
    async fn push_capsule(
        &self,
        req: Request<pb::PushCapsuleRequest>,
    ) -> Result<Response<pb::PushCapsuleResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let (pushed, warnings) = self
            .registry
            .push(&actor, &r.source_yaml, &r.source_name, &r.etag, r.publish)
            .await?;
        Ok(Response::new(pb::PushCapsuleResponse {
            version: Some(pushed.version),
            created: pushed.created,
            capsule: Some(pushed.document),
            warnings,
        }))
    }

    async fn validate_capsule(
        &self,
        req: Request<pb::ValidateCapsuleRequest>,
    ) -> Result<Response<pb::ValidateCapsuleResponse>, Status> {
        let r = req.into_inner();
        let (capsule, canonical_json, content_hash) = self
            .registry
            .validate(&r.source_yaml, &r.source_name)
            .await?;
        Ok(Response::new(pb::ValidateCapsuleResponse {
            name: capsule.name,
            canonical_json,
            content_hash,
        }))
    }

    async fn get_capsule(
        &self,
        req: Request<pb::GetCapsuleRequest>,
    ) -> Result<Response<pb::GetCapsuleResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let selector = VersionSelector::parse(&r.version)?;
        let (capsule, version) = self.registry.get(&actor, &r.name, selector).await?;
        Ok(Response::new(pb::GetCapsuleResponse {
            capsule: Some(capsule),
            version: Some(version),
        }))
    }

    async fn list_capsules(
        &self,
        req: Request<pb::ListCapsulesRequest>,
    ) -> Result<Response<pb::ListCapsulesResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let status = status_filter(r.status)?;
        let (capsules, next_page_token) = self
            .registry
            .list(
                &actor,
                &r.label_selector,
                status,
                r.page_size,
                &r.page_token,
            )
            .await?;
        Ok(Response::new(pb::ListCapsulesResponse {
            capsules,
            next_page_token,
        }))
    }

    async fn list_capsule_versions(
        &self,
        req: Request<pb::ListCapsuleVersionsRequest>,
    ) -> Result<Response<pb::ListCapsuleVersionsResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let (versions, next_page_token) = self
            .registry
            .documents()
            .list_versions(&actor, &r.name, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListCapsuleVersionsResponse {
            versions,
            next_page_token,
        }))
    }

    async fn diff_capsule_versions(
        &self,
        req: Request<pb::DiffCapsuleVersionsRequest>,
    ) -> Result<Response<pb::DiffCapsuleVersionsResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        Ok(Response::new(
            self.registry
                .diff(&actor, &r.name, r.from_version, r.to_version)
                .await?,
        ))
    }

    async fn publish_capsule_version(
        &self,
        req: Request<pb::PublishCapsuleVersionRequest>,
    ) -> Result<Response<pb::PublishCapsuleVersionResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let (capsule, version) = self
            .registry
            .documents()
            .transition(&actor, &r.name, r.version, &r.etag, Transition::Publish)
            .await?;
        Ok(Response::new(pb::PublishCapsuleVersionResponse {
            version: Some(version),
            capsule: Some(capsule),
        }))
    }

    async fn deprecate_capsule_version(
        &self,
        req: Request<pb::DeprecateCapsuleVersionRequest>,
    ) -> Result<Response<pb::DeprecateCapsuleVersionResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let (capsule, version) = self
            .registry
            .documents()
            .transition(&actor, &r.name, r.version, &r.etag, Transition::Deprecate)
            .await?;
        Ok(Response::new(pb::DeprecateCapsuleVersionResponse {
            version: Some(version),
            capsule: Some(capsule),
        }))
    }

    async fn delete_capsule(
        &self,
        req: Request<pb::DeleteCapsuleRequest>,
    ) -> Result<Response<pb::DeleteCapsuleResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let capsule = self
            .registry
            .documents()
            .delete(&actor, &r.name, &r.etag)
            .await?;
        Ok(Response::new(pb::DeleteCapsuleResponse {
            capsule: Some(capsule),
        }))
    }

    /// The JWKS as a JSON document, so its HTTP route serves plain JWKS.
    async fn get_capsule_signing_keys(
        &self,
        _req: Request<pb::GetCapsuleSigningKeysRequest>,
    ) -> Result<Response<HttpBody>, Status> {
        let data = serde_json::to_vec(&self.registry.jwks()).map_err(Error::internal)?;
        Ok(Response::new(HttpBody {
            content_type: "application/json".into(),
            data,
            extensions: Vec::new(),
        }))
    }
}
