//! TODO: device_config
