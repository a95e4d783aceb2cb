//! The users file: PgBouncer's userlist.txt format, one `"user" "secret"`
//! per line, `""` escaping a quote, `;` or `#` starting a comment line.

use pgferry_protocol::scram::Secret;
use std::collections::HashMap;
use std::path::Path;

/// What is stored for a user.
#[derive(Clone)]
pub enum Credential {
    Scram(Secret),
    /// `md5` + md5(password + user), as in pg_authid.
    Md5([u8; 32]),
    Plain(String),
}

impl Credential {
    /// Reads a secret as stored in pg_authid.rolpassword: a SCRAM verifier,
    /// an md5 hash, or else a plaintext password.
    pub fn parse(secret: &str) -> Result<Credential, &'static str> {
        Ok(if secret.starts_with("SCRAM-SHA-256$") {
            Credential::Scram(Secret::parse(secret).map_err(|_| "malformed SCRAM secret")?)
        } else if secret.len() == 35 && secret.starts_with("md5") && secret[3..].bytes().all(|b| b.is_ascii_hexdigit())
        {
            let mut h = [0u8; 32];
            h.copy_from_slice(&secret.as_bytes()[3..]);
            Credential::Md5(h)
        } else {
            Credential::Plain(secret.to_owned())
        })
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Credential::Scram(_) => "Scram(<redacted>)",
            Credential::Md5(_) => "Md5(<redacted>)",
            Credential::Plain(_) => "Plain(<redacted>)",
        })
    }
}

#[derive(Debug, Default, Clone)]
pub struct Userlist {
    users: HashMap<String, Credential>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserlistError {
    #[error("cannot read users file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("users file line {line}: {reason}")]
    Syntax { line: usize, reason: &'static str },
}

fn quoted(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if s[i + 1..].starts_with('"') {
                out.push('"');
                chars.next();
                continue;
            }
            return Some((out, &s[i + 1..]));
        }
        out.push(c);
    }
    None
}

impl Userlist {
    pub fn parse(text: &str) -> Result<Self, UserlistError> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with(';') || t.starts_with('#') {
                continue;
            }
            let syntax = |reason| UserlistError::Syntax { line: n + 1, reason };
            let (user, rest) = quoted(t).ok_or_else(|| syntax("expected \"user\""))?;
            let (secret, rest) = quoted(rest).ok_or_else(|| syntax("expected \"secret\" after the user"))?;
            if !rest.trim().is_empty() {
                return Err(syntax("unexpected text after the secret"));
            }
            let cred = Credential::parse(&secret).map_err(syntax)?;
            users.insert(user, cred);
        }
        Ok(Userlist { users })
    }

    pub fn load(path: &Path) -> Result<Self, UserlistError> {
        let text = std::fs::read_to_string(path).map_err(|source| UserlistError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    pub fn get(&self, user: &str) -> Option<&Credential> {
        self.users.get(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_kinds() {
        let secret = Secret::from_password("pw", b"salt", 4096).encode();
        let text = format!(
            "; comment\n\"app\" \"{secret}\"\n\"md\" \"md5{}\"\n\"q\"\"uote\" \"plain pw\"\n",
            "a".repeat(32)
        );
        let u = Userlist::parse(&text).unwrap();
        assert!(matches!(u.get("app"), Some(Credential::Scram(_))));
        assert!(matches!(u.get("md"), Some(Credential::Md5(_))));
        assert!(matches!(u.get("q\"uote"), Some(Credential::Plain(p)) if p == "plain pw"));
    }

    #[test]
    fn reports_line_of_error() {
        let e = Userlist::parse("\"a\" \"b\"\n\"c\" d").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
