import pytest
import torch
from toy import ToyHinge, ToyText

from imtm.data import Vocabulary
from imtm.engine.serialization import (
    ConfigError,
    atomic_write_json,
    decode_value,
    encode_value,
    flatten_state,
    unflatten_state,
)


def test_values_round_trip():
    v = Vocabulary(["a", "b"])
    for value in [None, 1, 2.5, "x", (1, 2), [1, (2, 3)], {"k": (1,)}, torch.bfloat16, v]:
        assert decode_value(encode_value(value)) == value


def test_components_round_trip_by_registered_name():
    block = ToyText(vocab=Vocabulary(["a"]), out_dim=3, provides=("t",))
    back = decode_value(encode_value(block))
    assert type(back) is ToyText and back.out_dim == 3 and back.provides == ("t",)
    assert back.vocab == block.vocab


def test_unknown_types_are_refused():
    with pytest.raises(TypeError, match="cannot save parameter of type object"):
        encode_value(object())
    with pytest.raises(ConfigError, match="unknown block 'Evil'"):
        decode_value({"__component__": "Evil", "params": {}})
    with pytest.raises(ConfigError, match="unknown dtype"):
        decode_value({"__dtype__": "system"})


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(3)
    opt.step()
    tensors, tree = flatten_state(opt.state_dict())
    back = unflatten_state(tree, tensors)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.5)
    opt2.load_state_dict(back)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["betas"] == (0.9, 0.999)
    torch.testing.assert_close(
        opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"], opt.state[p]["exp_avg"]
    )


def test_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_loss_weight_is_a_parameter():
    assert ToyHinge(weight=0.5).get_params()["weight"] == 0.5
