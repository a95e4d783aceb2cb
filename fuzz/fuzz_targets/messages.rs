//! Typed views, the SQL scanner and the SCRAM server never panic on any body.
#![no_main]
use libfuzzer_sys::fuzz_target;
use pgferry_protocol::{backend, frontend, scram, sql};

fuzz_target!(|data: &[u8]| {
    let _ = frontend::parse(data);
    let _ = frontend::bind(data);
    let _ = frontend::target(data, "Describe");
    let _ = frontend::query(data);
    let _ = backend::error_fields(data);
    let _ = backend::authentication(data);
    let _ = backend::parameter_status(data);
    let _ = sql::scan(data);
    let secret = scram::Secret::from_password("pw", b"salt", 1);
    if let Ok(ex) = scram::ServerExchange::start(secret, data, scram::MECHANISM, false) {
        let _ = ex.finish(data, None);
    }
});
