//! The tiny template language of recipe strings: `{{var.NAME}}`, `{{timestamp}}` and
//! `{{build_id}}`, and in provisioner `env` values and file templates also
//! `{{secret:NAME_OR_ARN#json_key@VERSION_STAGE}}` and `{{rds:INSTANCE_ID.address|port|engine}}`,
//! resolved once at bake time. It exists so one recipe can bake many images without a
//! general-purpose template engine and its surprises.

use std::collections::BTreeMap;

/// What a template may refer to. `timestamp` and `build_id` are known only when a bake starts;
/// while validating they are `None` and their placeholders are left in place.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub vars: &'a BTreeMap<String, String>,
    pub timestamp: Option<&'a str>,
    pub build_id: Option<&'a str>,
    /// Whether `secret:` and `rds:` references may appear here; with `Some`, their resolved
    /// values (by reference text), else they are checked and left in place.
    pub refs: Refs<'a>,
}

#[derive(Debug, Clone, Copy)]
pub enum Refs<'a> {
    Forbidden,
    Unresolved,
    Resolved(&'a BTreeMap<String, String>),
}

/// A parsed `secret:` or `rds:` reference.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reference {
    Secret {
        id: String,
        key: Option<String>,
        stage: Option<String>,
    },
    Rds {
        instance: String,
        field: RdsField,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RdsField {
    Address,
    Port,
    Engine,
}

/// Parses the text of a reference placeholder (`secret:...` or `rds:...`).
pub fn parse_reference(text: &str) -> Result<Reference, String> {
    if let Some(rest) = text.strip_prefix("secret:") {
        let (rest, stage) = match rest.rsplit_once('@') {
            Some((r, s)) if !s.is_empty() && !s.contains(['/', '#', ':']) => {
                (r, Some(s.to_string()))
            }
            _ => (rest, None),
        };
        let (id, key) = match rest.split_once('#') {
            Some((i, k)) if !k.is_empty() => (i, Some(k.to_string())),
            Some(_) => return Err("an empty `#json_key`".into()),
            None => (rest, None),
        };
        if id.is_empty() {
            return Err("no secret name or ARN".into());
        }
        return Ok(Reference::Secret {
            id: id.to_string(),
            key,
            stage,
        });
    }
    if let Some(rest) = text.strip_prefix("rds:") {
        let (instance, field) = match rest.rsplit_once('.') {
            Some((i, "address")) => (i, RdsField::Address),
            Some((i, "port")) => (i, RdsField::Port),
            Some((i, "engine")) => (i, RdsField::Engine),
            Some((_, other)) => {
                return Err(format!(
                    "unknown RDS field `{other}` (use address, port or engine)"
                ))
            }
            None => (rest, RdsField::Address),
        };
        if instance.is_empty() {
            return Err("no DB instance identifier".into());
        }
        return Ok(Reference::Rds {
            instance: instance.to_string(),
            field,
        });
    }
    Err("not a reference".into())
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
        if name.contains("{{") {
            return Err(TemplateError {
                offset,
                message: format!("a placeholder inside another: `{{{{{name}}}}}`"),
                hint: "placeholders cannot be nested; write the reference out in full, e.g. {{secret:app/db}}, or pass the whole value as a variable".into(),
            });
        }
        match name {
            "timestamp" => match ctx.timestamp {
                Some(t) => out.push_str(t),
                None => out.push_str("{{timestamp}}"),
            },
            "build_id" => match ctx.build_id {
                Some(b) => out.push_str(b),
                None => out.push_str("{{build_id}}"),
            },
            _ if name.starts_with("secret:") || name.starts_with("rds:") => {
                if let Err(why) = parse_reference(name) {
                    return Err(TemplateError {
                        offset,
                        message: format!("`{{{{{name}}}}}` is not a valid reference: {why}"),
                        hint: "write {{secret:NAME_OR_ARN#json_key@VERSION_STAGE}} or {{rds:INSTANCE_ID.address}}".into(),
                    });
                }
                match ctx.refs {
                    Refs::Forbidden => {
                        return Err(TemplateError {
                            offset,
                            message: format!("`{{{{{name}}}}}` may only appear in a provisioner's `env` values or a file template"),
                            hint: "secrets must not end up in names, tags or descriptions: pass them to provisioners through env".into(),
                        })
                    }
                    Refs::Unresolved => out.push_str(&format!("{{{{{name}}}}}")),
                    Refs::Resolved(map) => match map.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            return Err(TemplateError {
                                offset,
                                message: format!("reference `{name}` was not resolved"),
                                hint: String::new(),
                            })
                        }
                    },
                }
            }
            _ => {
                let Some(var) = name.strip_prefix("var.") else {
                    return Err(TemplateError {
                        offset,
                        message: format!("unknown placeholder `{{{{{name}}}}}`"),
                        hint: "use `{{var.NAME}}`, `{{timestamp}}`, `{{build_id}}`, `{{secret:NAME}}` or `{{rds:ID.address}}`".into(),
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
    fn nested_placeholders_are_an_error() {
        // Issue #10 A19: `{{secret:adv/{{var.w}}}}` passed validate.
        let v = vars();
        let ctx = Context {
            vars: &v,
            timestamp: None,
            build_id: None,
            refs: Refs::Unresolved,
        };
        let e = render("x {{secret:adv/{{var.env}}}}", &ctx).unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(e.message.contains("a placeholder inside another"), "{e:?}");
    }

    #[test]
    fn renders_variables_and_keeps_bake_time_placeholders() {
        let v = vars();
        let ctx = Context {
            vars: &v,
            timestamp: None,
            build_id: None,
            refs: Refs::Forbidden,
        };
        assert_eq!(
            render("web-{{var.env}}-{{ timestamp }}", &ctx).unwrap(),
            "web-prod-{{timestamp}}"
        );
        let ctx = Context {
            vars: &v,
            timestamp: Some("20261127T1030"),
            build_id: Some("b1"),
            refs: Refs::Forbidden,
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
            refs: Refs::Forbidden,
        };
        let err = render("ab{{var.nope}}", &ctx).unwrap_err();
        assert_eq!(err.offset, 2);
        assert!(err.message.contains("`nope` is not declared"));
    }

    #[test]
    fn references_parse_and_are_allowed_only_where_asked() {
        assert_eq!(
            parse_reference("secret:prod/db#password@AWSPREVIOUS").unwrap(),
            Reference::Secret {
                id: "prod/db".into(),
                key: Some("password".into()),
                stage: Some("AWSPREVIOUS".into())
            }
        );
        assert_eq!(
            parse_reference("secret:arn:aws:secretsmanager:us-east-1:1:secret:db-AbC").unwrap(),
            Reference::Secret {
                id: "arn:aws:secretsmanager:us-east-1:1:secret:db-AbC".into(),
                key: None,
                stage: None
            }
        );
        assert_eq!(
            parse_reference("rds:world-db.port").unwrap(),
            Reference::Rds {
                instance: "world-db".into(),
                field: RdsField::Port
            }
        );
        assert!(parse_reference("rds:db.password").is_err());
        let v = vars();
        let mut ctx = Context {
            vars: &v,
            timestamp: None,
            build_id: None,
            refs: Refs::Forbidden,
        };
        assert!(render("{{secret:db}}", &ctx)
            .unwrap_err()
            .message
            .contains("may only appear"));
        ctx.refs = Refs::Unresolved;
        assert_eq!(
            render("pw={{ secret:db#pw }}", &ctx).unwrap(),
            "pw={{secret:db#pw}}"
        );
        let resolved = BTreeMap::from([("secret:db#pw".to_string(), "hunter22".to_string())]);
        ctx.refs = Refs::Resolved(&resolved);
        assert_eq!(render("pw={{secret:db#pw}}", &ctx).unwrap(), "pw=hunter22");
    }

    #[test]
    fn unknown_and_unclosed_placeholders_are_errors() {
        let v = vars();
        let ctx = Context {
            vars: &v,
            timestamp: None,
            build_id: None,
            refs: Refs::Forbidden,
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
