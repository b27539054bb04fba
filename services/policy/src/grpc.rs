//! The gRPC adapter: decode, call [`Policies`], encode. Who may call each RPC
//! is enforced before the handler by the auth layer (the proto's `authz` options).

use anumate_documents::Transition;
use anumate_errors::Error;
use anumate_proto::policy::v1 as pb;
use pb::policy_service_server::{PolicyService, PolicyServiceServer};
use tonic::{Request, Response, Status};

use crate::{Actor, EvalInput, EvalTarget, Policies, RedactValue, VersionSelector};

/// The policy service behind the generated `PolicyService` trait.
#[derive(Clone)]
pub struct PolicyGrpc {
    policies: Policies,
}

impl PolicyGrpc {
    /// Wraps a policy service.
    pub fn new(policies: Policies) -> Self {
        PolicyGrpc { policies }
    }

    /// The tonic server, with a request size limit matching the source and
    /// input limits (larger messages get PAYLOAD_TOO_LARGE from tonic, smaller
    /// oversize sources from the service itself).
    pub fn into_server(self) -> PolicyServiceServer<PolicyGrpc> {
        let cfg = self.policies.config();
        let limit = cfg
            .max_source_bytes
            .saturating_mul(2)
            .saturating_add(cfg.max_input_bytes)
            .saturating_add(64 * 1024);
        PolicyServiceServer::new(self).max_decoding_message_size(limit)
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

fn struct_json<T: serde::Serialize>(field: &str, v: &T) -> Result<serde_json::Value, Status> {
    serde_json::to_value(v).map_err(|e| Error::invalid_argument(field, e.to_string()).into())
}

#[tonic::async_trait]
impl PolicyService for PolicyGrpc {
    async fn push_policy(
        &self,
        req: Request<pb::PushPolicyRequest>,
    ) -> Result<Response<pb::PushPolicyResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let pushed = self
            .policies
            .push(&actor, &r.source, &r.source_name, &r.etag, r.publish)
            .await?;
        Ok(Response::new(pb::PushPolicyResponse {
            version: Some(pushed.version),
            created: pushed.created,
            policy: Some(pushed.document),
        }))
    }

    async fn push_policies(
        &self,
        req: Request<pb::PushPoliciesRequest>,
    ) -> Result<Response<pb::PushPoliciesResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let pushed = self
            .policies
            .push_all(&actor, &r.source, &r.source_name, r.publish)
            .await?;
        Ok(Response::new(pb::PushPoliciesResponse {
            policies: pushed
                .into_iter()
                .map(|p| pb::PushedPolicy {
                    version: Some(p.version),
                    created: p.created,
                    policy: Some(p.document),
                })
                .collect(),
        }))
    }

    async fn validate_policy(
        &self,
        req: Request<pb::ValidatePolicyRequest>,
    ) -> Result<Response<pb::ValidatePolicyResponse>, Status> {
        let r = req.into_inner();
        let compiled = self.policies.validate(&r.source, &r.source_name).await?;
        let p = compiled
            .policies
            .into_iter()
            .next()
            .ok_or_else(|| Error::internal("validated source without a policy"))?;
        Ok(Response::new(pb::ValidatePolicyResponse {
            name: p.name,
            canonical_json: p.canonical_json,
            content_hash: p.content_hash,
            rules: p.rules.into_iter().map(|r| r.summary).collect(),
            test_count: p.test_count,
        }))
    }

    async fn get_policy(
        &self,
        req: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::GetPolicyResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let selector = VersionSelector::parse(&r.version)?;
        let (policy, version) = self.policies.get(&actor, &r.name, selector).await?;
        Ok(Response::new(pb::GetPolicyResponse {
            policy: Some(policy),
            version: Some(version),
        }))
    }

    async fn list_policies(
        &self,
        req: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let status = pb::PolicyVersionStatus::try_from(r.status).map_err(|_| {
            Error::invalid_argument(
                "status",
                format!("unknown PolicyVersionStatus value {}", r.status),
            )
        })?;
        let (policies, next_page_token) = self
            .policies
            .list(&actor, status, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListPoliciesResponse {
            policies,
            next_page_token,
        }))
    }

    async fn list_policy_versions(
        &self,
        req: Request<pb::ListPolicyVersionsRequest>,
    ) -> Result<Response<pb::ListPolicyVersionsResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let (versions, next_page_token) = self
            .policies
            .documents()
            .list_versions(&actor, &r.name, r.page_size, &r.page_token)
            .await?;
        Ok(Response::new(pb::ListPolicyVersionsResponse {
            versions,
            next_page_token,
        }))
    }

    async fn publish_policy_version(
        &self,
        req: Request<pb::PublishPolicyVersionRequest>,
    ) -> Result<Response<pb::PublishPolicyVersionResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let (policy, version) = self
            .policies
            .documents()
            .transition(&actor, &r.name, r.version, &r.etag, Transition::Publish)
            .await?;
        Ok(Response::new(pb::PublishPolicyVersionResponse {
            version: Some(version),
            policy: Some(policy),
        }))
    }

    async fn deprecate_policy_version(
        &self,
        req: Request<pb::DeprecatePolicyVersionRequest>,
    ) -> Result<Response<pb::DeprecatePolicyVersionResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let (policy, version) = self
            .policies
            .documents()
            .transition(&actor, &r.name, r.version, &r.etag, Transition::Deprecate)
            .await?;
        Ok(Response::new(pb::DeprecatePolicyVersionResponse {
            version: Some(version),
            policy: Some(policy),
        }))
    }

    async fn delete_policy(
        &self,
        req: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let actor = actor(&req)?;
        let r = req.into_inner();
        let policy = self
            .policies
            .documents()
            .delete(&actor, &r.name, &r.etag)
            .await?;
        Ok(Response::new(pb::DeletePolicyResponse {
            policy: Some(policy),
        }))
    }

    async fn evaluate_policy(
        &self,
        req: Request<pb::EvaluatePolicyRequest>,
    ) -> Result<Response<pb::EvaluatePolicyResponse>, Status> {
        use pb::evaluate_policy_request::{Input, Policies as P};
        let actor = actor(&req)?;
        let r = req.into_inner();
        let target = match r.policies {
            Some(P::PolicySet(set)) => EvalTarget::Refs(set.policies),
            Some(P::Source(src)) => EvalTarget::Source(src, r.source_name),
            None => {
                return Err(
                    Error::invalid_argument("policies", "set `policy_set` or `source`").into(),
                );
            }
        };
        let input = match r.input {
            Some(Input::InputJson(text)) => EvalInput::Json(text),
            Some(Input::InputStruct(s)) => EvalInput::Value(struct_json("input_struct", &s)?),
            None => {
                return Err(
                    Error::invalid_argument("input", "set `input_json` or `input_struct`").into(),
                );
            }
        };
        let resp = self
            .policies
            .evaluate(&actor, target, input, &r.allowed_tools)
            .await?;
        Ok(Response::new(resp))
    }

    async fn test_policy(
        &self,
        req: Request<pb::TestPolicyRequest>,
    ) -> Result<Response<pb::TestPolicyResponse>, Status> {
        use pb::test_policy_request::Target;
        let actor = actor(&req)?;
        let r = req.into_inner();
        let target = match r.target {
            Some(Target::Policy(p)) => EvalTarget::Refs(vec![p]),
            Some(Target::Source(src)) => EvalTarget::Source(src, r.source_name),
            None => {
                return Err(Error::invalid_argument("target", "set `policy` or `source`").into());
            }
        };
        Ok(Response::new(
            self.policies.test(&actor, target, &r.name_filter).await?,
        ))
    }

    async fn redact(
        &self,
        req: Request<pb::RedactRequest>,
    ) -> Result<Response<pb::RedactResponse>, Status> {
        use pb::redact_request::Value as V;
        let r = req.into_inner();
        let value = match r.value {
            Some(V::ValueStruct(v)) => RedactValue::Struct(struct_json("value_struct", &v)?),
            Some(V::ValueJson(text)) => RedactValue::Json(text),
            Some(V::Text(text)) => RedactValue::Text(text),
            None => {
                return Err(Error::invalid_argument(
                    "value",
                    "set `value_struct`, `value_json` or `text`",
                )
                .into());
            }
        };
        Ok(Response::new(self.policies.redact(value, &r.redactions)?))
    }
}
