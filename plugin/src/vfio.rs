//! TODO: vfio
