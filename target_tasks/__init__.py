"""The paper's target tasks (NCC, NCS, LCS, BMS): their public datasets prepared in the
published splits, and the fine-tuning runs that produce the paper's table.

Preparation, ``scripts/prepare_target.py TASK ...`` (``prepare``): one module per dataset reads
it in its download layout: ``luna16`` (NCC), ``lidc`` (NCS), ``lits`` (LCS), ``brats`` (BMS);
``common`` holds the manifest, the output session and the work loop they share;
``bms_folds.csv`` the authors' three folds of the BraTS 2018 training patients.

Runs, ``scripts/run_target.py TASK ...`` (``run``): ``protocols`` (the published protocol of each
task and the paper's table), ``prepared`` (the prepared folder checked before a run), ``inits``
(the initialisations and their checkpoint kinds), ``report`` (table and plot).
"""
