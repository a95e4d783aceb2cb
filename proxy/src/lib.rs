//! pgferry proxy.
