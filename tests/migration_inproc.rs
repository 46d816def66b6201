//! Precopy between two guests in one process over real sockets (the quick loop for the
//! engine; the cross-process tests are in `migration.rs`).

mod common;

use std::sync::Arc;

use common::{config, guest_lock, wait_all};
use ferry::migration_core::{incoming, ram_digest, GuestRam, MigrationSource, ParametersUpdate};
use ferry::stats::MigrationStatus;
use ferry::GuestVm;
use minivm::{DirtyTracking, Workload};

fn migrate_once(workload: Workload, uri: &str, channels: u8) {
    let _g = guest_lock();
    let cfg = config(1 << 30, 2, workload);
    let src = Arc::new(GuestVm::boot(cfg.clone(), DirtyTracking::default()).unwrap());
    wait_all(&src.vm(), 2);
    let dst = Arc::new(GuestVm::incoming(cfg, DirtyTracking::default()).unwrap());
    let inc = incoming(dst.clone(), uri, true).unwrap();
    let target = inc.uri().to_string();
    let source = MigrationSource::new(src.clone());
    source
        .set_parameters(&ParametersUpdate {
            max_bandwidth: Some(0),
            multifd_channels: Some(channels),
            ..Default::default()
        })
        .unwrap();
    if channels > 1 {
        source
            .set_capability(ferry::migration_core::Capability::Multifd, true)
            .unwrap();
    }
    source.migrate(&target).unwrap();
    let status = source.wait();
    let info = source.query();
    let report = inc.wait();
    assert_eq!(
        status,
        MigrationStatus::Completed,
        "source: {info:?}, destination: {report:?}"
    );
    let report = report.unwrap();
    let src_digest = ram_digest(&GuestRam::new(src.clone()));
    assert_eq!(
        report.ram_digest,
        Some(src_digest),
        "destination RAM equals the source's at switch-over"
    );
    wait_all(&dst.vm(), 3);
    eprintln!("{}", serde_json::to_string(&info).unwrap());
}

#[test]
fn tcp_working_set_4096() {
    migrate_once(Workload::WorkingSet { pages: 4096 }, "tcp:127.0.0.1:0", 1);
}
