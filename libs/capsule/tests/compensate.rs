//! A step's `compensate`: the call that undoes it on cooperative cancel.

use anumate_capsule::{Limits, Rejection, parse};

fn capsule(steps: &str) -> String {
    format!(
        "apiVersion: anumate.dev/v1
kind: Capsule
metadata:
  name: t
spec:
  inputs:
    to: {{type: string, required: true}}
  tools: [payments.transfer, payments.reverse]
  steps:
{steps}"
    )
}

fn problems(source: &str) -> Vec<String> {
    match parse(source, &Limits::default()) {
        Ok(_) => Vec::new(),
        Err(Rejection::Invalid(v)) => v
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect(),
        Err(other) => panic!("{other:?}"),
    }
}

#[test]
fn a_compensation_may_read_its_own_steps_output() {
    let src = capsule(
        "    - id: transfer
      tool: payments.transfer
      with: {to: \"${{ inputs.to }}\"}
      compensate:
        tool: payments.reverse
        with: {transfer_id: \"${{ steps.transfer.output.transfer_id }}\", to: \"${{ inputs.to }}\"}
        timeout: 5s
",
    );
    let c = parse(&src, &Limits::default()).unwrap();
    let comp = c.spec.steps[0].compensate.as_ref().unwrap();
    assert_eq!(comp.tool, "payments.reverse");
    assert_eq!(
        comp.with["transfer_id"],
        "${{ steps.transfer.output.transfer_id }}"
    );
    assert_eq!(comp.timeout, Some(std::time::Duration::from_secs(5)));
    assert!(
        parse(
            &capsule("    - id: transfer\n      tool: payments.transfer\n"),
            &Limits::default()
        )
        .unwrap()
        .spec
        .steps[0]
            .compensate
            .is_none()
    );
}

#[test]
fn a_compensation_is_validated_like_a_step() {
    let got = problems(&capsule(
        "    - id: transfer
      tool: payments.transfer
      with: {to: \"${{ steps.transfer.output.x }}\"}
      compensate:
        tool: payments.refund
        with: {x: \"${{ inputs.nope }}\"}
        retry: {max_attempts: 2}
",
    ));
    let joined = got.join("\n");
    assert_eq!(got.len(), 4, "{joined}");
    // The step itself still may not read its own output.
    assert!(
        joined.contains("cannot reference its own output"),
        "{joined}"
    );
    assert!(
        joined.contains(
            "spec.steps[0].compensate.tool: tool \"payments.refund\" is not in spec.tools"
        ),
        "{joined}"
    );
    assert!(joined.contains("unknown input \"nope\""), "{joined}");
    assert!(joined.contains("spec.steps[0].compensate"), "{joined}");
    assert!(joined.contains("retry"), "{joined}");
}
