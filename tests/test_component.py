import pytest
import torch
from sklearn.base import clone
from toy import ToyHinge, ToyImage

from imtm import Component
from imtm.component import COMPONENT_REGISTRY


def test_requires_provides_class_defaults_and_renames():
    a = ToyImage()
    assert a.requires == ("images",) and a.provides == ("image_tokens",)
    b = ToyImage(provides=("other_tokens",))
    assert b.provides == ("other_tokens",) and ToyImage.provides == ("image_tokens",)
    assert b.get_params()["provides"] == ("other_tokens",)
    assert clone(b).provides == ("other_tokens",)


def test_get_params_set_params_clone_round_trip():
    h = ToyHinge(margin=0.3, weight=2.0)
    # requires / provides are reported as given to the constructor: None = the default names
    assert h.get_params(deep=False) == {
        "margin": 0.3,
        "weight": 2.0,
        "requires": None,
        "provides": None,
    }
    assert h.requires == ("scores", "positives") and h.provides == ("hinge_loss",)
    h.set_params(margin=0.5)
    c = clone(h)
    assert c.margin == 0.5 and c is not h
    with pytest.raises(ValueError, match="invalid parameter 'margn'.*Did you mean 'margin'"):
        h.set_params(margn=1.0)


def test_subclasses_are_registered():
    assert COMPONENT_REGISTRY["ToyImage"] is ToyImage


def test_varargs_are_refused():
    class Bad(Component):
        def __init__(self, *dims):
            super().__init__()

    with pytest.raises(TypeError, match=r"may not take \*args"):
        Bad().get_params()


def test_state_dict_round_trip_through_clone():
    a = ToyImage()
    b = clone(a)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 6)
    torch.testing.assert_close(a.proj(x), b.proj(x))
