//! TODO: xe_stream
