"""The owner's model at inference time: plain arrays, loaded without pickle."""

import numpy as np


def load_model(path):
    with np.load(path, allow_pickle=False) as arrays:
        return {name: arrays[name] for name in ("coef", "intercept", "classes", "scale")}


def predict(model, pixels) -> int:
    x = np.asarray(pixels, dtype=float) / model["scale"][0]
    scores = model["coef"] @ x + model["intercept"]
    return int(model["classes"][int(np.argmax(scores))])
