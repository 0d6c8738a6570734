"""Bad options fail early with a sentence naming the option (issue 10, defect 16)."""

from __future__ import annotations

import pytest
from conftest import tiny_model

from glmft import args
from glmft.args import TrainArgs
from glmft.tuners import freeze, lora


@pytest.mark.parametrize("value", [-1.0, 0.0, float("nan"), float("inf")])
def test_learning_rate_must_be_a_positive_number(value):
    with pytest.raises(ValueError, match=r"--learning_rate must be a positive number"):
        TrainArgs(learning_rate=value)


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_script_refuses_a_bad_learning_rate_while_parsing(value, capsys):
    """Refused by argument parsing, before any model is loaded (it used to fail inside the optimizer)."""
    with pytest.raises(SystemExit) as exit_:
        args.parse(lora, ["--learning_rate", value])
    assert exit_.value.code == 2
    assert "--learning_rate must be a positive number" in capsys.readouterr().err


def test_weight_decay_must_not_be_negative():
    with pytest.raises(ValueError, match=r"--weight_decay must be 0 or a positive number, got -0.1"):
        TrainArgs(weight_decay=-0.1)


def test_freeze_default_on_a_two_layer_model_points_at_num_trainable_layers():
    with pytest.raises(ValueError) as err:
        freeze.apply(tiny_model(), freeze.Args())  # the default 5 layers suits chatglm-6b's 28
    message = str(err.value)
    assert "2-layer model" in message and "use --num_trainable_layers 2 or less" in message
    with pytest.raises(ValueError, match=r"layers \[7\] do not exist in a 2-layer model .*fix --trainable_layers"):
        freeze.apply(tiny_model(), freeze.Args(trainable_layers="1,7"))
    assert freeze.chosen_layers(freeze.Args(num_trainable_layers=2), 2) == [0, 1]
