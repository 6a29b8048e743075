"""Reports over sweeps: tables, statistics, plots."""
