"""Run directories: the layout and readers (``rundir.RunDir``, ``rundir.RunRecord``), provenance
(``run.json``: git, packages, hardware, hashes), ownership (``lock``, ``guard``: a busy or finished
run directory is never written), output folders of other commands (``outputs.safe_output_dir``),
secrets (``secrets``: the one policy, and redaction of what Hydra wrote), the kill ``watcher``, and
re-running a finished run (``reproduce``).
"""
