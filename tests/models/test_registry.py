"""The registry accessors and how MILModel records hyperparameters (subclasses, **kwargs)."""

import inspect

import pytest
import torch
from torch.nn import Linear

from graphmil.models import (
    MILModel,
    MILOutput,
    check_model_kwargs,
    create_model,
    get_model_class,
    list_models,
    model_description,
    model_parameters,
    register_model,
)
from graphmil.models.abmil import ABMIL
from graphmil.models.casii import CASii


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry for the models a test registers (none leaks out)."""
    from graphmil.models import registry as reg

    reg.list_models()
    monkeypatch.setattr(reg, "_REGISTRY", dict(reg._REGISTRY))
    return reg


# ------------------------------------------------------------------------------------ accessors
def test_get_model_class_is_case_insensitive_and_names_the_known_models():
    assert get_model_class("ABMIL") is ABMIL and get_model_class("casii") is CASii
    with pytest.raises(ValueError, match=r"Unknown model 'abmill'\. Did you mean 'abmil'\? Known models: ") as e:
        get_model_class("abmill")
    assert str(e.value).endswith(", ".join(list_models()))
    with pytest.raises(ValueError, match="Unknown model 'zzz'. Known models"):
        create_model("zzz", 4)


def test_model_description_is_the_first_docstring_paragraph():
    assert model_description("abmil") == "Attention-based MIL, plain or gated (Ilse, Tomczak & Welling, ICML 2018)."
    acmil = model_description("ACMIL")
    assert acmil.startswith("ACMIL: gated multi-branch attention, stochastic top-K instance masking")
    assert acmil.endswith("Learning for Whole Slide Image Classification\", ICCV 2023).")
    assert "\n" not in acmil and "  " not in acmil
    for name in list_models():
        assert model_description(name), name


def test_model_parameters_are_the_constructor_defaults():
    assert model_parameters("abmil") == {"embed_dim": 512, "attention_dim": 128, "gated": True,
                                         "dropout": 0.0, "attention_dropout": 0.0}
    assert list(model_parameters("casii"))[:3] == ["keys", "hidden_channels", "temperature"]
    for name in list_models():
        sig = inspect.signature(get_model_class(name).__init__)  # the wrapped __init__ keeps its signature
        want = {k: p.default for k, p in sig.parameters.items() if k not in ("self", "in_channels", "num_classes")}
        assert model_parameters(name) == want, name


def test_check_model_kwargs_names_the_key_its_closest_name_and_the_accepted_ones():
    check_model_kwargs("abmil", {"embed_dim": 3, "gated": False})
    msg = ("model.kwargs.embd_dim: unknown argument of model 'abmil'. Did you mean 'embed_dim'? "
           "Accepted: embed_dim, attention_dim, gated, dropout, attention_dropout")
    with pytest.raises(ValueError) as e:
        check_model_kwargs("ABMIL", {"gated": True, "embd_dim": 3})
    assert str(e.value) == msg
    with pytest.raises(ValueError,
                       match=r"^train\.model\.zzz: unknown argument of model 'smap'\. Accepted: embed_dim, "):
        check_model_kwargs("smap", {"zzz": 1}, where="train.model")  # no close name: no hint
    with pytest.raises(ValueError, match="in_channels.*create_model's own argument"):
        check_model_kwargs("abmil", {"in_channels": 3})
    with pytest.raises(ValueError, match="Unknown model"):
        check_model_kwargs("abmill", {})


def test_create_model_checks_kwargs_before_the_constructor():
    with pytest.raises(ValueError, match=r"model\.kwargs\.embd_dim: unknown argument of model 'abmil'\. "
                                         r"Did you mean 'embed_dim'\?"):
        create_model("abmil", 8, embd_dim=16)


# ------------------------------------------------------------------------ hyperparameter capture
def test_outermost_constructor_wins(registry):
    @register_model("small_abmil")
    class SmallABMIL(ABMIL):
        """ABMIL with a small embedding."""

        def __init__(self, in_channels: int, num_classes: int = 1, width: int = 8, gated: bool = False):
            super().__init__(in_channels, num_classes, embed_dim=width, attention_dim=4, gated=gated)

    model = create_model("small_abmil", 6, width=5)
    assert model.hparams == {"width": 5, "gated": False}  # not ABMIL's embed_dim=5, attention_dim=4
    assert model.width == 5 and model.pool.V.out_features == 4
    assert "width=5, gated=False" in repr(model) and "embed_dim" not in model.extra_repr()
    spec = model.spec()
    assert spec == {"name": "small_abmil", "in_channels": 6, "num_classes": 1, "kwargs": {"width": 5, "gated": False}}
    assert repr(create_model(spec["name"], spec["in_channels"], spec["num_classes"], **spec["kwargs"])) == repr(model)
    assert model_parameters("small_abmil") == {"width": 8, "gated": False}
    with pytest.raises(ValueError, match="Did you mean 'width'"):
        create_model("small_abmil", 6, widht=5)


def test_kwargs_passed_on_are_recorded_and_checked(registry):
    @register_model("abmil_plus")
    class ABMILPlus(ABMIL):
        """ABMIL with an extra knob."""

        def __init__(self, in_channels: int, num_classes: int = 1, scale: float = 2.0, **kwargs):
            super().__init__(in_channels, num_classes, **kwargs)

    model = create_model("abmil_plus", 6, attention_dim=7)
    assert model.hparams == {"scale": 2.0, "embed_dim": 512, "attention_dim": 7, "gated": True,
                             "dropout": 0.0, "attention_dropout": 0.0}
    assert model.pool.V.out_features == 7 and model.scale == 2.0
    spec = model.spec()
    assert repr(create_model(spec["name"], 6, 1, **spec["kwargs"])) == repr(model)
    with pytest.raises(ValueError, match=r"abmil_plus'\. Did you mean 'attention_dim'\? Accepted: scale, embed_dim, "):
        check_model_kwargs("abmil_plus", {"atention_dim": 3})


def test_kwargs_consumed_by_the_model_itself_are_open(registry):
    @register_model("bag_of_options")
    class BagOfOptions(MILModel):
        """A model that reads any option."""

        def __init__(self, in_channels: int, num_classes: int = 1, **options):
            super().__init__(in_channels, num_classes)
            self.head = Linear(in_channels, num_classes)

        def forward(self, batch):
            x, index, _ = self.unpack(batch)
            return MILOutput(self.head(x).mean(0, keepdim=True), batch=index)

    check_model_kwargs("bag_of_options", {"anything": 1})  # cannot be rejected
    model = create_model("bag_of_options", 3, colour="red")
    assert model.hparams == {"colour": "red"} and model.colour == "red"
    assert model_parameters("bag_of_options") == {}


def test_spec_needs_a_registered_class_and_plain_values(registry):
    class SameConstructor(ABMIL):  # e.g. a test spy overriding prepare: rebuilt as an ABMIL
        is_prepared = False

    m = SameConstructor(4, embed_dim=8)
    spec = m.spec()
    assert spec["name"] == "abmil" and spec["kwargs"]["embed_dim"] == 8
    assert repr(create_model(spec["name"], 4, 1, **spec["kwargs"])).replace("ABMIL(", "SameConstructor(", 1) == repr(m)

    class OwnConstructor(ABMIL):
        def __init__(self, in_channels: int, num_classes: int = 1, width: int = 8):
            super().__init__(in_channels, num_classes, embed_dim=width)

    with pytest.raises(ValueError, match="OwnConstructor is not registered and has its own constructor"):
        OwnConstructor(4).spec()

    @register_model("act_abmil")
    class ActABMIL(ABMIL):
        """ABMIL taking a module as an argument."""

        def __init__(self, in_channels: int, num_classes: int = 1, act=None):
            super().__init__(in_channels, num_classes)

    assert ActABMIL(4).spec()["kwargs"] == {"act": None}
    with pytest.raises(TypeError, match="'act' of model 'act_abmil' is a ReLU"):
        ActABMIL(4, act=torch.nn.ReLU()).spec()


def test_hparams_copy_list_arguments_and_a_bare_milmodel_has_none():
    widths = [8, 4]
    model = create_model("abmil", 6, embed_dim=widths)
    widths.append(2)
    assert model.hparams["embed_dim"] == [8, 4] and model.embed_dim == [8, 4]
    base = MILModel(3, 2)
    assert base.hparams == {} and base.extra_repr() == "in_channels=3, num_classes=2" and base.is_prepared
    assert not hasattr(model, "_hparams_depth")
    with pytest.raises(TypeError):  # a wrong call still raises the constructor's own error
        ABMIL()
