"""FeatureSpec: vocabularies with an OOV bucket, standardisation with training statistics, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moekit.data.tabular import OOV, CategoricalFeature, FeatureSpec, NumericFeature

TRAIN = {
    "city": ["b", "a", "b", "c", "b"],
    "age": [20.0, 30.0, 40.0, 50.0, 60.0],
    "gain": [0.0, 0.0, 9.0, 99.0, 0.0],
}


def fitted() -> FeatureSpec:
    return FeatureSpec.fit(TRAIN, categorical=["city"], numeric=["age", "gain"], transforms={"gain": "log1p"})


def test_vocabulary_is_sorted_with_oov_first_and_unseen_values_go_to_oov():
    spec = fitted()
    assert spec.categorical[0].vocab == (OOV, "a", "b", "c")
    encoded = spec.transform({"city": ["a", "zzz", "c", OOV], "age": [1.0] * 4, "gain": [0.0] * 4})
    # "zzz" never appeared in training; a raw value spelled like the bucket name is unseen too.
    assert encoded.cat_NC[:, 0].tolist() == [1, 0, 3, 0]


def test_min_count_sends_rare_values_to_oov():
    spec = FeatureSpec.fit(TRAIN, categorical=["city"], numeric=[], min_count=2)
    assert spec.categorical[0].vocab == (OOV, "b")
    assert spec.transform({"city": ["a", "b"]}).cat_NC[:, 0].tolist() == [0, 1]


def test_numerics_use_training_statistics():
    spec = fitted()
    age = np.array(TRAIN["age"])
    gain = np.log1p(np.array(TRAIN["gain"]))
    test = {"city": ["a"], "age": [35.0], "gain": [4.0]}
    encoded = spec.transform(test).num_NF[0]
    expected = [(35.0 - age.mean()) / age.std(), (np.log1p(4.0) - gain.mean()) / gain.std()]
    torch.testing.assert_close(encoded, torch.tensor(expected, dtype=torch.float32))
    # Standardised training columns: mean 0, population std 1.
    train_num = spec.transform(TRAIN).num_NF.double()
    torch.testing.assert_close(train_num.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(train_num.std(0, unbiased=False), torch.ones(2, dtype=torch.float64))


def test_spec_round_trips_through_json():
    spec = fitted()
    again = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    rows = {"city": ["c", "q"], "age": [22.0, 70.0], "gain": [1.0, 0.0]}
    a, b = spec.transform(rows), again.transform(rows)
    assert torch.equal(a.cat_NC, b.cat_NC) and torch.equal(a.num_NF, b.num_NF)


def test_constant_column_maps_to_zero():
    spec = FeatureSpec.fit({"k": [3.0, 3.0]}, categorical=[], numeric=["k"])
    assert spec.transform({"k": [3.0]}).num_NF.tolist() == [[0.0]]


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match=r"columns missing from the data: \['age'\]"):
        FeatureSpec.fit({"city": ["a"]}, categorical=["city"], numeric=["age"])
    with pytest.raises(ValueError, match="numeric feature 'age'"):
        FeatureSpec.fit({"age": ["x", "1"]}, categorical=[], numeric=["age"])
    with pytest.raises(ValueError, match="different lengths"):
        FeatureSpec.fit({"a": ["x"], "b": [1.0, 2.0]}, categorical=["a"], numeric=["b"])
    with pytest.raises(ValueError, match="both categorical and numeric"):
        FeatureSpec.fit(TRAIN, categorical=["age"], numeric=["age"])
    with pytest.raises(ValueError, match="log1p needs values >= 0"):
        FeatureSpec.fit({"g": [-1.0, 2.0]}, categorical=[], numeric=["g"], transforms={"g": "log1p"})
    with pytest.raises(ValueError, match="must start with the OOV bucket"):
        CategoricalFeature("c", ("a",))
    with pytest.raises(ValueError, match="std must be positive"):
        NumericFeature("n", 0.0, 0.0)
    with pytest.raises(ValueError, match="not a feature spec"):
        FeatureSpec.from_dict({"categorical": []})
