//! Compiling sources into what evaluation needs: the compiled set plus, per
//! policy, its canonical form, content hash and rule metadata.

use std::collections::HashMap;

use anumate_errors::{Error, ErrorCode, Result, Violation};
use anumate_policy::ast::{ActionKind, ExprKind, Policy, PolicyFile};
use anumate_policy::{CompiledSet, Span, line_col};
use anumate_proto::policy::v1 as pb;
use serde_json::{Value, json};

/// One rule's metadata.
#[derive(Debug, Clone)]
pub struct RuleInfo {
    /// The summary sent in `PolicyVersion.rules`.
    pub summary: pb::RuleSummary,
    /// The rule's `reason:` texts joined with `; `.
    pub reason: String,
}

/// One policy of a compiled source.
#[derive(Debug, Clone)]
pub struct PolicyInfo {
    /// Policy name.
    pub name: String,
    /// `description:`.
    pub description: String,
    /// RFC 8785 canonical JSON of the parsed policy.
    pub canonical_json: String,
    /// `sha256:` + hex SHA-256 of `canonical_json`.
    pub content_hash: String,
    /// Version number; 0 for ad-hoc source.
    pub version: i32,
    /// Rules in source order.
    pub rules: Vec<RuleInfo>,
    rule_index: HashMap<String, usize>,
    /// Number of `test` blocks.
    pub test_count: i32,
}

impl PolicyInfo {
    /// A rule by id.
    pub fn rule(&self, id: &str) -> Option<&RuleInfo> {
        self.rule_index.get(id).and_then(|&i| self.rules.get(i))
    }
}

/// A compiled source: the evaluation form and the per-policy metadata.
#[derive(Debug)]
pub struct Compiled {
    /// The name spans carry (`name@version`, or the ad-hoc source's name).
    pub source_name: String,
    /// The evaluation form.
    pub set: CompiledSet,
    /// The policies in source order.
    pub policies: Vec<PolicyInfo>,
}

impl Compiled {
    /// A policy by name.
    pub fn policy(&self, name: &str) -> Option<&PolicyInfo> {
        self.policies.iter().find(|p| p.name == name)
    }
}

/// A proto span for a byte range of `src`.
pub fn span(source_name: &str, src: &str, s: Span) -> pb::SourceSpan {
    let a = line_col(src, s.start);
    let b = line_col(src, s.end);
    let int = |v: u32| i32::try_from(v).unwrap_or(i32::MAX);
    pb::SourceSpan {
        source_name: source_name.to_string(),
        start_line: int(a.line),
        start_column: int(a.col),
        end_line: int(b.line),
        end_column: int(b.col),
        start_offset: i32::try_from(s.start).unwrap_or(i32::MAX),
        end_offset: i32::try_from(s.end).unwrap_or(i32::MAX),
    }
}

/// The canonical JSON value of one policy: names, rules (with `when` and each
/// action pretty-printed) and tests (with `given` pretty-printed). Comments,
/// whitespace and positions are not part of it.
pub fn canonical_value(p: &Policy) -> Value {
    json!({
        "name": p.name,
        "description": p.description,
        "rules": p.rules.iter().map(|r| json!({
            "id": r.id,
            "priority": r.priority,
            "enabled": r.enabled,
            "when": r.when.to_string(),
            "then": r.actions.iter().map(ToString::to_string).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "tests": p.tests.iter().map(|t| json!({
            "name": t.name,
            "given": t.given.to_string(),
            "expect": t.expect.as_str(),
        })).collect::<Vec<_>>(),
    })
}

fn effect(e: anumate_policy::Effect) -> pb::Effect {
    match e {
        anumate_policy::Effect::Allow => pb::Effect::Allow,
        anumate_policy::Effect::RequireApproval => pb::Effect::RequireApproval,
        anumate_policy::Effect::Deny => pb::Effect::Deny,
    }
}

/// The proto effect of a DSL effect.
pub fn pb_effect(e: anumate_policy::Effect) -> i32 {
    effect(e) as i32
}

fn info(source_name: &str, src: &str, p: &Policy, version: i32) -> PolicyInfo {
    let (canonical_json, content_hash) = anumate_crypto::content_hash(&canonical_value(p));
    let mut rules = Vec::new();
    let mut rule_index = HashMap::new();
    for r in &p.rules {
        let mut strongest = anumate_policy::Effect::Allow;
        let mut reasons = Vec::new();
        for a in &r.actions {
            match a.kind {
                ActionKind::Deny => strongest = strongest.max(anumate_policy::Effect::Deny),
                ActionKind::RequireApproval => {
                    strongest = strongest.max(anumate_policy::Effect::RequireApproval);
                }
                _ => {}
            }
            for arg in &a.args {
                if let (true, ExprKind::Str(s)) = (arg.name == "reason", &arg.value.kind) {
                    reasons.push(s.clone());
                }
            }
        }
        rule_index.insert(r.id.clone(), rules.len());
        rules.push(RuleInfo {
            summary: pb::RuleSummary {
                name: r.id.clone(),
                priority: i32::try_from(r.priority).unwrap_or(0),
                enabled: r.enabled,
                effect: effect(strongest) as i32,
                span: Some(span(source_name, src, r.span)),
            },
            reason: reasons.join("; "),
        });
    }
    PolicyInfo {
        name: p.name.clone(),
        description: p.description.clone().unwrap_or_default(),
        canonical_json,
        content_hash,
        version,
        rules,
        rule_index,
        test_count: i32::try_from(p.tests.len()).unwrap_or(i32::MAX),
    }
}

/// Parses and compiles `src`. With `single`, the source must hold exactly one
/// `policy` block (what a push stores).
pub fn compile(
    source_name: &str,
    src: &str,
    version: i32,
    fuel: u64,
    single: bool,
) -> Result<Compiled> {
    let ast: PolicyFile = anumate_policy::parse(source_name, src).map_err(Error::from)?;
    let set = anumate_policy::compile_file(source_name, src, &ast).map_err(Error::from)?;
    if single && ast.policies.len() != 1 {
        let at = ast.policies.get(1).map_or((1, 1), |p| {
            let lc = line_col(src, p.span.start);
            (lc.line, lc.col)
        });
        return Err(
            Error::new(ErrorCode::InvalidDocument, "policy source has 1 problem").with_violations(
                vec![Violation::at(
                    source_name,
                    at.0,
                    at.1,
                    format!(
                        "a stored policy document holds exactly one `policy` block, found {}",
                        ast.policies.len()
                    ),
                )],
            ),
        );
    }
    let policies = ast
        .policies
        .iter()
        .map(|p| info(source_name, src, p, version))
        .collect();
    Ok(Compiled {
        source_name: source_name.to_string(),
        set: set.with_fuel(fuel),
        policies,
    })
}

/// One `policy` block of a file: its name, where it starts (`line`, `col`)
/// and the text stored as its version's source.
#[derive(Debug, Clone)]
pub struct Block {
    /// Policy name.
    pub name: String,
    /// 1-based position of `policy` in the file.
    pub at: (u32, u32),
    /// The block's source: the whole file when it holds one block, else from
    /// the end of the previous block (comments before it included) to its
    /// closing brace.
    pub source: String,
}

/// Compiles a file of one or more `policy` blocks (errors positioned in the
/// file) and splits it into its blocks. Two blocks naming one policy, or
/// none at all, is `INVALID_DOCUMENT`.
pub fn split(source_name: &str, src: &str, fuel: u64) -> Result<Vec<Block>> {
    // The whole file first: every problem with its position in the file.
    compile(source_name, src, 0, fuel, false)?;
    let ast: PolicyFile = anumate_policy::parse(source_name, src).map_err(Error::from)?;
    let problem = |at: (u32, u32), text: String| {
        Error::new(ErrorCode::InvalidDocument, "policy source has 1 problem")
            .with_violations(vec![Violation::at(source_name, at.0, at.1, text)])
    };
    if ast.policies.is_empty() {
        return Err(problem(
            (1, 1),
            "the file holds no `policy` block".to_owned(),
        ));
    }
    let single = ast.policies.len() == 1;
    let mut blocks: Vec<Block> = Vec::with_capacity(ast.policies.len());
    let mut previous_end = 0;
    for p in &ast.policies {
        let lc = line_col(src, p.span.start);
        let at = (lc.line, lc.col);
        if let Some(first) = blocks.iter().find(|b| b.name == p.name) {
            return Err(problem(
                at,
                format!(
                    "policy {:?} is already defined at {}:{}; each block of a file names a different policy",
                    p.name, first.at.0, first.at.1
                ),
            ));
        }
        let source = if single {
            src.to_owned()
        } else {
            let text = src.get(previous_end..p.span.end).unwrap_or_default();
            // Blank lines before the block (or its comments) are not part of it.
            let start = text
                .char_indices()
                .find(|(_, c)| !c.is_whitespace())
                .map_or(0, |(i, _)| text[..i].rfind('\n').map_or(0, |n| n + 1));
            format!("{}\n", &text[start..])
        };
        previous_end = p.span.end;
        blocks.push(Block {
            name: p.name.clone(),
            at,
            source,
        });
    }
    Ok(blocks)
}
