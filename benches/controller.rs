//! CreateVolume through the controller's domain (scheduler, guards, index, in-memory charges)
//! against in-memory fake agents: 200 concurrent creates must give 0 errors and 0 duplicates.
//! The baseline is the same 200 creates sent straight to the fake agents one after the other,
//! so the ratio is the controller's own overhead (the real-LVM comparison runs in the test VM).
//!
//! stdout gets one line in the project's bench format:
//!
//! ```text
//! bench: controller_create_200_concurrent = 9.1 ms (baseline fake_agent_create_200_sequential = 3.2 ms, ratio 2.84, goal 0 errors, 0 duplicates)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use cinderblock::agent_rpc::client::{FakeAgent, FakePool, NewVolume, StorageAgent};
use cinderblock::controller::{
    Access, AccessMode, Capability, CapacityRange, Controller, CreateVolume, Settings, VolumeType,
    Zones,
};
use cinderblock::scheduler::SchedulerConfig;
use cinderblock::types::Bytes;

const VOLUMES: usize = 200;

fn agents() -> Vec<Arc<FakeAgent>> {
    ["a", "b", "c"]
        .iter()
        .map(|n| FakeAgent::new(n, vec![FakePool::new("p", "z1", Bytes::gib(1000))]))
        .collect()
}

fn request(i: usize) -> CreateVolume {
    CreateVolume {
        name: format!("pvc-{i}"),
        capacity: CapacityRange {
            required: Some(Bytes::gib(1)),
            limit: None,
        },
        capabilities: vec![Capability {
            access: Access::Mount { fs: "ext4".into() },
            mode: AccessMode::SingleNodeWriter,
        }],
        parameters: BTreeMap::new(),
        mutable_parameters: BTreeMap::new(),
        source: None,
        zones: Zones::default(),
    }
}

async fn run() -> Result<String, String> {
    // Baseline: straight to the agents, sequentially.
    let direct = agents();
    let start = Instant::now();
    for i in 0..VOLUMES {
        let agent = &direct[i % direct.len()];
        let id = cinderblock::controller::volume_id_for(&format!("pvc-{i}"));
        agent
            .create_volume(NewVolume {
                id,
                pool: "p".into(),
                size: Bytes::gib(1),
                volume_type: "default".into(),
                metadata: BTreeMap::new(),
                source: None,
            })
            .await
            .map_err(|e| e.to_string())?;
    }
    let baseline = start.elapsed();

    let fakes = agents();
    let seams: Vec<Arc<dyn StorageAgent>> = fakes
        .iter()
        .map(|a| a.clone() as Arc<dyn StorageAgent>)
        .collect();
    let settings = Settings {
        scheduler: SchedulerConfig::default(),
        volume_types: BTreeMap::from([(
            "default".to_string(),
            VolumeType {
                name: "default".into(),
                description: String::new(),
                extra_specs: BTreeMap::new(),
            },
        )]),
        default_volume_type: "default".into(),
    };
    let controller = Arc::new(Controller::new(settings, seams).map_err(|e| e.to_string())?);
    let failures = controller.sync_all().await;
    if !failures.is_empty() {
        return Err(format!("sync: {failures:?}"));
    }
    let start = Instant::now();
    let tasks: Vec<_> = (0..VOLUMES)
        .map(|i| {
            let c = controller.clone();
            tokio::spawn(async move { c.create_volume(request(i)).await })
        })
        .collect();
    let mut errors = 0;
    for t in tasks {
        match t.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                eprintln!("create failed: {e}");
                errors += 1;
            }
            Err(e) => {
                eprintln!("task failed: {e}");
                errors += 1;
            }
        }
    }
    let elapsed = start.elapsed();
    let ids: Vec<String> = fakes.iter().flat_map(|a| a.volume_ids()).collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    let duplicates = ids.len() - unique.len();
    let per_agent: Vec<usize> = fakes.iter().map(|a| a.volume_ids().len()).collect();
    eprintln!("volumes per agent: {per_agent:?}; errors {errors}; duplicates {duplicates}");
    if errors > 0 || duplicates > 0 || ids.len() != VOLUMES {
        return Err(format!(
            "{errors} errors, {duplicates} duplicates, {} volumes",
            ids.len()
        ));
    }
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    Ok(format!(
        "bench: controller_create_{VOLUMES}_concurrent = {:.1} ms (baseline \
         fake_agent_create_{VOLUMES}_sequential = {:.1} ms, ratio {:.2}, goal 0 errors, 0 duplicates)",
        ms(elapsed),
        ms(baseline),
        ms(elapsed) / ms(baseline).max(1e-9)
    ))
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("controller bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}
