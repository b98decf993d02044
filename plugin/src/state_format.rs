//! TODO: state_format
