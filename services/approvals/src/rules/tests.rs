use super::*;

const ARGS: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";
const HOUR: i64 = 3_600_000_000;

fn stage(approvers: &[&str], quorum: u32) -> Stage {
    Stage {
        name: "stage-1".into(),
        approvers: approvers.iter().map(|s| s.to_string()).collect(),
        quorum,
        approved_by: Vec::new(),
        approved: false,
        expire_at: None,
        escalated: false,
        delegates: Vec::new(),
        delegated_away: Vec::new(),
    }
}

fn approval(stages: Vec<Stage>) -> Approval {
    let mut a = Approval {
        id: "a1".into(),
        run_id: "run-1".into(),
        step_id: "refund".into(),
        plan_hash: ARGS.into(),
        args_sha256: ARGS.into(),
        tool: "payments.refund".into(),
        destructive: false,
        rule: RuleRef::default(),
        reason: String::new(),
        requester: "user:rita".into(),
        exclude: vec!["user:carl".into()],
        capsule: String::new(),
        capsule_version: 0,
        args_preview: None,
        risk_level: 0,
        risk_score: 0,
        stages,
        current: 0,
        status: Status::Pending,
        decisions: Vec::new(),
        escalate_to: Vec::new(),
        escalate_quorum: 1,
        expires_after: HOUR,
        remind_before: 0,
        timer_gen: 0,
        version: 1,
        created_at: 0,
        decided_at: None,
    };
    a.open(0);
    a
}

fn user(p: &str) -> Decider<'_> {
    Decider {
        principal: p,
        groups: &[],
    }
}

const APPROVE: Action<'static> = Action::Approve { args_sha256: ARGS };

fn vote(a: &mut Approval, d: Decider<'_>, action: &Action<'_>) -> Result<Applied> {
    decide(a, d, action, "", "", 10)
}

#[test]
fn two_of_three_then_a_late_third_vote_is_refused() {
    let mut a = approval(vec![stage(&["user:ann", "user:bob", "user:cy"], 2)]);
    assert_eq!(
        vote(&mut a, user("user:ann"), &APPROVE).unwrap(),
        Applied::Recorded(Effect::Voted)
    );
    assert_eq!(
        vote(&mut a, user("user:bob"), &APPROVE).unwrap(),
        Applied::Recorded(Effect::Granted)
    );
    assert_eq!(a.status, Status::Approved);
    let late = vote(&mut a, user("user:cy"), &APPROVE).unwrap_err();
    assert_eq!(late.reason, Reason::ApprovalAlreadyDecided);
}

#[test]
fn a_principal_counts_once_and_a_retry_is_not_a_second_vote() {
    let mut a = approval(vec![stage(&["user:ann", "group:ops"], 2)]);
    let groups = vec!["ops".to_string()];
    let ann = Decider {
        principal: "user:ann",
        groups: &groups,
    };
    vote(&mut a, ann, &APPROVE).unwrap();
    assert_eq!(vote(&mut a, ann, &APPROVE).unwrap(), Applied::Repeat);
    assert_eq!(a.stages[0].approved_by, vec!["user:ann".to_string()]);
    let other = vote(&mut a, ann, &Action::Reject).unwrap_err();
    assert_eq!(other.reason, Reason::ApprovalAlreadyDecided);
    assert_eq!(a.status, Status::Pending);
    // A second member of the group completes the quorum.
    let dan = Decider {
        principal: "user:dan",
        groups: &groups,
    };
    assert_eq!(
        vote(&mut a, dan, &APPROVE).unwrap(),
        Applied::Recorded(Effect::Granted)
    );
}

#[test]
fn group_membership_comes_from_the_callers_groups() {
    let mut a = approval(vec![stage(&["group:controllers"], 1)]);
    let err = vote(&mut a, user("user:eve"), &APPROVE).unwrap_err();
    assert_eq!(err.reason, Reason::NotAnApprover);
    let groups = vec!["group:controllers".to_string()];
    let eve = Decider {
        principal: "user:eve",
        groups: &groups,
    };
    assert_eq!(
        vote(&mut a, eve, &APPROVE).unwrap(),
        Applied::Recorded(Effect::Granted)
    );
}

#[test]
fn the_requester_and_excluded_principals_are_refused_even_through_a_group() {
    let mut a = approval(vec![stage(&["group:ops", "user:rita"], 1)]);
    let groups = vec!["ops".to_string()];
    for p in ["user:rita", "user:carl"] {
        let d = Decider {
            principal: p,
            groups: &groups,
        };
        let err = vote(&mut a, d, &APPROVE).unwrap_err();
        assert_eq!(err.reason, Reason::SelfApproval, "{p}");
    }
    assert!(a.decisions.is_empty());
}

#[test]
fn stages_are_decided_in_order() {
    let mut second = stage(&["user:fin"], 1);
    second.name = "finance".into();
    let mut a = approval(vec![stage(&["user:ann"], 1), second]);
    let early = vote(&mut a, user("user:fin"), &APPROVE).unwrap_err();
    assert_eq!(early.reason, Reason::NotAnApprover);
    assert_eq!(
        decide(&mut a, user("user:ann"), &APPROVE, "", "", HOUR / 2).unwrap(),
        Applied::Recorded(Effect::StageApproved)
    );
    assert_eq!(a.current, 1);
    // The second stage's expiry starts when it opens.
    assert_eq!(a.stages[1].expire_at, Some(HOUR / 2 + HOUR));
    assert_eq!(
        vote(&mut a, user("user:fin"), &APPROVE).unwrap(),
        Applied::Recorded(Effect::Granted)
    );
    assert_eq!(a.current, 2);
}

#[test]
fn one_rejection_rejects() {
    let mut a = approval(vec![stage(&["user:ann", "user:bob"], 2)]);
    vote(&mut a, user("user:ann"), &APPROVE).unwrap();
    assert_eq!(
        vote(&mut a, user("user:bob"), &Action::Reject).unwrap(),
        Applied::Recorded(Effect::Rejected)
    );
    assert_eq!(a.status, Status::Rejected);
    assert_eq!(
        vote(&mut a, user("user:bob"), &Action::Reject).unwrap(),
        Applied::Repeat
    );
}

#[test]
fn approve_names_the_arguments_it_saw() {
    let mut a = approval(vec![stage(&["user:ann"], 1)]);
    let other = "sha256:0000000000000000000000000000000000000000000000000000000000000002";
    let err = vote(
        &mut a,
        user("user:ann"),
        &Action::Approve { args_sha256: other },
    )
    .unwrap_err();
    assert_eq!(err.reason, Reason::ApprovalArgsMismatch);
    assert!(a.decisions.is_empty());
}

#[test]
fn a_stale_etag_is_refused_but_a_retry_is_answered() {
    let mut a = approval(vec![stage(&["user:ann", "user:bob"], 2)]);
    let etag = a.etag();
    decide(&mut a, user("user:ann"), &APPROVE, "", &etag, 1).unwrap();
    let err = decide(&mut a, user("user:bob"), &APPROVE, "", &etag, 2).unwrap_err();
    assert_eq!(err.reason, Reason::EtagMismatch);
    assert_eq!(
        decide(&mut a, user("user:ann"), &APPROVE, "", &etag, 3).unwrap(),
        Applied::Repeat
    );
}

#[test]
fn delegation_moves_the_place_and_refuses_cycles() {
    let mut a = approval(vec![stage(&["user:ann", "user:bob"], 2)]);
    let to_dan = Action::Delegate { to: "user:dan" };
    assert_eq!(
        vote(&mut a, user("user:ann"), &to_dan).unwrap(),
        Applied::Recorded(Effect::Delegated)
    );
    assert_eq!(
        vote(&mut a, user("user:ann"), &to_dan).unwrap(),
        Applied::Repeat
    );
    // Ann gave her place away.
    let err = vote(&mut a, user("user:ann"), &APPROVE).unwrap_err();
    assert_eq!(err.reason, Reason::NotAnApprover);
    // Dan cannot hand it back to Ann (a cycle), nor to Bob (already eligible),
    // nor to the requester.
    for to in ["user:ann", "user:bob", "user:rita", "user:carl"] {
        let err = vote(&mut a, user("user:dan"), &Action::Delegate { to }).unwrap_err();
        assert_eq!(err.code, anumate_errors::ErrorCode::InvalidArgument, "{to}");
    }
    // A chain is fine: Dan to Eve; then Eve and Bob make the quorum.
    vote(
        &mut a,
        user("user:dan"),
        &Action::Delegate { to: "user:eve" },
    )
    .unwrap();
    vote(&mut a, user("user:eve"), &APPROVE).unwrap();
    assert_eq!(
        vote(&mut a, user("user:bob"), &APPROVE).unwrap(),
        Applied::Recorded(Effect::Granted)
    );
}

#[test]
fn expiry_escalates_once_then_expires_and_never_approves() {
    let mut a = approval(vec![stage(&["user:ann", "user:bob"], 2)]);
    a.destructive = true;
    a.escalate_to = vec!["user:boss".into()];
    a.escalate_quorum = 1;
    vote(&mut a, user("user:ann"), &APPROVE).unwrap();
    let generation = a.timer_gen;
    assert_eq!(due_expiry(&a, generation, HOUR - 1), None, "not due yet");
    assert_eq!(due_expiry(&a, generation, HOUR), Some(Expiry::Escalate));
    assert_eq!(
        expire(&mut a, Expiry::Escalate, HOUR).unwrap(),
        Effect::Escalated
    );
    assert_eq!(a.status, Status::Pending);
    assert_eq!(a.stages[0].approvers, vec!["user:boss".to_string()]);
    assert!(a.stages[0].approved_by.is_empty(), "a fresh round");
    assert_eq!(a.stages[0].expire_at, Some(2 * HOUR));
    // The old timer generation is stale now.
    assert_eq!(due_expiry(&a, generation, 3 * HOUR), None);
    let generation = a.timer_gen;
    assert_eq!(due_expiry(&a, generation, 2 * HOUR), Some(Expiry::Expire));
    assert_eq!(
        expire(&mut a, Expiry::Expire, 2 * HOUR).unwrap(),
        Effect::Expired
    );
    assert_eq!(a.status, Status::Expired);
    assert_eq!(due_expiry(&a, generation, 3 * HOUR), None, "fires once");
    let kinds: Vec<Kind> = a.decisions.iter().map(|d| d.kind).collect();
    assert_eq!(kinds, vec![Kind::Approve, Kind::Escalate, Kind::Expire]);
}

#[test]
fn quorum_validation_counts_users_once_and_groups_as_many() {
    let users = vec!["user:ann".to_string(), "user:bob".to_string()];
    let barred = vec!["user:bob".to_string()];
    assert_eq!(check_quorum("q", &users, 2, &[]).unwrap(), 2);
    assert!(check_quorum("q", &users, 3, &[]).is_err());
    assert!(
        check_quorum("q", &users, 2, &barred).is_err(),
        "the requester is no seat"
    );
    assert!(check_quorum("q", &users, 0, &[]).is_err());
    let with_group = vec!["user:ann".to_string(), "group:ops".to_string()];
    assert_eq!(check_quorum("q", &with_group, 5, &[]).unwrap(), 5);
    assert!(check_quorum("q", &with_group, 101, &[]).is_err());
}

#[test]
fn entries_are_users_or_groups() {
    assert!(parse_entry("f", "user:ann").is_ok());
    assert!(parse_entry("f", "group:ops").is_ok());
    for bad in ["ann", "role:admin", "user:", "user:a,b", "group:a b"] {
        assert!(parse_entry("f", bad).is_err(), "{bad}");
    }
    let list = vec!["user:ann".to_string(), "user:ann".to_string()];
    assert_eq!(parse_entries("f", &list, false).unwrap().len(), 1);
    assert!(parse_entries("f", &[], false).is_err());
}

#[test]
fn cancel_withdraws_once() {
    let mut a = approval(vec![stage(&["user:ann"], 1)]);
    assert!(cancel(&mut a, "svc:orchestrator", "run cancelled", 5).unwrap());
    assert!(!cancel(&mut a, "svc:orchestrator", "run cancelled", 6).unwrap());
    let mut b = approval(vec![stage(&["user:ann"], 1)]);
    vote(&mut b, user("user:ann"), &APPROVE).unwrap();
    assert_eq!(
        cancel(&mut b, "svc:orchestrator", "", 7)
            .unwrap_err()
            .reason,
        Reason::ApprovalAlreadyDecided
    );
}
