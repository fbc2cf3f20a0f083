//! The process around the gateway: how it is assembled and run, what is
//! picked up on reload, `/metrics`, the admin and control listeners, the demo
//! and the fuzz entry points.

pub mod admin;
pub mod app;
pub mod demo;
pub mod exporter;
#[doc(hidden)]
pub mod fuzzing;
pub mod reload;
