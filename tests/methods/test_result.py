"""One result type for every train_* entry point; the per-method names are deprecated aliases."""

import warnings

import pytest

import rftengine
import rftengine.methods as methods
from rftengine.methods import TrainResult
from rftengine.methods.train_state import TrainState
from rftengine.methods.result import DEPRECATED_RESULT_NAMES
from rftengine.toy import tiny_causal_lm


@pytest.mark.parametrize("name", DEPRECATED_RESULT_NAMES)
def test_old_result_names_are_deprecated_aliases(name):
    with pytest.warns(DeprecationWarning, match=f"{name} is deprecated.*TrainResult"):
        alias = getattr(methods, name)
    assert alias is TrainResult
    with pytest.warns(DeprecationWarning, match=name):
        assert getattr(rftengine, name) is TrainResult
    assert name not in methods.__all__


def test_unknown_name_still_raises():
    with pytest.raises(AttributeError, match="NoSuchResult"):
        methods.NoSuchResult  # noqa: B018


def test_train_result_policy_is_model_and_optional_fields_default_empty():
    model = tiny_causal_lm(vocab_size=8)
    result = TrainResult(model=model, state=TrainState(method="sft"))
    assert result.policy is model
    assert result.history == [] and result.stage_results == {}
    assert result.accuracy is None and result.critic is None and result.context is None
    assert result.examples is None and result.pairs is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name itself does not warn
        assert rftengine.TrainResult is TrainResult
