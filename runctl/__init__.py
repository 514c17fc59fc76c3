"""Run control for people and scripts, and a multi-crate system on one command.

- `runctl.operator`: the `Operator` API (STOP -> READY -> RUN -> STOP, each step a
  generator of progress responses), built from:
  - `runctl.runstate`: the run state, progress responses, timeouts and status types;
  - `runctl.ioclink`: where an IOC serves PVA, and one IOC's PVs over it;
  - `runctl.systemlink`: a system's globals and crates, and the checks each step waits for;
  - `runctl.receivers`: starting, watching and stopping a run's receivers;
  - `runctl.rundirs`: run directories and the run numbers they take;
  - `runctl.controldir`: the state file and the lock shared by every operator process;
  - `runctl.ending`: how the end of a run is judged (its logged result) and told;
- `runctl.cli`: ``dgs-run start|stop|status|log`` on top of it;
- `runctl.system`: ``dgs-system``, a globals IOC plus one IOC per crate as one group;
- `runctl.runlog`: the append-only run log;
- `runctl.losses`: data a crate lost in a run, by reason, from its IOC's counters;
- `runctl.console`: printing that a closed or broken stdout cannot stop halfway;
- `runctl.supervise`: keeps a receiver's exit code for a later ``dgs-run stop``.
"""
