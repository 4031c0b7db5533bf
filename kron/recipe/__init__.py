"""The steps of the training recipe that ``kron/train.py`` calls, one concept per module.

- :mod:`.setup` -- the job: process group, device, seeds and flags (restored after), run folder.
- :mod:`.data` -- datasets and the two loaders.
- :mod:`.model` -- the baseline net, layer surgery, the optional layer plan, DDP wrapping.
- :mod:`.optim` -- parameter groups (what gets weight decay) and the learning-rate schedule.
- :mod:`.checkpoint` -- atomic checkpoints, resume (other world sizes included), run markers.
- :mod:`.loop` -- one training epoch, evaluation, and ``fit`` over the epochs.
- :mod:`.results` -- measurement against the dense twin and ``results.json``.
- :mod:`.logger` -- the W&B run (its summary carries the same fields as ``results.json``).

See docs/design.md, D6 and D8.
"""
