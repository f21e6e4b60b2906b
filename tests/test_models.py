"""The architecture registry: shapes, softmax outputs and the documented parameter counts."""

from __future__ import annotations

import numpy as np
import pytest

from training.models import ARCHITECTURES, DEFAULT_ARCHITECTURE, build_model, layer_table


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_maps_a_batch_to_probabilities(name: str) -> None:
    model = build_model(name)
    assert model.input_shape == (None, 128, 128, 3)
    assert model.output_shape == (None, 3)
    assert model.layers[-1].name == "probabilities"
    p = np.asarray(model(np.random.default_rng(0).random((2, 128, 128, 3), dtype=np.float32)))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)


def test_reference_architecture_matches_the_original_design() -> None:
    model = build_model("reference")
    types = [row["type"] for row in layer_table(model)]
    assert types.count("Conv2D") == 3 and types.count("MaxPooling2D") == 3
    assert "Flatten" in types and "Dropout" in types
    # 14*14*128 flattened features into Dense(128) dominate: 3,211,392 of 3,305,027 parameters.
    assert model.count_params() == 3_305_027


def test_default_architecture_is_edge_sized() -> None:
    assert build_model(DEFAULT_ARCHITECTURE).count_params() < 150_000


def test_unknown_architecture_names_the_choices() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        build_model("resnet-9000")
