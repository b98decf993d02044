//! TODO: emulated
