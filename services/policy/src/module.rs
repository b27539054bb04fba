//! The policy service as the binary composes it, and its in-process client.

use std::sync::Arc;

use anumate_proto::policy::v1 as pb;
use anumate_service::clients::{BoxFuture, Caller, PolicyClient, UpstreamResult};
use anumate_service::{BuildError, Context, Module, ServiceModule, no_keys};

use crate::{Actor, Policies, PolicyConfig, PolicyGrpc, VersionSelector};

/// The policy service module. It provides an in-process [`PolicyClient`].
pub fn module() -> Box<dyn ServiceModule> {
    Box::new(Module::<PolicyConfig> {
        name: pb::policy_service_server::SERVICE_NAME,
        section: "policy",
        about: "Policy: the policy DSL, versions, evaluation and redaction",
        migrations: crate::REPO_MIGRATIONS,
        missing_keys: no_keys,
        build,
    })
}

fn build(ctx: &mut Context, cfg: PolicyConfig) -> Result<(), BuildError> {
    let policies = Policies::new(ctx.store("policy")?, &cfg);
    let documents = policies.documents().clone();
    ctx.tasks
        .spawn("policy cache invalidation", |cancel| async move {
            Ok(documents.follow_changes(cancel).await?)
        });
    ctx.provide::<Arc<dyn PolicyClient>>(Arc::new(policies.clone()));
    ctx.routes
        .add_service(PolicyGrpc::new(policies).into_server());
    Ok(())
}

/// In this process: the domain call, no socket. The caller was authorized by
/// the service calling upstream (the compiler admits only roles that may read
/// policies).
impl PolicyClient for Policies {
    fn get_policy<'a>(
        &'a self,
        caller: &'a Caller,
        request: pb::GetPolicyRequest,
    ) -> BoxFuture<'a, UpstreamResult<pb::GetPolicyResponse>> {
        Box::pin(async move {
            let actor = Actor {
                tenant: caller.tenant().to_owned(),
                subject: caller.subject(),
            };
            let selector = VersionSelector::parse(&request.version)?;
            let (policy, version) = self.get(&actor, &request.name, selector).await?;
            Ok(pb::GetPolicyResponse {
                policy: Some(policy),
                version: Some(version),
            })
        })
    }
}
