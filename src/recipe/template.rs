//! The tiny template language of recipe strings: `{{var.NAME}}`, `{{timestamp}}` and
//! `{{build_id}}`. It exists so one recipe can bake many images (a fresh name per bake, a
//! subnet per environment) without a general-purpose template engine and its surprises.

use std::collections::BTreeMap;

/// What a template may refer to. `timestamp` and `build_id` are known only when a bake starts;
/// while validating they are `None` and their placeholders are left in place.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub vars: &'a BTreeMap<String, String>,
    pub timestamp: Option<&'a str>,
    pub build_id: Option<&'a str>,
}

/// A template error, with the byte offset (inside the string) of the placeholder at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub offset: usize,
    pub message: String,
    pub hint: String,
}

/// Renders every placeholder of `input` from `ctx`.
pub fn render(input: &str, ctx: &Context<'_>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    let mut consumed = 0;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(TemplateError {
                offset: consumed + start,
                message: "unclosed `{{` in template".into(),
                hint: "close the placeholder with `}}`, e.g. `{{var.name}}`".into(),
            });
        };
        let name = after[..end].trim();
        let offset = consumed + start;
        match name {
            "timestamp" => match ctx.timestamp {
                Some(t) => out.push_str(t),
                None => out.push_str("{{timestamp}}"),
            },
            "build_id" => match ctx.build_id {
                Some(b) => out.push_str(b),
                None => out.push_str("{{build_id}}"),
            },
            _ => {
                let Some(var) = name.strip_prefix("var.") else {
                    return Err(TemplateError {
                        offset,
                        message: format!("unknown placeholder `{{{{{name}}}}}`"),
                        hint: "use `{{var.NAME}}`, `{{timestamp}}` or `{{build_id}}`".into(),
                    });
                };
                match ctx.vars.get(var) {
                    Some(v) => out.push_str(v),
                    None => {
                        return Err(TemplateError {
                            offset,
                            message: format!("variable `{var}` is not declared"),
                            hint: format!(
                                "declare it under [variables] (e.g. `{var} = \"default\"` or \
                                 `{var} = {{ required = true }}`)"
                            ),
                        })
                    }
                }
            }
        }
        let advance = start + 2 + end + 2;
        consumed += advance;
        rest = &rest[advance..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> BTreeMap<String, String> {
        BTreeMap::from([("env".to_string(), "prod".to_string())])
    }

    #[test]
    fn renders_variables_and_keeps_bake_time_placeholders() {
        let v = vars();
        let ctx = Context {
            vars: &v,
            timestamp: None,
            build_id: None,
        };
        assert_eq!(
            render("web-{{var.env}}-{{ timestamp }}", &ctx).unwrap(),
            "web-prod-{{timestamp}}"
        );
        let ctx = Context {
            vars: &v,
            timestamp: Some("20261127T1030"),
            build_id: Some("b1"),
        };
        assert_eq!(
            render("web-{{var.env}}-{{timestamp}}-{{build_id}}", &ctx).unwrap(),
            "web-prod-20261127T1030-b1"
        );
    }

    #[test]
    fn undeclared_variable_is_an_error_at_its_offset() {
        let v = vars();
        let ctx = Context {
            vars: &v,
            timestamp: None,
            build_id: None,
        };
        let err = render("ab{{var.nope}}", &ctx).unwrap_err();
        assert_eq!(err.offset, 2);
        assert!(err.message.contains("`nope` is not declared"));
    }

    #[test]
    fn unknown_and_unclosed_placeholders_are_errors() {
        let v = vars();
        let ctx = Context {
            vars: &v,
            timestamp: None,
            build_id: None,
        };
        assert!(render("{{user `x`}}", &ctx)
            .unwrap_err()
            .message
            .contains("unknown placeholder"));
        assert!(render("x{{var.env", &ctx)
            .unwrap_err()
            .message
            .contains("unclosed"));
    }
}
