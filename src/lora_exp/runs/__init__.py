"""Run directories: their layout and records (``rundir``), re-running a finished run (``reproduce``)."""
