//! The client side of a login to PostgreSQL, sans-IO: after the caller has
//! sent a StartupMessage, [`ClientLogin`] takes each server message up to
//! the first ReadyForQuery and says what to do (send an answer it wrote,
//! derive SCRAM keys, note a parameter or the cancel key, or nothing).
//!
//! The pool's server logins, the load generator and the end-to-end tests all
//! log in through it. It does no IO and no PBKDF2: the keys for a SCRAM
//! exchange are the caller's to derive (off the async workers) or to reuse,
//! since the same (password, salt, iterations) always gives the same keys.

use bytes::BytesMut;

use crate::backend::{self, AuthRequest};
use crate::scram::{self, ClientExchange, ScramError, ScramKeys};
use crate::{encode, Frame, ProtocolError};

/// Why a login failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoginError {
    /// An ErrorResponse from the server, as it sent it.
    #[error("{severity}: {message}")]
    Server {
        severity: String,
        code: String,
        message: String,
    },
    #[error("server asked for a password for user {user:?} and none is configured")]
    NoPassword { user: String },
    #[error("server offers no supported SASL mechanism: {0:?}")]
    NoMechanism(Vec<String>),
    #[error("unsupported authentication request {0}")]
    UnsupportedRequest(i32),
    /// A message that makes no sense at this point of the exchange.
    #[error("{0}")]
    OutOfOrder(&'static str),
    #[error("SCRAM: {0}")]
    Scram(#[from] ScramError),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// What to do after a server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'f> {
    /// An answer was appended to `out`: send it, then read on.
    Send,
    /// Derive the SCRAM keys for this salt and iteration count (see
    /// [`scram::keys_from_password`]) and pass them to
    /// [`ClientLogin::scram_keys`], which appends the answer to send.
    ScramKeys { salt: Vec<u8>, iterations: u32 },
    /// A ParameterStatus.
    Parameter { name: &'f str, value: &'f str },
    /// BackendKeyData: what a CancelRequest for this connection needs.
    BackendKey { pid: u32, key: u32 },
    /// Nothing to do: read the next message.
    Read,
    /// ReadyForQuery: logged in.
    Ready,
}

enum Sasl {
    None,
    /// SASLInitialResponse sent; waiting for server-first-message.
    Started(ClientExchange),
    /// Server-first-message received; waiting for the caller's keys.
    NeedKeys {
        exchange: ClientExchange,
        server_first: Vec<u8>,
    },
    /// Client-final-message sent; waiting for server-final-message.
    Sent(ClientExchange),
    /// The server proved it knows the secret too.
    Verified,
}

/// One login, from the first server message to ReadyForQuery.
pub struct ClientLogin {
    user: String,
    password: Option<String>,
    sasl: Sasl,
    authenticated: bool,
}

impl std::fmt::Debug for ClientLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientLogin({:?}, authenticated: {})", self.user, self.authenticated)
    }
}

impl ClientLogin {
    /// `password` answers cleartext and MD5 requests; without one only
    /// trust and SCRAM (with keys the caller has) work.
    pub fn new(user: &str, password: Option<&str>) -> Self {
        ClientLogin {
            user: user.to_owned(),
            password: password.map(str::to_owned),
            sasl: Sasl::None,
            authenticated: false,
        }
    }

    fn password(&self) -> Result<&str, LoginError> {
        self.password.as_deref().ok_or_else(|| LoginError::NoPassword {
            user: self.user.clone(),
        })
    }

    /// Takes the next server message; an answer, if any, is appended to `out`.
    pub fn feed<'f>(&mut self, frame: &'f Frame, out: &mut BytesMut) -> Result<Step<'f>, LoginError> {
        let body = frame.body();
        match frame.tag {
            backend::AUTHENTICATION if !self.authenticated => self.authentication(body, out),
            backend::PARAMETER_STATUS => {
                let (name, value) = backend::parameter_status(body)?;
                Ok(Step::Parameter { name, value })
            }
            backend::BACKEND_KEY_DATA => {
                let (pid, key) = backend::backend_key_data(body)?;
                Ok(Step::BackendKey { pid, key })
            }
            backend::NOTICE_RESPONSE | backend::NEGOTIATE_PROTOCOL_VERSION => Ok(Step::Read),
            backend::ERROR_RESPONSE => {
                let e = backend::error_fields(body)?;
                Err(LoginError::Server {
                    severity: e.severity.to_owned(),
                    code: e.code.to_owned(),
                    message: e.message.to_owned(),
                })
            }
            backend::READY_FOR_QUERY if self.authenticated => Ok(Step::Ready),
            t => Err(ProtocolError::UnexpectedTag(t as char).into()),
        }
    }

    fn authentication(&mut self, body: &[u8], out: &mut BytesMut) -> Result<Step<'static>, LoginError> {
        match backend::authentication(body)? {
            AuthRequest::Ok => {
                // Skipping the server's SCRAM proof would let a server that
                // does not know the secret pass for one that does.
                if !matches!(self.sasl, Sasl::None | Sasl::Verified) {
                    return Err(LoginError::OutOfOrder(
                        "AuthenticationOk before the SCRAM exchange finished",
                    ));
                }
                self.authenticated = true;
                Ok(Step::Read)
            }
            AuthRequest::CleartextPassword => {
                let mut p = self.password()?.as_bytes().to_vec();
                p.push(0);
                encode::password(out, &p);
                Ok(Step::Send)
            }
            AuthRequest::Md5Password { salt } => {
                let mut p = scram::md5_response(&self.user, self.password()?, salt);
                p.push(0);
                encode::password(out, &p);
                Ok(Step::Send)
            }
            AuthRequest::Sasl { mechanisms } => {
                if !matches!(self.sasl, Sasl::None) {
                    return Err(LoginError::OutOfOrder("a second SASL exchange"));
                }
                if !mechanisms.contains(&scram::MECHANISM) {
                    return Err(LoginError::NoMechanism(
                        mechanisms.iter().map(|m| (*m).to_owned()).collect(),
                    ));
                }
                let (exchange, first) = ClientExchange::start();
                encode::sasl_initial_response(out, scram::MECHANISM, &first);
                self.sasl = Sasl::Started(exchange);
                Ok(Step::Send)
            }
            AuthRequest::SaslContinue { data } => {
                let Sasl::Started(exchange) = std::mem::replace(&mut self.sasl, Sasl::None) else {
                    return Err(LoginError::OutOfOrder("SASLContinue out of turn"));
                };
                let sf = scram::parse_server_first(data)?;
                let (salt, iterations) = (sf.salt, sf.iterations);
                self.sasl = Sasl::NeedKeys {
                    exchange,
                    server_first: data.to_vec(),
                };
                Ok(Step::ScramKeys { salt, iterations })
            }
            AuthRequest::SaslFinal { data } => {
                let Sasl::Sent(exchange) = std::mem::replace(&mut self.sasl, Sasl::None) else {
                    return Err(LoginError::OutOfOrder("SASLFinal out of turn"));
                };
                exchange.finish(data)?;
                self.sasl = Sasl::Verified;
                Ok(Step::Read)
            }
            AuthRequest::Other(n) => Err(LoginError::UnsupportedRequest(n)),
        }
    }

    /// The answer to [`Step::ScramKeys`]: appends the client-final-message
    /// to `out`, to be sent.
    pub fn scram_keys(&mut self, keys: &ScramKeys, out: &mut BytesMut) -> Result<(), LoginError> {
        let Sasl::NeedKeys {
            mut exchange,
            server_first,
        } = std::mem::replace(&mut self.sasl, Sasl::None)
        else {
            return Err(LoginError::OutOfOrder("SCRAM keys given when none were asked for"));
        };
        let client_final = exchange.respond(&server_first, keys)?;
        encode::password(out, &client_final);
        self.sasl = Sasl::Sent(exchange);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode::Severity;
    use crate::scram::{keys_from_password, Secret, ServerExchange, MECHANISM};
    use crate::{decode_frame, sqlstate};

    fn frame(build: impl FnOnce(&mut BytesMut)) -> Frame {
        let mut b = BytesMut::new();
        build(&mut b);
        decode_frame(&mut b, 1 << 20).unwrap().unwrap()
    }

    /// An Authentication message with request `code` (other than the
    /// ones `encode` writes: an unsupported one).
    fn auth(code: i32) -> Frame {
        frame(|b| encode::message(b, b'R', |b| b.extend_from_slice(&code.to_be_bytes())))
    }

    fn auth_ok() -> Frame {
        frame(encode::auth_ok)
    }

    fn sasl(mechanisms: &[&str]) -> Frame {
        frame(|b| encode::auth_sasl(b, mechanisms))
    }

    fn sasl_continue(data: &[u8]) -> Frame {
        frame(|b| encode::auth_sasl_continue(b, data))
    }

    fn sasl_final(data: &[u8]) -> Frame {
        frame(|b| encode::auth_sasl_final(b, data))
    }

    fn ready() -> Frame {
        frame(|b| encode::ready_for_query(b, backend::TxStatus::Idle))
    }

    /// The body of the one frontend message in `out`.
    fn sent(out: &mut BytesMut) -> Vec<u8> {
        let f = decode_frame(out, 1 << 20).unwrap().expect("a message was written");
        assert_eq!(f.tag, b'p');
        assert!(out.is_empty(), "one message");
        f.body().to_vec()
    }

    /// The parts of a SASLInitialResponse body: mechanism and data.
    fn initial_response(body: &[u8]) -> (String, Vec<u8>) {
        let nul = body.iter().position(|&c| c == 0).unwrap();
        let mechanism = String::from_utf8(body[..nul].to_vec()).unwrap();
        let len = i32::from_be_bytes(body[nul + 1..nul + 5].try_into().unwrap()) as usize;
        (mechanism, body[nul + 5..nul + 5 + len].to_vec())
    }

    #[test]
    fn trust_then_parameters_key_and_ready() {
        let mut l = ClientLogin::new("u", None);
        let mut out = BytesMut::new();
        assert_eq!(l.feed(&auth_ok(), &mut out).unwrap(), Step::Read);
        let ps = frame(|b| encode::parameter_status(b, "TimeZone", "UTC"));
        assert_eq!(
            l.feed(&ps, &mut out).unwrap(),
            Step::Parameter {
                name: "TimeZone",
                value: "UTC"
            }
        );
        let key = frame(|b| encode::backend_key_data(b, 42, 7));
        assert_eq!(l.feed(&key, &mut out).unwrap(), Step::BackendKey { pid: 42, key: 7 });
        assert_eq!(l.feed(&ready(), &mut out).unwrap(), Step::Ready);
        assert!(out.is_empty());
    }

    #[test]
    fn scram_against_the_server_side() {
        let secret = Secret::from_password("pencil", b"0123456789abcdef", 4096);
        let mut l = ClientLogin::new("u", None);
        let mut out = BytesMut::new();
        let offer = sasl(&["SCRAM-SHA-256-PLUS", MECHANISM]);
        assert_eq!(l.feed(&offer, &mut out).unwrap(), Step::Send);
        let (mechanism, client_first) = initial_response(&sent(&mut out));
        assert_eq!(mechanism, MECHANISM);
        let server = ServerExchange::start(secret.clone(), &client_first, MECHANISM, false).unwrap();

        let server_first = sasl_continue(server.server_first());
        assert_eq!(
            l.feed(&server_first, &mut out).unwrap(),
            Step::ScramKeys {
                salt: secret.salt.to_vec(),
                iterations: 4096
            }
        );
        assert!(out.is_empty(), "nothing to send before the keys");
        l.scram_keys(&keys_from_password("pencil", &secret.salt, 4096), &mut out)
            .unwrap();
        let verified = server.finish(&sent(&mut out), None).unwrap();

        assert_eq!(
            l.feed(&sasl_final(verified.server_final()), &mut out).unwrap(),
            Step::Read
        );
        assert_eq!(l.feed(&auth_ok(), &mut out).unwrap(), Step::Read);
        assert_eq!(l.feed(&ready(), &mut out).unwrap(), Step::Ready);

        // A second SASL request in the same login is refused.
        let mut l = ClientLogin::new("u", None);
        l.feed(&sasl(&[MECHANISM]), &mut out).unwrap();
        out.clear();
        assert!(matches!(
            l.feed(&sasl(&[MECHANISM]), &mut out),
            Err(LoginError::OutOfOrder(_))
        ));
    }

    #[test]
    fn a_wrong_server_signature_or_a_skipped_one_fails() {
        let secret = Secret::from_password("pencil", b"salt", 16);
        let start = |out: &mut BytesMut| {
            let mut l = ClientLogin::new("u", None);
            l.feed(&sasl(&[MECHANISM]), out).unwrap();
            let (_, client_first) = initial_response(&sent(out));
            let server = ServerExchange::start(secret.clone(), &client_first, MECHANISM, false).unwrap();
            l.feed(&sasl_continue(server.server_first()), out).unwrap();
            l.scram_keys(&keys_from_password("pencil", b"salt", 16), out).unwrap();
            sent(out);
            l
        };
        let mut out = BytesMut::new();
        let mut l = start(&mut out);
        let forged = b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
        assert_eq!(
            l.feed(&sasl_final(forged), &mut out),
            Err(LoginError::Scram(ScramError::ServerSignature))
        );
        let mut l = start(&mut out);
        assert!(matches!(l.feed(&auth_ok(), &mut out), Err(LoginError::OutOfOrder(_))));
    }

    #[test]
    fn keys_only_when_asked() {
        let mut l = ClientLogin::new("u", Some("p"));
        let keys = keys_from_password("p", b"s", 1);
        assert!(matches!(
            l.scram_keys(&keys, &mut BytesMut::new()),
            Err(LoginError::OutOfOrder(_))
        ));
        let mut out = BytesMut::new();
        assert!(matches!(
            l.feed(&sasl_continue(b"r=x,s=c2FsdA==,i=1"), &mut out),
            Err(LoginError::OutOfOrder(_))
        ));
    }

    #[test]
    fn cleartext_and_md5_need_the_password() {
        let mut out = BytesMut::new();
        let mut l = ClientLogin::new("bob", Some("secret"));
        assert_eq!(l.feed(&frame(encode::auth_cleartext), &mut out).unwrap(), Step::Send);
        assert_eq!(sent(&mut out), b"secret\0");
        assert_eq!(
            l.feed(&frame(|b| encode::auth_md5(b, [1, 2, 3, 4])), &mut out).unwrap(),
            Step::Send
        );
        let mut md5 = scram::md5_response("bob", "secret", [1, 2, 3, 4]);
        md5.push(0);
        assert_eq!(sent(&mut out), md5);

        let mut l = ClientLogin::new("bob", None);
        assert_eq!(
            l.feed(&frame(encode::auth_cleartext), &mut out),
            Err(LoginError::NoPassword { user: "bob".into() })
        );
    }

    #[test]
    fn refusals() {
        let mut out = BytesMut::new();
        let mut l = ClientLogin::new("u", Some("p"));
        assert_eq!(
            l.feed(&sasl(&["SCRAM-SHA-1"]), &mut out),
            Err(LoginError::NoMechanism(vec!["SCRAM-SHA-1".into()]))
        );
        assert_eq!(l.feed(&auth(7), &mut out), Err(LoginError::UnsupportedRequest(7)));
        let err = frame(|b| encode::error_response(b, Severity::Fatal, sqlstate::INVALID_PASSWORD, "no"));
        assert_eq!(
            l.feed(&err, &mut out),
            Err(LoginError::Server {
                severity: "FATAL".into(),
                code: "28P01".into(),
                message: "no".into()
            })
        );
        // ReadyForQuery before AuthenticationOk, and query replies, are not a login.
        assert!(matches!(l.feed(&ready(), &mut out), Err(LoginError::Protocol(_))));
        let row = frame(|b| encode::command_complete(b, "SELECT 1"));
        assert!(matches!(l.feed(&row, &mut out), Err(LoginError::Protocol(_))));
    }
}
