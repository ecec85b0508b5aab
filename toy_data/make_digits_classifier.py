"""Train the digits classifier from scratch and write its weights to ``toy_data/digits_classifier.safetensors``.

Run from the repository root:  python toy_data/make_digits_classifier.py
The classifier (``ddim_edu.evaluation.digits.DigitsClassifier``) is trained on the train split of
``ddim_edu.image.data.load_digits`` with the fixed SEED, in one torch thread so that the result does
not depend on the number of cores, and checked on the held-out split before the file is replaced
(atomically). It takes some seconds on one CPU core.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository root, so ddim_edu imports without installing

from ddim_edu.evaluation.digits import (  # noqa: E402
    CLASSIFIER_FILE,
    digits_accuracy,
    save_digits_classifier,
    train_digits_classifier,
)

SEED = 0
EPOCHS = 40
MIN_ACCURACY = 0.97  # on the held-out split; below it nothing is written


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    model = train_digits_classifier(seed=SEED, epochs=EPOCHS)
    seconds = time.perf_counter() - start
    accuracy = digits_accuracy(model, "heldout")
    print(f"trained in {seconds:.1f} s; held-out accuracy {accuracy:.2%} ({sum(p.numel() for p in model.parameters())} parameters)")
    if accuracy < MIN_ACCURACY:
        raise SystemExit(f"held-out accuracy {accuracy:.2%} is below {MIN_ACCURACY:.0%}: {CLASSIFIER_FILE} not written")
    path = save_digits_classifier(model, HERE / CLASSIFIER_FILE, seed=SEED, epochs=EPOCHS,
                                  heldout_accuracy=round(accuracy, 4))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
