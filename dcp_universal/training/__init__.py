"""Checkpoints of a training run: :class:`~.manager.CheckpointManager`, the step's items
(:mod:`.items`), writing and committing a step (:mod:`.commit`), the frozen base of LoRA
runs (:mod:`.base_store`), optimizer and training state (:mod:`.optim_io`,
:mod:`.training_state`), retention (:mod:`.retention`) and asynchronous snapshots
(:mod:`.snapshot`)."""
