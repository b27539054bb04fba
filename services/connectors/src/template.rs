//! `${{ args… }}` expressions in tool declarations (mock outputs): a string
//! that is exactly one expression becomes the value it names; expressions
//! inside longer strings are interpolated as text.

use serde_json::Value;

/// Renders every string of `template` over `args`.
pub fn render(template: &Value, args: &Value) -> Result<Value, String> {
    Ok(match template {
        Value::String(s) => render_str(s, args)?,
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render(v, args))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render(v, args)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn render_str(s: &str, args: &Value) -> Result<Value, String> {
    let trimmed = s.trim();
    if let Some(expr) = whole_expression(trimmed) {
        return lookup(expr, args);
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
        match lookup(after[..end].trim(), args)? {
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

/// `args`, `args.a.b` or `args.list.0`.
fn lookup(expr: &str, args: &Value) -> Result<Value, String> {
    let mut parts = expr.split('.');
    if parts.next() != Some("args") {
        return Err(format!("expression {expr:?} must start with args"));
    }
    let mut value = args;
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
