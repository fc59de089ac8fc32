"""CIFAR-10 fine-tuning vs. from-scratch benchmark: data, trainers, metrics and report.

Framework code lives in its own modules (``torch_*`` and ``keras_*``) and is never imported
from here, so that one process only ever loads one deep-learning framework.
"""

__version__ = "0.1.0"
