//! The provider's rules, as pure code: the signature recipe, the response
//! envelope (`requestId`, `code`, `msg`), the headers the gateway owns, and a
//! stand-in provider that checks every signature (for the demo and tests).

pub mod envelope;
pub mod headers;
pub mod sandbox;
pub mod signer;
