"""How far each head's full-int8 logits are from Keras, and how much of that is a constant offset.

    python -m tools.int8_head_error --model artifacts/model/model.keras

For every 'logits' head of the model (each member of an ensemble), converted alone to full int8
with the training split as calibration (as `convert.bias_correction` does): the error's rms, its
mean over the images (the part bias correction removes) and the rms left after removing it, on
the calibration images and on the validation + test images the calibration never saw. The split
is the one recorded in the model's config.json (`make train`'s).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ct_edge.errors import CtEdgeError
from ct_edge.preprocess import PreprocessSpec


def head_errors(model_path: Path) -> list[dict]:
    from convert.bias_correction import at_input_size, head_model, heads, int8_outputs
    from convert.tflite_writer import full_int8
    from training import data as data_mod
    from training.models import load_keras_model

    config = json.loads((model_path.parent / "config.json").read_text(encoding="utf-8"))
    splits = data_mod.load_splits(Path(config["data"]), config["val_fraction"],
                                  config["test_fraction"], config["seed"])
    spec = PreprocessSpec.from_dict(config["spec"])
    cache = Path(config.get("cache", data_mod.DEFAULT_CACHE))
    sets = {"calibration (training split)": splits.train,
            "held out (validation + test)": splits.val + splits.test}
    arrays = {name: data_mod.load_arrays(part, spec, cache, progress=False)[0]
              for name, part in sets.items()}
    model = load_keras_model(model_path)
    rows = []
    for owner in heads(model):
        logits = head_model(owner)
        data = full_int8(logits, at_input_size(arrays["calibration (training split)"], owner))
        for name, x in arrays.items():
            x = at_input_size(x, owner)
            error = int8_outputs(data, x) - logits.predict(x, verbose=0)
            offset = error.mean(axis=0)
            rows.append({"head": owner.name, "images": name, "n": len(x),
                         "rms": float(np.sqrt((error ** 2).mean())),
                         "offset": [round(float(v), 4) for v in offset],
                         "rms_after_offset": float(np.sqrt(((error - offset) ** 2).mean()))})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.int8_head_error",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("artifacts/model/model.keras"),
                        help="model.keras with its config.json beside it "
                        "(default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        rows = head_errors(args.model)
    except (CtEdgeError, OSError, KeyError, ValueError) as exc:
        print(f"error: {args.model}: {exc}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{r['head']}, {r['images']} ({r['n']}): logit error rms {r['rms']:.3f}, constant "
              f"offset {r['offset']}, rms without it {r['rms_after_offset']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
