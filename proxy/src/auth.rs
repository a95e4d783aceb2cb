//! Client authentication against the users file.
//!
//! An unknown user goes through the same exchange as a known one (with a
//! mock SCRAM secret), so the answer and its timing do not reveal which
//! user names exist.

use crate::clientio::{ClientIo, MAX_AUTH_MESSAGE};
use crate::error::ClientError;
use crate::shared::Shared;
use crate::userlist::Credential;
use pgferry_config::AuthMethod;
use pgferry_protocol::frame::Reader;
use pgferry_protocol::scram::{self, Secret, ServerExchange};
use pgferry_protocol::{encode, frontend};
use rand::RngCore;

/// What authentication established.
pub struct Authenticated {
    /// The secret and the ClientKey recovered from the client's SCRAM proof,
    /// for SCRAM pass-through to the server.
    pub scram: Option<(Secret, [u8; 32])>,
}

fn fail(user: &str, reason: impl Into<String>) -> ClientError {
    ClientError::Auth {
        user: user.to_owned(),
        reason: reason.into(),
    }
}

pub async fn authenticate(io: &mut ClientIo, user: &str, shared: &Shared) -> Result<Authenticated, ClientError> {
    let method = shared.config.auth.method;
    let cred = shared.userlist.get(user).cloned();
    let out = match (method, &cred) {
        (AuthMethod::Trust, _) => Authenticated { scram: None },
        // md5 needs an md5 hash or a password; with only a SCRAM secret,
        // PostgreSQL uses SCRAM instead, and so does pgferry.
        (AuthMethod::Md5, Some(Credential::Md5(_) | Credential::Plain(_))) => {
            md5(io, user, cred.as_ref().unwrap()).await?
        }
        _ => {
            let secret = match &cred {
                Some(Credential::Scram(s)) => Ok(s.clone()),
                Some(Credential::Plain(p)) => Ok(shared.plain_secret(user, p).await),
                Some(Credential::Md5(_)) => Err("only an md5 hash is stored; SCRAM needs a SCRAM secret or a password"),
                None => Err("no such user"),
            };
            scram_exchange(io, user, secret, shared).await?
        }
    };
    encode::auth_ok(&mut io.wbuf);
    Ok(out)
}

async fn md5(io: &mut ClientIo, user: &str, cred: &Credential) -> Result<Authenticated, ClientError> {
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    encode::auth_md5(&mut io.wbuf, salt);
    io.flush().await?;
    let f = io.read_frame(MAX_AUTH_MESSAGE).await?;
    if f.tag != frontend::PASSWORD {
        return Err(fail(user, "expected a password message"));
    }
    let got = Reader::new(f.body(), "PasswordMessage").cstr()?;
    let inner = match cred {
        Credential::Md5(h) => String::from_utf8_lossy(h).into_owned(),
        Credential::Plain(p) => scram::md5_inner(user, p),
        Credential::Scram(_) => unreachable!("SCRAM secrets never take the md5 path"),
    };
    let expected = scram::md5_salted(inner.as_bytes(), salt);
    if got.len() != expected.len() || got.iter().zip(&expected).fold(0u8, |a, (x, y)| a | (x ^ y)) != 0 {
        return Err(fail(user, "wrong password (md5)"));
    }
    Ok(Authenticated { scram: None })
}

async fn scram_exchange(
    io: &mut ClientIo,
    user: &str,
    secret: Result<Secret, &'static str>,
    shared: &Shared,
) -> Result<Authenticated, ClientError> {
    let (secret, unusable) = match secret {
        Ok(s) => (s, None),
        Err(why) => (Secret::mock(user, &shared.mock_seed), Some(why)),
    };
    encode::auth_sasl(&mut io.wbuf, &[scram::MECHANISM]);
    io.flush().await?;

    let f = io.read_frame(MAX_AUTH_MESSAGE).await?;
    if f.tag != frontend::PASSWORD {
        return Err(fail(user, "expected SASLInitialResponse"));
    }
    let mut r = Reader::new(f.body(), "SASLInitialResponse");
    let mechanism = r.cstr_utf8()?;
    let len = r.i32()?;
    let data = r.remaining();
    if mechanism != scram::MECHANISM {
        return Err(fail(user, format!("unsupported SASL mechanism {mechanism:?}")));
    }
    if len < 0 || len as usize != data.len() {
        return Err(pgferry_protocol::ProtocolError::Malformed("SASLInitialResponse").into());
    }
    let (exchange, server_first) =
        ServerExchange::start(secret.clone(), data, mechanism, false).map_err(|e| fail(user, format!("SCRAM: {e}")))?;
    encode::auth_sasl_continue(&mut io.wbuf, &server_first);
    io.flush().await?;

    let f = io.read_frame(MAX_AUTH_MESSAGE).await?;
    if f.tag != frontend::PASSWORD {
        return Err(fail(user, "expected SASLResponse"));
    }
    let verified = exchange.finish(f.body(), None);
    if let Some(why) = unusable {
        return Err(fail(user, why));
    }
    let verified = verified.map_err(|e| fail(user, format!("SCRAM: {e}")))?;
    encode::auth_sasl_final(&mut io.wbuf, &verified.server_final);
    Ok(Authenticated {
        scram: Some((secret, verified.client_key)),
    })
}
