"""The paper's target tasks: their public datasets prepared in the published splits.

``target_tasks.prepare`` is the command (``scripts/prepare_target.py TASK ...``); one module
per dataset reads it in its download layout: ``luna16`` (NCC), ``lidc`` (NCS), ``lits`` (LCS),
``brats`` (BMS); ``common`` holds the manifest, the output session and the work loop they
share. ``bms_folds.csv``: the authors' three folds of the BraTS 2018 training patients.
"""
