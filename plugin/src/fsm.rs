//! TODO: fsm
