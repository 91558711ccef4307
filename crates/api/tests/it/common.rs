//! The API tests' helpers are shared with the other crates (observer-testkit);
//! re-exported here so every test module imports them from one place.

pub use observer_testkit::api::*;
pub use observer_testkit::seed::*;
