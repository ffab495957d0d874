//! Time for the runtime: the same clocks as the activities use (the system clock in
//! production, a manual clock in tests), so that visibility timeouts, delays and deadlines can
//! be tested without sleeping.

use std::sync::Arc;

pub use activities::clock::{Clock, ManualClock, SystemClock};

/// A shared clock.
pub type SharedClock = Arc<dyn Clock>;
