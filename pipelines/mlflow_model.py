"""The MLflow model of a `vgg train` checkpoint, as MLflow's "models from code": this file is the model's code, the
checkpoint and the training set's colour statistics are its artifacts, and nothing is pickled (the checkpoint loads
with `weights_only`). `mlflow.pyfunc.load_model("models:/vgg-D@champion")` needs this project installed (`vgg`).

Input: RGB crops, float32 [N, 3, crop, crop] on the 0–255 scale (the model subtracts the training set's mean RGB
itself, §2.1); output: softmax posteriors, float32 [N, classes], classes in sorted-WNID order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

CHECKPOINT, STATS = "checkpoint", "stats"  # artifact names


class VGGModel(PythonModel):
    def load_context(self, context: Any) -> None:
        import torch

        from vgg.data.preprocessing import Preprocess
        from vgg.data.shard_format import read_stats
        from vgg.models.io import load_model

        self._torch = torch
        self.model = load_model(context.artifacts[CHECKPOINT])
        self.preprocess = Preprocess(read_stats(Path(context.artifacts[STATS]).parent))

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        torch = self._torch
        images = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return torch.softmax(self.model(self.preprocess(images)), dim=1).numpy()


mlflow.models.set_model(VGGModel())
