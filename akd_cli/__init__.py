"""akd: Avatar Knowledge Distillation for object detectors.

``from akd_cli import AKDLoss`` gives the pure-torch loss; torch is only imported on that access,
so the command line starts without it.
"""
__version__ = "0.1.0"

__all__ = ["AKDLoss", "__version__"]


def __getattr__(name):
    if name == "AKDLoss":
        from akd_cli.core import AKDLoss

        return AKDLoss
    raise AttributeError(f"module 'akd_cli' has no attribute {name!r}")
