//! The integration tests of the orchestrator, one test binary with a module per area: the
//! port conformance suite and the backends it runs on, the engine, the ingress, the binaries
//! as processes, the crash test, and (feature `aws`, on by default) the AWS adapters and
//! reconcilers on `moto_server`.

mod binary;
mod conformance;
mod crash;
mod engine;
mod ingress;
mod sqlite_backend;

#[cfg(feature = "aws")]
mod aws_activities;
#[cfg(feature = "aws")]
mod aws_backend;
#[cfg(feature = "aws")]
mod aws_faults;
#[cfg(feature = "aws")]
mod aws_ownership;
#[cfg(feature = "aws")]
mod dynamo;
#[cfg(feature = "aws")]
mod sqs;
