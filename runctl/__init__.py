"""Run control for people and scripts, and a multi-crate system on one command.

- `runctl.operator`: the `Operator` API (STOP -> READY -> RUN -> STOP, each step a
  generator of progress responses);
- `runctl.cli`: ``dgs-run start|stop|status|log`` on top of it;
- `runctl.system`: ``dgs-system``, a globals IOC plus one IOC per crate as one group;
- `runctl.runlog`: the append-only run log;
- `runctl.losses`: data a crate lost in a run, by reason, from its IOC's counters;
- `runctl.console`: printing that a closed or broken stdout cannot stop halfway;
- `runctl.supervise`: keeps a receiver's exit code for a later ``dgs-run stop``.
"""
