//! `${{ args… }}` expressions in tool declarations (mock outputs): a string
//! that is exactly one expression becomes the value it names; expressions
//! inside longer strings are interpolated as text.

use serde_json::Value;

/// Renders every string of `template` over `args` (`${{ args… }}` only).
pub fn render(template: &Value, args: &Value) -> Result<Value, String> {
    render_in(template, &serde_json::json!({"args": args}))
}

/// Renders every string of `template` over `root`, whose top-level keys
/// (`args`, `secrets`) are the names an expression may start with.
pub fn render_in(template: &Value, root: &Value) -> Result<Value, String> {
    Ok(match template {
        Value::String(s) => render_str(s, root)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_in(v, root))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_in(v, root)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// Renders a text template (a URL, a header value) over `root`.
pub fn render_text(template: &str, root: &Value) -> Result<String, String> {
    Ok(match render_str(template, root)? {
        Value::String(s) => s,
        other => other.to_string(),
    })
}

fn render_str(s: &str, root: &Value) -> Result<Value, String> {
    let trimmed = s.trim();
    if let Some(expr) = whole_expression(trimmed) {
        return lookup(expr, root);
    }
    if !s.contains("${{") {
        return Ok(Value::String(s.to_owned()));
    }
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unterminated expression in {s:?}"))?;
        match lookup(after[..end].trim(), root)? {
            Value::String(text) => out.push_str(&text),
            other => out.push_str(&other.to_string()),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(Value::String(out))
}

fn whole_expression(s: &str) -> Option<&str> {
    let inner = s.strip_prefix("${{")?.strip_suffix("}}")?;
    (!inner.contains("${{") && !inner.contains("}}")).then(|| inner.trim())
}

/// `args`, `args.a.b`, `args.list.0`, `secrets.NAME`: the first segment
/// must be a key of `root`. Errors name the expression, never a value.
fn lookup(expr: &str, root: &Value) -> Result<Value, String> {
    let mut parts = expr.split('.');
    let head = parts.next().unwrap_or_default();
    let Some(mut value) = root.get(head) else {
        return Err(format!(
            "expression {expr:?} names nothing ({head:?} is not available here)"
        ));
    };
    if head == "secrets" {
        let name = parts.next().unwrap_or_default();
        return root["secrets"]
            .get(name)
            .cloned()
            .ok_or_else(|| format!("secret {name:?} is not configured in [connectors.secrets]"));
    }
    for part in parts {
        value = match value {
            Value::Object(map) => map.get(part),
            Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        }
        .unwrap_or(&Value::Null);
    }
    Ok(value.clone())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn whole_expressions_keep_their_type_and_text_interpolates() {
        let args = json!({"amount": 5, "to": {"iban": "DE1"}, "l": [1, 2]});
        let out = render(
            &json!({"id": "tr_${{ args.to.iban }}", "n": "${{ args.amount }}", "all": "${{args}}",
                    "second": "${{ args.l.1 }}", "missing": "${{ args.nope }}", "k": 3}),
            &args,
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"id": "tr_DE1", "n": 5, "all": args, "second": 2, "missing": null, "k": 3})
        );
        assert!(render(&json!("${{ secrets.X }}"), &args).is_err());
        assert!(render(&json!("a ${{ args"), &args).is_err());
    }
}
