//! Client authentication: the method comes from the hba rules, the secret
//! from the users file or, for users not in it, from auth_query.
//!
//! An unknown user goes through the same exchange as a known one (with a
//! mock SCRAM secret), so the answer and its timing do not reveal which
//! user names exist. The same holds for a user whose VALID UNTIL has
//! passed: the exchange completes, then fails like a wrong password.

use crate::authquery::Lookup;
use crate::clientio::{ClientIo, MAX_AUTH_MESSAGE};
use crate::error::ClientError;
use crate::handshake::TlsInfo;
use crate::shared::{AuthState, Settings};
use crate::userlist::Credential;
use pgferry_config::HbaMethod;
use pgferry_pool::NodeAddr;
use pgferry_protocol::frame::Reader;
use pgferry_protocol::scram::{self, ChannelBinding, Secret, ServerExchange};
use pgferry_protocol::{encode, frontend, sqlstate};
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

/// A SASL message that is missing, malformed or not what was offered: a
/// protocol violation (08P01), as PostgreSQL answers, not a failed
/// password. It says nothing about the user: the checks depend on the
/// message alone, never on the secret.
fn sasl_violation(message: impl Into<String>) -> ClientError {
    ClientError::refused(sqlstate::PROTOCOL_VIOLATION, message)
}

/// Whether a SCRAM error is about the message's form (a protocol
/// violation) rather than the password.
fn is_malformed(e: &scram::ScramError) -> bool {
    matches!(
        e,
        scram::ScramError::Malformed(_) | scram::ScramError::ChannelBinding | scram::ScramError::Nonce
    )
}

/// Who is logging in, and over what.
pub struct Attempt<'a> {
    pub user: &'a str,
    pub database: &'a str,
    /// Where auth_query runs; None: the users file only (admin console).
    pub node: Option<&'a NodeAddr>,
    pub tls: Option<&'a TlsInfo>,
}

pub async fn authenticate(
    io: &mut ClientIo,
    a: &Attempt<'_>,
    method: HbaMethod,
    settings: &Settings,
    auth: &AuthState,
) -> Result<Authenticated, ClientError> {
    let user = a.user;
    let out = match method {
        HbaMethod::Reject => unreachable!("rejected before authentication"),
        HbaMethod::Trust => Authenticated { scram: None },
        HbaMethod::Md5 | HbaMethod::ScramSha256 => {
            let (cred, expired) = credential(a, settings, auth).await?;
            let unusable = if expired { Some("VALID UNTIL has passed") } else { None };
            match (method, &cred) {
                // md5 needs an md5 hash or a password; with only a SCRAM
                // secret, PostgreSQL uses SCRAM instead, and so does pgferry.
                (HbaMethod::Md5, Some(c @ (Credential::Md5(_) | Credential::Plain(_)))) => {
                    md5(io, user, c).await?;
                    if let Some(why) = unusable {
                        return Err(fail(user, why));
                    }
                    Authenticated { scram: None }
                }
                _ => {
                    let secret = match &cred {
                        Some(Credential::Scram(s)) => Ok(s.clone()),
                        Some(Credential::Plain(p)) => Ok(auth.plain_secret(user, p).await),
                        Some(Credential::Md5(_)) => {
                            Err("only an md5 hash is stored; SCRAM needs a SCRAM secret or a password")
                        }
                        None => Err("no such user"),
                    };
                    let secret = match (secret, unusable) {
                        (Ok(_), Some(why)) => Err(why),
                        (s, _) => s,
                    };
                    scram_exchange(io, user, secret, a.tls, auth).await?
                }
            }
        }
    };
    encode::auth_ok(&mut io.wbuf);
    Ok(out)
}

/// The user's stored credential and whether it has expired: the users file
/// first, then auth_query.
async fn credential(
    a: &Attempt<'_>,
    settings: &Settings,
    auth: &AuthState,
) -> Result<(Option<Credential>, bool), ClientError> {
    if let Some(c) = settings.userlist().get(a.user) {
        return Ok((Some(c.clone()), false));
    }
    let (Some(q), Some(node)) = (&auth.auth_query, a.node) else {
        return Ok((None, false));
    };
    match q.lookup(node, a.database, a.user).await {
        Ok(l) => {
            let expired = l.is_expired();
            Ok(match l {
                Lookup::Missing => (None, false),
                Lookup::Found { credential, .. } => (Some(credential), expired),
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "auth_query failed");
            Err(ClientError::refused(
                sqlstate::CONNECTION_FAILURE,
                "pgferry could not look up the user's credentials (auth_query failed; see pgferry's log)",
            ))
        }
    }
}

async fn md5(io: &mut ClientIo, user: &str, cred: &Credential) -> Result<(), ClientError> {
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
    Ok(())
}

async fn scram_exchange(
    io: &mut ClientIo,
    user: &str,
    secret: Result<Secret, &'static str>,
    tls: Option<&TlsInfo>,
    auth: &AuthState,
) -> Result<Authenticated, ClientError> {
    let (secret, unusable) = match secret {
        Ok(s) => (s, None),
        Err(why) => (Secret::mock(user, &auth.mock_seed), Some(why)),
    };
    // On TLS, offer channel binding first, as PostgreSQL does.
    if tls.is_some() {
        encode::auth_sasl(&mut io.wbuf, &[scram::MECHANISM_PLUS, scram::MECHANISM]);
    } else {
        encode::auth_sasl(&mut io.wbuf, &[scram::MECHANISM]);
    }
    io.flush().await?;

    let f = io.read_frame(MAX_AUTH_MESSAGE).await?;
    if f.tag != frontend::PASSWORD {
        return Err(sasl_violation(format!(
            "expected SASL response, got message type {}",
            f.tag
        )));
    }
    let mut r = Reader::new(f.body(), "SASLInitialResponse");
    let mechanism = r.cstr_utf8()?;
    let len = r.i32()?;
    let data = r.remaining();
    let offered = mechanism == scram::MECHANISM || (tls.is_some() && mechanism == scram::MECHANISM_PLUS);
    if !offered {
        return Err(sasl_violation(
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    if len < 0 || len as usize != data.len() {
        return Err(pgferry_protocol::ProtocolError::Malformed("SASLInitialResponse").into());
    }
    let exchange =
        ServerExchange::start(secret.clone(), data, mechanism, tls.is_some()).map_err(|e| match is_malformed(&e) {
            true => sasl_violation(format!("malformed SCRAM message: {e}")),
            false => fail(user, format!("SCRAM: {e}")),
        })?;
    let binding = exchange.binding;
    encode::auth_sasl_continue(&mut io.wbuf, exchange.server_first());
    io.flush().await?;

    let f = io.read_frame(MAX_AUTH_MESSAGE).await?;
    if f.tag != frontend::PASSWORD {
        return Err(sasl_violation(format!(
            "expected SASL response, got message type {}",
            f.tag
        )));
    }
    let cb = match (binding, tls) {
        (ChannelBinding::TlsServerEndPoint, Some(t)) => Some(&*t.end_point),
        _ => None,
    };
    let verified = exchange.finish(f.body(), cb);
    // The form first, for known and unknown users alike.
    if let Err(e) = &verified {
        if is_malformed(e) {
            return Err(sasl_violation(format!("malformed SCRAM message: {e}")));
        }
    }
    if let Some(why) = unusable {
        return Err(fail(user, why));
    }
    let verified = verified.map_err(|e| fail(user, format!("SCRAM: {e}")))?;
    encode::auth_sasl_final(&mut io.wbuf, verified.server_final());
    Ok(Authenticated {
        scram: Some((secret, verified.client_key)),
    })
}
