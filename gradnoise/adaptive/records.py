"""The controller's per-step records on disk: a CSV or JSON-lines file and
TensorBoard scalars, written by rank 0 (the records themselves stay in
`AdaptiveBatch.history` on every rank)."""
from __future__ import annotations

import csv
import json
import os
import warnings

RECORD_FIELDS = ("step", "samples", "epoch", "loss", "b_simple", "b_simple_stderr",
                 "batch_size", "micro_batch", "accumulation", "lr", "lr_factor", "seconds",
                 "next_batch_size", "skipped")


def check_log_path(log_path):
    """The log path as a string (None stays None); it must end in .csv or .jsonl."""
    if log_path is None:
        return None
    log_path = os.fspath(log_path)
    if not log_path.endswith((".csv", ".jsonl")):
        raise ValueError(f"AdaptiveBatch: `log_path` must end in .csv or .jsonl, got "
                         f"{log_path!r}")
    return log_path


class RecordLog:
    """Appends records to `log_path` and to TensorBoard under `tensorboard_dir`
    (each optional); a rank other than 0 writes nothing."""

    def __init__(self, log_path, tensorboard_dir, rank: int):
        self.log_path, self.rank = check_log_path(log_path), rank
        self._file = None
        self._csv = None
        self.tensorboard = (_open_tensorboard(tensorboard_dir)
                            if tensorboard_dir and rank == 0 else None)

    def write(self, record: dict) -> None:
        if self.rank != 0:
            return
        if self.log_path is not None:
            if self._file is None:
                new = not os.path.exists(self.log_path) or os.path.getsize(self.log_path) == 0
                self._file = open(self.log_path, "a", newline="")
                if self.log_path.endswith(".csv"):
                    self._csv = csv.DictWriter(self._file, fieldnames=RECORD_FIELDS,
                                               extrasaction="ignore")
                    if new:
                        self._csv.writeheader()
            if self._csv is not None:
                self._csv.writerow({k: ("" if v is None else v) for k, v in record.items()})
            else:
                self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tensorboard.add_scalar(f"gradnoise/{key}", float(value), record["step"])
            self.tensorboard.flush()

    def truncate(self, records: int) -> None:
        """Keep the first `records` records of log_path (drops those a crashed
        run wrote after its last checkpoint)."""
        if self.rank != 0 or self.log_path is None or not os.path.exists(self.log_path):
            return
        self._close_file()
        with open(self.log_path, newline="") as f:
            lines = f.readlines()
        keep = records + (1 if self.log_path.endswith(".csv") and lines else 0)
        if len(lines) > keep:
            with open(self.log_path, "w", newline="") as f:
                f.writelines(lines[:keep])

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file, self._csv = None, None

    def close(self) -> None:
        self._close_file()
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def _open_tensorboard(directory):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        warnings.warn(f"AdaptiveBatch: tensorboard_dir={os.fspath(directory)!r} was given but "
                      f"TensorBoard is not installed ({e}); nothing is written there. "
                      "`pip install tensorboard` to enable it; records still go to "
                      "controller.history and log_path.", RuntimeWarning, stacklevel=4)
        return None
    return SummaryWriter(log_dir=os.fspath(directory))
