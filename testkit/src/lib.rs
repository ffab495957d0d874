//! What the integration tests of several crates share: a `moto_server` of each test's own
//! ([`moto`]) and what runs its instances' user data ([`instances`]), an engine in the test's process ([`live`]), small fixtures ([`fixtures`]), and
//! the binaries of the workspace ([`binaries`]). Only tests depend on it.

pub mod binaries;
pub mod fixtures;
pub mod instances;
pub mod live;
pub mod moto;
