"""Event building: time-ordered merge of GEB run files and coincidence events (issue 16).

- `builder.hits`: digitizer records of GEB files as hit rows (board, channel, timestamp, energy…);
- `builder.events`: hits grouped into coincidence events within a time window;
- `builder.eventfile`: events written to ROOT (uproot) or HDF5 (h5py) files with run metadata,
  energies in keV through `builder.calibration`;
- `builder.merge` (+ `builder.gebscan`, files read in blocks) and `builder.cli`: ``dgs-merge``,
  the offline merge of run directories.
"""
