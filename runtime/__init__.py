"""The project's runtime, shared by every stage and script.

* ``errors``: the error hierarchy (bad user input, unreadable checkpoints, diverged runs);
* ``cli``: the argparse parser, validating flag types and shared flags of every CLI, and the
  one-line error report of every ``main``;
* ``files``: atomic writes, output folders owned by one run (lock, kept results), run configs;
* ``devices``: device, precision and seeding;
* ``distributed``: thin ``torch.distributed`` helpers (one process without ``torchrun``);
* ``intensity``: the CT intensity rule (HU window, "already in [0, 1]", finiteness);
* ``training``: the loop runtime of every training CLI (resume, early stopping shared across
  ranks, checkpoints of an epoch, one logger, ``train_one_epoch``);
* ``images``: labelled grids of middle slices (montages, TensorBoard pictures) and PNG files,
  drawn and written with Pillow;
* ``parallel``: per-scan work in worker processes, results in input order;
* ``provenance``: content identity of files and settings changes (re-runs, ``--resume``).
* ``pipeline_summary``: what a quickstart run established, read from its stages' records.

Nothing here imports a stage: the stages import the runtime.
"""
