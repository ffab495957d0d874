//! One transition on a restored record, JSON decode and encode included: the engine's pure
//! work per event. Run with `cargo bench -p workflows --bench transition`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use workflows::testing::{Driver, InFlight, output_for};
use workflows::{
    Environment, Event, Input, RepoKind, StepKind, StepOutcome, StepReport, Timestamp,
    WorkflowRecord, decode, encode,
};

/// A record of a workflow that is live and preparing its second run (so it holds resources,
/// a deployed release and a run with several steps), and the report that completes a step.
fn fixture() -> (Vec<u8>, Event) {
    let mut d = Driver::new(Environment::Production);
    d.push(RepoKind::Infra, 1);
    d.push(RepoKind::App, 1);
    d.run_to_quiescence();
    d.push(RepoKind::Infra, 2);
    let Some(InFlight::Step(task)) = d.take(StepKind::SourceInfra) else {
        panic!("the infra source step is in flight");
    };
    let report = Event::Step(StepReport {
        run: task.run,
        step: task.step,
        token: task.token,
        outcome: StepOutcome::Done {
            output: output_for(&task),
        },
    });
    (encode(&d.record), report)
}

fn transition(c: &mut Criterion) {
    let (bytes, event) = fixture();
    println!("record size: {} bytes of JSON", bytes.len());
    let input = Input {
        now: Timestamp::from_unix_millis(1_900_000_000_000),
        settings: Default::default(),
    };
    c.bench_function("decode + apply + encode", |b| {
        b.iter(|| {
            let mut record: WorkflowRecord = decode(black_box(&bytes)).expect("decodes");
            let applied = record.apply(black_box(&event), input);
            let out = encode(&record);
            black_box((applied, out))
        })
    });
    c.bench_function("apply only", |b| {
        let record: WorkflowRecord = decode(&bytes).expect("decodes");
        b.iter_batched(
            || record.clone(),
            |mut record| black_box(record.apply(black_box(&event), input)),
            criterion::BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, transition);
criterion_main!(benches);
