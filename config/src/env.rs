//! `${NAME}` and `${NAME:-default}` in the configuration file, filled from
//! the environment before the TOML is parsed: one file then serves every
//! container of a compose or Swarm stack, each given its ports and hosts by
//! its environment. Passwords belong in `*_file` settings, not here.
//!
//! Rules (those of POSIX shells and compose files, kept small):
//! * `${NAME}`: NAME must be set, else the file is refused (a silently empty
//!   address is worse than an error);
//! * `${NAME:-default}`: the default when NAME is unset or empty;
//! * `$${` is a literal `${`; any other `$` stays as it is (so a `$$` in a
//!   file written before this existed, a password say, is unchanged);
//! * comment lines (first non-blank character `#`) are left alone.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("line {line}: ${{{name}}} is not set in the environment (give a default: ${{{name}:-value}})")]
    Unset { line: usize, name: String },
    #[error("line {line}: '{text}' is not ${{NAME}} or ${{NAME:-default}} (write $${{ for a literal ${{)")]
    Malformed { line: usize, text: String },
}

/// Expands `text` with `lookup` (the process environment in production).
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    if !text.contains('$') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        expand_line(line, i + 1, &lookup, &mut out)?;
    }
    Ok(out)
}

fn expand_line(
    line: &str,
    number: usize,
    lookup: &impl Fn(&str) -> Option<String>,
    out: &mut String,
) -> Result<(), ExpandError> {
    let mut rest = line;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let malformed = || ExpandError::Malformed {
                line: number,
                text: rest[at..].trim_end().chars().take(40).collect(),
            };
            let end = body.find('}').ok_or_else(malformed)?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(malformed());
            }
            match (lookup(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) if lookup(name).is_some() => {}
                (None, None) => {
                    return Err(ExpandError::Unset {
                        line: number,
                        name: name.to_owned(),
                    })
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("6432".into()),
            "EMPTY" => Some(String::new()),
            "HOST" => Some("db-1".into()),
            _ => None,
        }
    }

    #[test]
    fn fills_names_and_defaults() {
        let text = "rw = \"0.0.0.0:${PORT}\"\nro = \"${HOST}:${RO_PORT:-6433}\"\n";
        assert_eq!(
            expand(text, env).unwrap(),
            "rw = \"0.0.0.0:6432\"\nro = \"db-1:6433\"\n"
        );
    }

    #[test]
    fn empty_takes_the_default_but_counts_as_set_without_one() {
        assert_eq!(expand("a = \"${EMPTY:-x}\"", env).unwrap(), "a = \"x\"");
        assert_eq!(expand("a = \"${EMPTY}\"", env).unwrap(), "a = \"\"");
        assert_eq!(expand("a = \"${PORT:-1}\"", env).unwrap(), "a = \"6432\"");
        assert_eq!(expand("a = \"${NOPE:-}\"", env).unwrap(), "a = \"\"");
    }

    #[test]
    fn unset_without_default_is_refused_with_its_line() {
        let err = expand("a = 1\nb = \"${NOPE}\"\n", env).unwrap_err();
        assert_eq!(
            err,
            ExpandError::Unset {
                line: 2,
                name: "NOPE".into()
            }
        );
        assert!(err.to_string().contains("line 2: ${NOPE} is not set"));
    }

    #[test]
    fn dollars_escape_and_stray_dollars_stay() {
        assert_eq!(expand("p = \"a$$b$${PORT}\"", env).unwrap(), "p = \"a$$b${PORT}\"");
        assert_eq!(expand("p = \"cost $5 and $\"", env).unwrap(), "p = \"cost $5 and $\"");
    }

    #[test]
    fn malformed_references_are_refused() {
        for bad in ["${PORT", "${}", "${1X}", "${A-B}", "${PO RT}"] {
            let err = expand(bad, env).unwrap_err();
            assert!(matches!(err, ExpandError::Malformed { line: 1, .. }), "{bad}: {err:?}");
        }
    }

    #[test]
    fn comments_are_not_expanded() {
        let text = "# set ${NOPE} to change it\n  # ${ALSO}\nx = 1\n";
        assert_eq!(expand(text, env).unwrap(), text);
    }

    #[test]
    fn text_without_dollars_is_unchanged() {
        let text = "[listen]\nrw = \"127.0.0.1:6432\"\n";
        assert_eq!(expand(text, env).unwrap(), text);
    }
}
