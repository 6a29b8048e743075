"""The report's W&B side: a summary run holding the comparison tables, and the online W&B Report.

- The **summary run** (``job_type="report"``) joins the sweep's W&B group and logs the results and
  comparison tables as ``wandb.Table``s, so people who live in W&B see the significance marks
  there. Logged in, it goes online; otherwise (or with ``--offline``) it is an offline run under
  the report folder (``<out>/wandb/offline-run-*``), uploadable later with ``wandb sync``.
- Logged in and with runs that logged online, the report also lists W&B runs of the group missing
  on this machine and creates a W&B Report (``wandb-workspaces``). Neither is needed offline, and
  no W&B trouble fails the report: it becomes a note in it.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from lora_exp import metrics as M
from lora_exp.reporting.collect import RunResult

log = logging.getLogger(__name__)

SUMMARY_JOB_TYPE = "report"
TABLE_KEYS = ("results", "comparison")  # the summary run's tables, by the key they are logged under


def wandb_groups(runs: list[RunResult], online_only: bool = True) -> list[tuple[str, str]]:
    """``(project, group)`` of the runs that logged to W&B (online ones only, unless told otherwise)."""
    seen = {}
    for r in runs:
        mode_ok = not online_only or r.metrics.get(M.WANDB_MODE) == "online"
        if mode_ok and r.metrics.get(M.WANDB_GROUP):
            seen[(r.metrics.get(M.WANDB_PROJECT), r.metrics[M.WANDB_GROUP])] = None
    return list(seen)


def _plain(frame):
    """A frame W&B can type: NaN and inf become empty cells, everything else stays as is."""
    return frame.astype(object).map(lambda v: None if isinstance(v, float) and not math.isfinite(v) else v)


def log_summary_run(runs: list[RunResult], tables: dict[str, Any], out: Path, online: bool) -> list[str]:
    """One ``job_type="report"`` run per W&B group of the sweep, logging ``tables`` (name -> DataFrame).

    Returns notes for the report (where the run went, or why it was skipped); never raises.
    """
    groups = wandb_groups(runs, online_only=False)
    if not groups:
        return []
    if os.environ.get("WANDB_MODE") == "disabled":
        return ["W&B summary run: skipped (WANDB_MODE=disabled)"]
    notes = []
    try:
        import wandb

        from lora_exp.training.loggers import init_run, wandb_logged_in

        mode = "online" if online and wandb_logged_in() else "offline"
        for project, group in groups:
            run = init_run(
                mode, 30, project=project, group=group, job_type=SUMMARY_JOB_TYPE, name=f"report-{group}",
                dir=str(out), config={"sweep_group": group, "runs": len(runs)},
            )  # fmt: skip
            try:
                run.log({k: wandb.Table(dataframe=_plain(v), allow_mixed_types=True) for k, v in tables.items()})
                where = run.url if not run.offline else f"wandb sync {run.dir.rsplit('/files', 1)[0]}"
                notes.append(f"W&B summary run of group {group}: {where}")
            finally:
                run.finish()
    except Exception as e:  # W&B is a convenience here: the files on disk are the report
        log.warning("W&B summary run failed: %s: %s", type(e).__name__, e)
        notes.append(f"W&B summary run: skipped ({type(e).__name__}: {e})")
    return notes


def wandb_online_extras(runs: list[RunResult], entity: str | None, metric: str) -> list[str]:
    """W&B runs of the sweep's groups missing locally, and a W&B Report per group; notes for the report.

    Only when logged in and the runs were logged online; any failure is a note, never an error.
    """
    from lora_exp.training.loggers import wandb_logged_in

    groups = wandb_groups(runs)
    if not groups or not wandb_logged_in():
        return []
    notes = []
    local = {r.metrics.get(M.WANDB_RUN_ID) for r in runs}
    try:
        import wandb

        api = wandb.Api()
        entity = entity or api.default_entity
        for project, group in groups:
            remote = [r for r in api.runs(f"{entity}/{project}", filters={"group": group}) if r.job_type != "report"]
            missing = [f"{r.id} ({r.state})" for r in remote if r.id not in local]
            notes.append(
                f"W&B group {entity}/{project}/{group}: {len(remote)} runs"
                + (f"; not on this machine: {', '.join(missing)}" if missing else "")
            )
            notes.append(create_wandb_report(entity, project, group, metric))
    except Exception as e:
        notes.append(f"W&B: skipped ({type(e).__name__}: {e})")
    return notes


def report_panels(wr, metric: str) -> list:
    """The panels of the W&B Report: swept values are CONFIG keys, results SUMMARY keys.

    Training logs the config nested (``{"lora": {"r": 8}}``); ``wr.Config("lora.r")`` addresses it
    as ``config:lora.value.r``, where a bare ``"lora.r"`` would be read as a summary metric.
    """
    rank, alpha = wr.Config("lora.r"), wr.Config("lora.alpha")
    return [
        wr.ScatterPlot(x=rank, y=wr.SummaryMetric(metric), log_x=True),
        wr.LinePlot(x="Step", y=[M.TRAIN_LOSS]),
        wr.LinePlot(x="Step", y=[M.VAL_LOSS]),
        wr.ParallelCoordinatesPlot(
            columns=[
                wr.ParallelCoordinatesPlotColumn(metric=rank),
                wr.ParallelCoordinatesPlotColumn(metric=alpha),
                wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(metric)),
            ]
        ),
    ]


def create_wandb_report(entity: str, project: str, group: str, metric: str) -> str:
    """A W&B Report of one sweep group: metric vs rank, loss curves, parallel coordinates."""
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError:
        return "W&B Report: skipped (pip install wandb-workspaces, or lora-exp[wandb-report])"
    runset = wr.Runset(entity=entity, project=project, name=group, filters=f"Metric('Group') == '{group}'")
    report = wr.Report(
        entity=entity,
        project=project,
        title=f"LoRA sweep {group}",
        description="Generated by python -m lora_exp.report",
        blocks=[wr.H1(f"Sweep {group}"), wr.PanelGrid(runsets=[runset], panels=report_panels(wr, metric))],
    )
    report.save()
    return f"W&B Report: {report.url}"
