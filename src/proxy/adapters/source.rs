//! Adapter source templates: where a vLLM server finds an adapter's files (the `lora_path` of
//! a load), rendered from a pool's `adapter_source` / `final_adapter_source` and the target.
//!
//! A template is literal text with placeholders:
//! - `{job_id}`: the target's `jobId`;
//! - `{step}`: its `checkpointStep` (checkpoint targets only);
//! - `{target_id}`: the target id, `<jobId>` or `<jobId>:step-<N>`.
//!
//! Braces appear only in placeholders; anything else in braces is refused at config load, so a
//! typo (`{jobid}`) stops the start instead of loading from a wrong path at run time.

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(Box<str>),
    JobId,
    Step,
    TargetId,
}

/// A parsed source template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTemplate {
    parts: Vec<Part>,
}

impl SourceTemplate {
    /// Parses a template; the error says what is wrong, for a message naming the field.
    pub fn parse(text: &str) -> Result<SourceTemplate, String> {
        if text.trim().is_empty() {
            return Err("must not be empty".to_owned());
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let brace = rest.find(['{', '}']).unwrap_or(rest.len());
            if brace > 0 {
                parts.push(Part::Text(rest[..brace].into()));
                rest = &rest[brace..];
                continue;
            }
            if rest.starts_with('}') {
                return Err(format!("{text:?} has a '}}' without its '{{'"));
            }
            let Some(close) = rest.find('}') else {
                return Err(format!("{text:?} has a '{{' without its '}}'"));
            };
            let part = match &rest[1..close] {
                "job_id" => Part::JobId,
                "step" => Part::Step,
                "target_id" => Part::TargetId,
                other => {
                    return Err(format!(
                        "{text:?}: unknown placeholder {{{other}}} (known: {{job_id}}, {{step}}, {{target_id}})"
                    ));
                }
            };
            parts.push(part);
            rest = &rest[close + 1..];
        }
        Ok(SourceTemplate { parts })
    }

    /// Whether the template needs a checkpoint step.
    pub fn uses_step(&self) -> bool {
        self.parts.contains(&Part::Step)
    }

    /// The source of one adapter; `None` when the template needs a step and the target has none.
    fn render(&self, job_id: &str, step: Option<u64>, target_id: &str) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::JobId => out.push_str(job_id),
                Part::TargetId => out.push_str(target_id),
                Part::Step => out.push_str(&step?.to_string()),
            }
        }
        Some(out)
    }
}

/// A pool's two templates: one for checkpoints, one for final adapters (no step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSources {
    checkpoint: SourceTemplate,
    final_adapter: SourceTemplate,
}

impl AdapterSources {
    /// Parses `adapter_source` and the optional `final_adapter_source`. Without the latter,
    /// final adapters use `adapter_source`, which then must not need a step. Errors name the
    /// field (`adapter_source` or `final_adapter_source`) and the problem.
    pub fn parse(
        adapter_source: &str,
        final_adapter_source: Option<&str>,
    ) -> Result<AdapterSources, (&'static str, String)> {
        let checkpoint =
            SourceTemplate::parse(adapter_source).map_err(|e| ("adapter_source", e))?;
        let final_adapter = match final_adapter_source {
            Some(text) => {
                let t = SourceTemplate::parse(text).map_err(|e| ("final_adapter_source", e))?;
                if t.uses_step() {
                    return Err((
                        "final_adapter_source",
                        "a final adapter has no {step}".to_owned(),
                    ));
                }
                t
            }
            None if checkpoint.uses_step() => {
                return Err((
                    "final_adapter_source",
                    "adapter_source uses {step}, so final adapters (no checkpointStep) need \
                     their own template, e.g. \"/models/{job_id}/final\""
                        .to_owned(),
                ));
            }
            None => checkpoint.clone(),
        };
        Ok(AdapterSources {
            checkpoint,
            final_adapter,
        })
    }

    /// The source of an adapter target, or `None` when its job id could step out of the
    /// template's folder (`..`, `/`, or other than letters, digits, `.`, `_` and `-`).
    pub fn render(&self, job_id: &str, step: Option<u64>, target_id: &str) -> Option<String> {
        if !is_plain_segment(job_id) {
            return None;
        }
        let template = match step {
            Some(_) => &self.checkpoint,
            None => &self.final_adapter,
        };
        template.render(job_id, step, target_id)
    }
}

/// Job ids are UUIDs; anything that could change the rendered path's meaning is refused.
fn is_plain_segment(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_render_checkpoints_and_finals() {
        let s = AdapterSources::parse(
            "/models/{job_id}/checkpoint-{step}",
            Some("s3://bucket/{job_id}/final"),
        )
        .unwrap();
        assert_eq!(
            s.render("4b2e-1", Some(42), "4b2e-1:step-42").as_deref(),
            Some("/models/4b2e-1/checkpoint-42")
        );
        assert_eq!(
            s.render("4b2e-1", None, "4b2e-1").as_deref(),
            Some("s3://bucket/4b2e-1/final")
        );
        // One template without {step} serves both kinds.
        let one = AdapterSources::parse("/a/{target_id}", None).unwrap();
        assert_eq!(
            one.render("j", Some(3), "j:step-3").as_deref(),
            Some("/a/j:step-3")
        );
        assert_eq!(one.render("j", None, "j").as_deref(), Some("/a/j"));
    }

    #[test]
    fn job_ids_cannot_leave_the_folder() {
        let s = AdapterSources::parse("/models/{job_id}", None).unwrap();
        for bad in ["..", ".", "a/b", "", "a b", "a\\b", "%2e%2e"] {
            assert_eq!(s.render(bad, None, bad), None, "{bad:?}");
        }
        assert!(s.render("6f1c0e2a-uuid_v4.x", None, "x").is_some());
    }

    #[test]
    fn bad_templates_are_refused_with_the_field() {
        for (checkpoint, final_adapter, field) in [
            ("", None, "adapter_source"),
            ("/m/{jobid}", None, "adapter_source"),
            ("/m/{job_id", None, "adapter_source"),
            ("/m/job_id}", None, "adapter_source"),
            ("/m/{{job_id}}", None, "adapter_source"),
            ("/m/{job_id}/{step}", None, "final_adapter_source"),
            (
                "/m/{job_id}/{step}",
                Some("/f/{step}"),
                "final_adapter_source",
            ),
            ("/m/{job_id}", Some("/f/{nope}"), "final_adapter_source"),
        ] {
            let e = AdapterSources::parse(checkpoint, final_adapter).unwrap_err();
            assert_eq!(e.0, field, "{checkpoint:?} {final_adapter:?}: {}", e.1);
        }
    }
}
