"""The transfer experiments: the transfer study (``study``: pretraining methods against scratch
on phantom target tasks, label fractions, paired seeds) and the transfer benchmark
(``benchmark``: scratch against one checkpoint), sharing their settings (``config``), data
(``data``), reports (``report``) and, with ``target_tasks``, the cells keyed by settings and
the paired statistics of ``finetune``."""
