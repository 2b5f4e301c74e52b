"""The small MLP head shared by the aesthetic predictor and ImageReward."""

from __future__ import annotations

import torch


class AestheticMLP(torch.nn.Module):
    """The LAION improved aesthetic predictor's head: linear layers with dropout, no activations.
    Parameter names (layers.0, .2, .4, .6, .7) match its released checkpoint."""

    def __init__(self, input_size=768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)
