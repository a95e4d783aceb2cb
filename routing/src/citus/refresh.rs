//! Keeps the Citus snapshot current: one control connection to the
//! coordinator (the topology's primary), a full load at start and after
//! every topology change, and a cheap fingerprint check every
//! `refresh_interval` (Citus sends no notification of its own).

use super::{metadata, Citus};
use crate::confirm::{connect_as, CheckLogin};
use crate::Router;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

/// Every step has a client-side timeout: a stuck coordinator must not stop
/// the refreshes from noticing a new one.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs forever. `changed` is called after each new snapshot (the proxy
/// retires pools of nodes that left).
pub async fn run(citus: Arc<Citus>, router: Router, login: CheckLogin, interval: Duration, changed: impl Fn() + Send) {
    let mut topology = router.subscribe();
    let mut generation = 0u64;
    let mut topology_open = true;
    loop {
        let Some(primary) = router.topology().primary.clone() else {
            // No coordinator (failover): wait for one.
            retry_pause(&mut topology).await;
            continue;
        };
        let addr = primary.addr.clone();
        let client = match tokio::time::timeout(STEP_TIMEOUT, connect_as(&addr, &login, "pgferry citus metadata")).await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                fail(&citus, format!("connect to the coordinator {addr}: {e}"));
                retry_pause(&mut topology).await;
                continue;
            }
            Err(_) => {
                fail(&citus, format!("connect to the coordinator {addr}: timed out"));
                retry_pause(&mut topology).await;
                continue;
            }
        };
        let mut client = client;
        let mut fingerprint = String::new();
        let mut full = true;
        let mut seen_generation = router.generation();
        topology.borrow_and_update();
        loop {
            let step = async {
                if full {
                    generation += 1;
                    let snap = metadata::load(&mut client, generation).await?;
                    Ok::<_, metadata::LoadError>(Some(snap))
                } else {
                    let fp = metadata::fingerprint(&client).await?;
                    if fp == fingerprint {
                        Ok(None)
                    } else {
                        generation += 1;
                        Ok(Some(metadata::load(&mut client, generation).await?))
                    }
                }
            };
            match tokio::time::timeout(STEP_TIMEOUT, step).await {
                // A reload after a topology change that found the metadata
                // unchanged: nothing to install.
                Ok(Ok(Some(snap))) if snap.fingerprint == fingerprint => {
                    citus.counters.checks.fetch_add(1, Relaxed);
                }
                Ok(Ok(Some(snap))) => {
                    fingerprint = snap.fingerprint.clone();
                    tracing::info!(
                        coordinator = %addr,
                        tables = snap.tables.len(),
                        groups = snap.group_primaries().len(),
                        generation,
                        "citus: metadata loaded"
                    );
                    citus.install(snap);
                    citus.counters.refreshes.fetch_add(1, Relaxed);
                    *citus.last_error.lock().unwrap() = None;
                    changed();
                    // Our own change (sessions told to re-route) is not a
                    // topology change to reload for.
                    seen_generation = router.generation();
                }
                Ok(Ok(None)) => {
                    citus.counters.checks.fetch_add(1, Relaxed);
                }
                Ok(Err(metadata::LoadError::NoCitus)) => {
                    fail(
                        &citus,
                        format!("Citus is not installed in database {:?} on {addr}", login.dbname),
                    );
                    tokio::time::sleep(interval.max(Duration::from_secs(10))).await;
                    break;
                }
                Ok(Err(e)) => {
                    fail(
                        &citus,
                        format!("reading metadata on {addr}: {}", crate::confirm::error_chain(&e)),
                    );
                    retry_pause(&mut topology).await;
                    break;
                }
                Err(_) => {
                    fail(&citus, format!("reading metadata on {addr}: timed out"));
                    retry_pause(&mut topology).await;
                    break;
                }
            }
            full = false;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = citus.refresh_now.notified() => {}
                // A static topology's channel is closed: never changes.
                r = topology.changed(), if topology_open => {
                    if r.is_err() {
                        topology_open = false;
                        continue;
                    }
                    // A new coordinator: reconnect there. A routing change
                    // (not a lag or view update, which come often): reload,
                    // a worker failover changes pg_dist_node.
                    if router.topology().primary.as_ref().map(|p| p.addr.clone()) != Some(addr.clone()) {
                        break;
                    }
                    let g = router.generation();
                    if g != seen_generation {
                        seen_generation = g;
                        full = true;
                    }
                }
            }
        }
    }
}

/// Up to a second before trying again, less if the topology changes (a
/// static topology never does: its channel is closed, so never busy-loop
/// on it).
async fn retry_pause(topology: &mut tokio::sync::watch::Receiver<Arc<crate::Topology>>) {
    let pause = tokio::time::sleep(Duration::from_secs(1));
    tokio::pin!(pause);
    tokio::select! {
        _ = &mut pause => {}
        r = topology.changed() => if r.is_err() { pause.await },
    }
}

fn fail(citus: &Citus, e: String) {
    citus.counters.refresh_errors.fetch_add(1, Relaxed);
    let mut last = citus.last_error.lock().unwrap();
    if last.as_deref() != Some(e.as_str()) {
        tracing::warn!(error = %e, "citus: metadata refresh failed; routing keeps the last snapshot");
    }
    *last = Some(e);
}
