"""The steps of the training recipe that ``kron/train.py`` calls, top to bottom.

- :mod:`.settings` -- the typed values the steps read, made once from the config.
- :mod:`.steps` -- set up (process group, device, process-wide state, run folder, its record
  and log), model (surgery, layer plan, placement), data, measurement, ``results.json``.
- :mod:`.fit` -- optimizer and schedule, the epochs, evaluation, the W&B log.
- :mod:`.checkpoint` -- atomic checkpoints, resume (other world sizes included), which
  checkpoints belong to a run, run markers.

See docs/design.md, D6 and D8.
"""
