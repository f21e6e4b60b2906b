"""K trained models merged into one Keras graph: one inference, the mean of their probabilities.

    python -m training.ensemble --members artifacts/a,artifacts/b,artifacts/c --out artifacts/ens

The graph takes the largest member input; a member with a smaller input gets it resized inside the
graph (bilinear), so the device still runs one preprocessing function. When every member has a
GAP + Dense 'logits' head, the graph also has a layer 'class_maps': the members' class maps, resized
to the finest grid among them, averaged. `convert` exports it as the class-map output (through
`training.gradcam.cam_model`), so `ct-edge explain` works on the ensemble as on one model.
The model folder gets a config.json from the largest member (same data, seed and split), so
`python -m convert --model <out>/model.keras` checks parity on that member's test split.
With `--flip-tta` every member also runs on the mirrored image inside the graph (twice the
compute); the means then include those answers and their class maps, mirrored back.

The **mixture recipe** (`python -m training.train --recipe mixture`, `fit_mixture`) trains the
members on the same images and merges them here, so `make train` produces a one-graph mixture with
the temperature and the uncertain threshold fitted to the mixture itself, and `training.evaluate`
cross-validates it (and its one-graph int8 artifact) like any recipe.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from . import data as data_mod
from .folders import check_replaceable, replace_folder
from .gradcam import MAPS_LAYER, cam_model
from .run_files import describe_os_error, save_model_atomically

ENSEMBLE_ARCH = "ensemble"
MEMBER_PREFIX = "member"
LOGITS_LAYER = "logits"  # a member's Dense head; its input is the member's pooled features
FEATURES_OUTPUT = "features"
FLIP_LAYER = "flip_tta"  # the mirrored input of a graph that averages over a horizontal flip
MIXTURE_RECIPE = "mixture"
MIXTURE_SIZE = 224  # the mixture's input: the pretrained member's size
# The registered mixture (docs/accuracy.md, issue 14): TrainConfig changes per member, all trained
# on the same (224-px) images. Edge-gap behind an in-graph resize to 128, trained on exactly what
# the graph feeds it, and the frozen ImageNet EfficientNet-Lite0 with a logistic head, its weights
# snapped to the int8 grid. The first member's pooled features feed the domain gate.
MIXTURE_MEMBERS: tuple[dict, ...] = (
    {"arch": "edge-gap-resize128", "recipe": "finetune"},
    {"arch": "efficientnet-lite0", "recipe": "probe", "int8_grid": True},
)


def _size(model: Any) -> tuple[int, int, int]:
    return tuple(int(d) for d in model.inputs[0].shape[1:])  # type: ignore[return-value]


def _graph(members: Sequence[Any], shapes: Sequence[tuple[int, int, int]], name: str,
           with_maps: bool, with_features: bool = False, flip_tta: bool = False) -> Any:
    """Input of the largest member, each member on its (resized) copy, mean probabilities as the
    output 'probabilities', with_maps: the mean class map as a second output 'class_maps', and
    with_features: the first member's pooled features (the domain gate's) as the last output.
    flip_tta: every member runs on the image and its mirror as one batch; its two probabilities and
    class maps (the mirror's mirrored back) are averaged first (the features stay the unmirrored
    image's, as the gate was fitted on them)."""
    import keras
    from keras import layers

    from .models import MirrorMean, WithMirror

    largest = max(shapes)
    inputs = keras.Input(largest, name="image")
    # flip_tta: one batch of two per member (the image, its mirror), so that each weight is
    # stored and quantized once; two separate passes duplicated weights in the int8 file
    # (docs/accuracy.md, eighth session).
    batch = WithMirror(name=FLIP_LAYER)(inputs) if flip_tta else inputs
    probabilities, maps, features = [], [], []
    for index, (member, shape) in enumerate(zip(members, shapes, strict=True)):
        x = batch
        if shape != largest:
            x = layers.Resizing(shape[0], shape[1], interpolation="bilinear",
                                name=f"resize{index}_{shape[0]}")(x)
        out = member(x)
        outs = list(out) if isinstance(out, list | tuple) else [out]
        if flip_tta:
            outs = [MirrorMean(unflip=i == 1, first_only=i == 2, name=f"views{index}_{i}")(o)
                    for i, o in enumerate(outs)]
        probabilities.append(outs[0])
        maps.extend(outs[1:2])
        features.extend(outs[2:3])
    mean = (layers.Average(name="mean_probabilities")(probabilities) if len(probabilities) > 1
            else layers.Identity(name="mean_probabilities")(probabilities[0]))
    outputs = [layers.Activation("linear", name="probabilities", dtype="float32")(mean)]
    if with_maps:
        grid = max(tuple(int(d) for d in m.shape[1:3]) for m in maps)
        resized = [m if tuple(int(d) for d in m.shape[1:3]) == grid else
                   layers.Resizing(*grid, interpolation="bilinear", name=f"maps{i}_to_grid")(m)
                   for i, m in enumerate(maps)]
        mean_maps = (layers.Average(name="mean_maps")(resized) if len(resized) > 1
                     else layers.Identity(name="mean_maps")(resized[0]))
        outputs.append(layers.Activation("linear", name=MAPS_LAYER, dtype="float32")(mean_maps))
        if with_features:
            outputs.append(layers.Activation("linear", name=FEATURES_OUTPUT,
                                             dtype="float32")(features[0]))
    return keras.Model(inputs, outputs if with_maps else outputs[0], name=name)


def merge(models: Sequence[Any], name: str = "ensemble", flip_tta: bool = False) -> Any:
    """One Keras model: input of the largest member, output 'probabilities' the mean of the
    members' probabilities (with flip_tta: on the image and its mirror). Members with a GAP +
    Dense 'logits' head are stored CAM-ready, with their pooled features (three outputs), so
    `ensemble_cam_model` and `ensemble_export_model` add the mean class map and the domain gate's
    features without retraining them."""
    import keras

    if not models:
        raise ValueError("an ensemble needs at least one member")
    shapes = [_size(m) for m in models]
    channels = {s[2] for s in shapes}
    classes = {int(m.outputs[0].shape[-1]) for m in models}
    if len(channels) != 1 or len(classes) != 1:
        raise ValueError(f"members disagree on channels {sorted(channels)} or classes "
                         f"{sorted(classes)}")
    if any(s[0] != s[1] for s in shapes):
        raise ValueError(f"members must take square inputs, got {shapes}")
    with_maps = [cam_model(m) for m in models]
    cam_ready = all(m is not None for m in with_maps)
    members = []
    for index, model in enumerate(models):
        graph = with_maps[index] if cam_ready else model
        if cam_ready:
            graph = keras.Model(graph.inputs, [*graph.outputs,
                                               model.get_layer(LOGITS_LAYER).input])
        # A fresh wrapper per member: unique names, the member's own layers shared, not copied.
        members.append(keras.Model(graph.inputs, graph.outputs,
                                   name=f"{MEMBER_PREFIX}{index}_{model.name}"))
    return _graph(members, shapes, name, with_maps=False, flip_tta=flip_tta)


def ensemble_members(model: Any) -> list[Any]:
    """The member sub-models of a merged ensemble, in order (empty for any other model)."""
    import keras

    return [layer for layer in model.layers
            if isinstance(layer, keras.Model) and layer.name.startswith(MEMBER_PREFIX)]


def has_flip_tta(model: Any) -> bool:
    """Whether a merged graph averages each member over the mirrored image too."""
    return any(layer.name == FLIP_LAYER for layer in model.layers)


def ensemble_cam_model(model: Any) -> Any | None:
    """The ensemble with a second output 'class_maps' (the members' mean class map), the same
    weights; None when `model` is not an ensemble of CAM-ready members."""
    members = ensemble_members(model)
    if not members or any(len(m.outputs) < 2 for m in members):
        return None
    return _graph(members, [_size(m) for m in members], f"{model.name}-cam", with_maps=True,
                  flip_tta=has_flip_tta(model))


def ensemble_export_model(model: Any) -> Any | None:
    """The ensemble with outputs probabilities, mean class map and the first member's pooled
    features (the domain gate is the first member's, e.g. the default model's, as measured in
    docs/domain.md); None when its members were stored without features."""
    members = ensemble_members(model)
    if not members or any(len(m.outputs) != 3 for m in members):
        return None
    return _graph(members, [_size(m) for m in members], f"{model.name}-export", with_maps=True,
                  with_features=True, flip_tta=has_flip_tta(model))


def first_member_head(model: Any) -> Any | None:
    """The first member's 'logits' Dense layer (the head the domain gate's features feed)."""
    members = ensemble_members(model)
    return members[0].get_layer(LOGITS_LAYER) if members else None


def member_dirs(arg: str) -> list[Path]:
    return [Path(p) for p in arg.split(",") if p]


ENSEMBLE_FILES = frozenset({"model.keras", "config.json"})  # all that `build` writes


def is_ensemble_file(path: Path) -> bool:
    return path.name in ENSEMBLE_FILES and path.is_file()


def is_earlier_ensemble(folder: Path) -> bool:
    """True when `folder` holds only what `build` writes, its config.json with arch
    ENSEMBLE_ARCH: anything else in it (notes, member folders) would be deleted with it."""
    try:
        return all(is_ensemble_file(path) for path in folder.iterdir()) and json.loads(
            (folder / "config.json").read_text(encoding="utf-8")).get("arch") == ENSEMBLE_ARCH
    except (OSError, ValueError, AttributeError):
        return False


def build(member_folders: Sequence[Path], out: Path, flip_tta: bool = False) -> dict:
    """Loads each member's model.keras, merges them, writes <out>/model.keras and config.json
    into a new folder that then replaces `out` whole: only a missing or empty folder or an earlier
    ensemble's is replaced."""
    from .models import load_keras_model

    check_replaceable(out, is_earlier_ensemble,
                      f"an earlier ensemble (only model.keras and a config.json with arch "
                      f"{ENSEMBLE_ARCH!r})", usual=is_ensemble_file)
    models, configs = [], []
    for folder in member_folders:
        path = folder / "model.keras"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no model.keras in member folder {folder}")
        models.append(load_keras_model(path))
        config_path = folder / "config.json"
        try:
            configs.append(json.loads(config_path.read_text()) if config_path.is_file() else {})
        except ValueError as exc:
            raise ValueError(f"{config_path}: not valid JSON ({exc})") from None
    model = merge(models, flip_tta=flip_tta)
    largest = max(range(len(models)), key=lambda i: _size(models[i]))
    config = dict(configs[largest])
    def split_of(c: dict) -> str:
        data = str(Path(c["data"]).resolve()) if c.get("data") else None
        return json.dumps([data, *(c.get(k) for k in ("seed", "val_fraction", "test_fraction"))])

    if len({split_of(c) for c in configs}) > 1:
        print("warning: members were trained on different data, seeds or splits; the parity "
              "split is the largest member's and may contain other members' training images",
              file=sys.stderr)
    config.update(arch=ENSEMBLE_ARCH, out=str(out), members=[str(f) for f in member_folders],
                  member_archs=[c.get("arch") for c in configs],
                  calibration={"temperature": 1.0, "fitted_on": "none (ensemble)"})

    def write(folder: Path) -> None:
        save_model_atomically(model, folder / "model.keras")
        data_mod.write_json(folder / "config.json", config)

    replace_folder(out, write)
    return {"members": len(models), "input": list(_size(model)),
            "params": int(model.count_params()),
            "class_maps": ensemble_cam_model(model) is not None}


def mixture_members(config: Any) -> list[dict]:
    """The member changes of a mixture run: `config.mixture_members`, else the registered ones."""
    return [dict(m) for m in (config.mixture_members or MIXTURE_MEMBERS)]


def mixture_member_configs(config: Any, out: Path | None) -> list[tuple[Any, Path | None]]:
    """Each member's TrainConfig of a mixture `config` and its subfolder of `out` (None without
    `out`), as `fit_mixture` trains them."""
    members = []
    for index, changes in enumerate(mixture_members(config)):
        if changes.get("recipe") == MIXTURE_RECIPE:
            raise ValueError("a mixture member cannot itself be a mixture")
        member = replace(config, **{"recipe": "finetune", **changes}, mixture_members=None,
                         flip_tta=False)
        member_out = None
        if out is not None:
            member_out = Path(out) / f"{MEMBER_PREFIX}{index}-{member.arch}"
            member = replace(member, out=str(member_out))
        members.append((member, member_out))
    return members


def fit_mixture(fit: Callable[..., tuple[Any, dict]], config: Any, x_train: np.ndarray,
                y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                out: Path | None = None, verbose: int | None = None) -> tuple[Any, dict]:
    """`training.train.fit_model` for `config.recipe == "mixture"`: each member fitted by `fit`
    (fit_model itself, passed in so this module never imports train) on the same arrays and seed,
    in its own subfolder of `out` (resumable there), then merged. Returns (model, the first
    member's history); `out/history.csv` is the first member's, for the learning curves."""
    members = mixture_member_configs(config, out)
    models, first_history = [], {}
    for index, (member, member_out) in enumerate(members):
        if member_out is not None:
            member_out.mkdir(parents=True, exist_ok=True)
        if verbose != 0:
            print(f"mixture member {index + 1}/{len(members)}: {member.arch} "
                  f"({member.recipe})", flush=True)
        model, history = fit(member, x_train, y_train, x_val, y_val, out=member_out,
                             verbose=verbose)
        models.append(model)
        if index == 0:
            first_history = history
            if member_out is not None and (member_out / "history.csv").is_file():
                shutil.copyfile(member_out / "history.csv", Path(out) / "history.csv")
    return merge(models, name=MIXTURE_RECIPE, flip_tta=config.flip_tta), first_history


def predict_mean(models: Sequence[Any], x: np.ndarray, flip_tta: bool = False) -> np.ndarray:
    """What the merged graph computes, member by member (for checking it)."""
    import tensorflow as tf

    out = []
    for model in models:
        size = _size(model)
        for view in [x, x[:, :, ::-1]] if flip_tta else [x]:
            xi = view if view.shape[1:] == size else tf.image.resize(view, size[:2], "bilinear").numpy()
            out.append(model.predict(xi, verbose=0))
    return np.mean(out, axis=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.ensemble",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", required=True,
                        help="comma-separated model folders (each with model.keras, config.json) "
                        "(required)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the merged model: a new or empty one, or an earlier "
                        "ensemble's, replaced only once the new one is complete (required)")
    parser.add_argument("--flip-tta", action="store_true",
                        help="each member also runs on the mirrored image inside the graph and "
                        "the means include it: twice the compute (default: off)")
    args = parser.parse_args(argv)
    try:
        info = build(member_dirs(args.members), args.out, args.flip_tta)
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except (ValueError, data_mod.DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; {args.out} was left as it was", file=sys.stderr)
        return 130
    print(f"wrote {args.out / 'model.keras'}: {info['members']} members, input {info['input']}, "
          f"{info['params']:,} parameters, class maps: {'yes' if info['class_maps'] else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
