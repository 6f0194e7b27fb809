"""fedshift: federated fine-tuning of pretrained imaging backbones across hospitals."""

__version__ = "0.1.0"
