"""Training (§3.1): `loop.fit` (the epoch loop with hooks and exact resume), `schedule.PlateauSchedule` (lr ÷10 on
plateau, three times, then stop) and `precision` (bf16 autocast / channels-last policy per device). Checkpoints
are model files: `vgg.models.checkpoint`."""
