"""The fidelity study (its command: `benchmarks/fidelity_study.py`): what is run (`methods`),
running it (`tasks`, and the calibrated schedules some rows use: `calibrations`), measuring and
judging it (`analysis`) and writing it down (`report`)."""

from . import analysis, calibrations, methods, report, tasks
from .methods import Method, parse_method
from .tasks import Study, execute, load_task, model_digest, task_path

__all__ = ["Method", "Study", "analysis", "calibrations", "execute", "load_task", "methods", "model_digest",
           "parse_method", "report", "task_path", "tasks"]
