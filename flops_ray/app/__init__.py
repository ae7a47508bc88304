"""What users launch: runs, the ``flops-ray`` command, job configs, hooks, locks and plots."""
