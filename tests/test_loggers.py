"""equidiff/loggers.py: the CSV history is appended to and cut back on resume; wandb continues the folder's run."""

import csv

from equidiff.loggers import CSVLogger, previous_wandb_run_id, wandb_logger


def _rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def test_csv_logger_appends_and_cuts_the_history_at_the_first_new_row(tmp_path):
    first = CSVLogger(tmp_path, name="csv", version="", flush_logs_every_n_steps=1)
    for step in range(5):
        first.log_metrics({"loss": float(step)}, step=step)
    first.log_metrics({"val": 9.0}, step=4)
    path = tmp_path / "csv" / "metrics.csv"
    assert len(_rows(path)) == 6  # every row is on disk at once

    second = CSVLogger(tmp_path, name="csv", version="", flush_logs_every_n_steps=1)  # a later run: appends
    second.log_metrics({"acc": 0.5}, step=0)
    assert [r["step"] for r in _rows(path)] == ["0", "1", "2", "3", "4", "4", "0"]

    resumed = CSVLogger(tmp_path, name="csv", version="", flush_logs_every_n_steps=1)
    resumed.cut_history()  # what FitResume does when a fit resumes from a checkpoint at step 3
    resumed.log_metrics({"loss": 30.0}, step=3)
    assert _rows(path) == [{"step": "0", "loss": "0.0"}, {"step": "1", "loss": "1.0"}, {"step": "2", "loss": "2.0"},
                           {"step": "0", "acc": "0.5"}, {"step": "3", "loss": "30.0"}]


def test_wandb_logger_continues_the_folders_latest_run(tmp_path):
    assert previous_wandb_run_id(str(tmp_path)) is None
    assert wandb_logger(str(tmp_path), offline=True)._wandb_init.get("id") is None
    run = tmp_path / "wandb" / "offline-run-20250101_120000-ab12cd34"
    run.mkdir(parents=True)
    (tmp_path / "wandb" / "latest-run").symlink_to(run.name)
    assert previous_wandb_run_id(str(tmp_path)) == "ab12cd34"
    init = wandb_logger(str(tmp_path), offline=True)._wandb_init
    assert init["id"] == "ab12cd34" and init["resume"] == "allow"


def test_csv_history_survives_a_row_cut_short_and_a_new_metric(tmp_path):
    path = tmp_path / "csv" / "metrics.csv"
    first = CSVLogger(tmp_path, name="csv", version="", flush_logs_every_n_steps=1)
    first.log_metrics({"loss": 1.0}, step=0)
    first.log_metrics({"loss": 2.0}, step=1)
    with path.open("a") as f:
        f.write("3.0,")  # a kill in the middle of writing the row of step 2
    resumed = CSVLogger(tmp_path, name="csv", version="", flush_logs_every_n_steps=1)
    resumed.cut_history()
    resumed.log_metrics({"loss": 3.0}, step=2)
    resumed.log_metrics({"acc": 0.5}, step=3)  # a new column: the file is rewritten with the wider header
    assert _rows(path) == [{"step": "0", "loss": "1.0"}, {"step": "1", "loss": "2.0"}, {"step": "2", "loss": "3.0"},
                           {"step": "3", "acc": "0.5"}]
    assert path.read_text().splitlines()[0] == "acc,loss,step"
