"""Named random streams: every numpy.random.Generator of a run comes from here.

Not a paper section. A stream is seeded with (seed, the stream's number, indices...), for example
generator(seed, "augment", step, micro) for the crops of one micro-batch. Distinct names can never
draw the same numbers, and a run's randomness is a function of the seed alone, which is what makes a
resumed run bit-identical to an uninterrupted one. The table below is the only place numbers appear.
"""
from __future__ import annotations

import numpy as np

STREAMS = {
    # pre-training and fine-tuning (trainer.py, finetune.py)
    "init": 1,            # the model's initial weights
    "heads": 2,           # fine-tuning's classifier
    "order": 3,           # (epoch): the order in which an epoch visits the training images
    "augment": 4,         # (step, micro): crops and flips of one micro-batch
    "mask": 5,            # (step, micro): BERT's masked positions of one micro-batch
    "eval": 6,            # BERT's masks on the validation images (the same at every evaluation)
    "samples": 7,         # samples.png at the end of a run
    # data (data.py, streaks.py, shapes.py, palette.py)
    "split": 8,           # which training images are held out for validation
    "palette": 9,         # the pixels k-means sees and its k-means++ start
    "shapes": 10,         # (split): drawing the built-in shapes data set
    "streaks": 15,        # (split): drawing the built-in streaks data set (2: sample.py's reference)
    # linear probes (probe_fit.py, probe_report.py)
    "probe_masks": 11,    # BERT's masks when extracting features
    "probe_holdout": 12,  # the slice of training images that chooses lambda
    "low_data": 13,       # (per_class, draw): the class-balanced subsets of §4.7
    "random_init": 14,    # the random-init baseline model
}


def generator(seed: int, stream: str, *index: int) -> np.random.Generator:
    """The Generator of `stream` (a name in STREAMS) for this seed and these indices."""
    return np.random.default_rng([int(seed), STREAMS[stream], *(int(i) for i in index)])
