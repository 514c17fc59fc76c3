"""The crate read-out IOC: configuration, buffer pool, stages, records, run control."""
