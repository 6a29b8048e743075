"""The report command's contract on bad input and its column names (no training needed)."""

from __future__ import annotations

import pytest

from lora_exp import metrics as M
from lora_exp import report as report_cmd
from lora_exp.reporting import report


@pytest.mark.parametrize(
    "args,message",
    [
        (["{tmp}/missing"], "no such directory"),
        (["{tmp}"], "no run directories"),
        (["{tmp}", "--metric", "val/bogus"], "--metric val/bogus"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        report_cmd.main([a.format(tmp=tmp_path) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lora_exp.report: error:") and message in err
    assert not (tmp_path / "report").exists()  # nothing half-written


def test_report_columns_name_real_metric_keys():
    assert set(report.TABLE_METRICS) <= set(M.REPORT_METRICS)
    assert set(M.GOALS) <= set(M.REPORT_METRICS)  # every metric with a direction can be reported and bolded
    assert {M.VAL_LOSS, M.best(M.VAL_LOSS), M.base(M.VAL_LOSS), M.TRAINABLE_PARAMS} <= set(M.REPORT_METRICS)
