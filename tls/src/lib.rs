//! TLS for pgferry: rustls configurations for the listeners (termination)
//! and for server connections. Until this crate gains its rustls builders,
//! both listeners answer SSLRequest and GSSENCRequest with 'N'.

#![forbid(unsafe_code)]
