"""The dense autoencoder of scGNN (feature, cluster and imputation autoencoders share it).

Pure torch: tensors in, tensors out. Shape and activations follow the published code
(``model.py::AE``): ``G -> 512 -> 128 -> 512 -> G`` with ReLU after every layer, the
embedding and the reconstruction included (expression is non-negative after log1p).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class DenseAutoencoder(nn.Module):
    """Dense autoencoder ``n_genes -> hidden -> latent -> hidden -> n_genes`` with ReLU.

    Parameters
    ----------
    n_genes
        Input and output width (genes).
    hidden
        Width of the two hidden layers (the paper: 512).
    latent
        Width of the embedding (the paper: 128).
    """

    def __init__(self, n_genes: int, hidden: int = 512, latent: int = 128):
        super().__init__()
        if min(n_genes, hidden, latent) < 1:
            raise ValueError(f"layer sizes must be positive, got {n_genes}, {hidden}, {latent}")
        self.n_genes = int(n_genes)
        self.hidden = int(hidden)
        self.latent = int(latent)
        self.fc1 = nn.Linear(n_genes, hidden)
        self.fc2 = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, n_genes)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding ``z`` (cells x latent) of expression ``x`` (cells x genes)."""
        return F.relu(self.fc2(F.relu(self.fc1(x))))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction (cells x genes) of embedding ``z``."""
        return F.relu(self.fc4(F.relu(self.fc3(z))))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(reconstruction, embedding)``."""
        z = self.encode(x)
        return self.decode(z), z

    def shape_dict(self) -> dict[str, int]:
        """The constructor arguments, stored with saved weights so a model can be rebuilt."""
        return {"n_genes": self.n_genes, "hidden": self.hidden, "latent": self.latent}
