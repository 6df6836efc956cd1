"""The paper's target tasks (NCC, NCS, LCS, BMS): preparation of the public datasets and fine-tuning runs."""
