"""The name registry behind the optimizer factory and the reparameterizations."""

import pytest

from optimlib.optim import get_optimizer_spec, list_optimizers
from optimlib.reparam import get_reparam_spec, list_reparams
from optimlib.registry import Registry


def test_names_are_case_insensitive_sorted_and_unique():
    reg = Registry("widget")
    spec_b, spec_a = object(), object()
    assert reg.add("Beta", spec_b) is spec_b
    reg.add("alpha", spec_a)
    assert reg.names() == ["alpha", "beta"]
    assert reg.get("BETA") is spec_b
    with pytest.raises(ValueError, match="widget 'ALPHA' is already registered"):
        reg.add("ALPHA", object())


@pytest.mark.parametrize("name", ["nope", 3, None])
def test_unknown_names_list_the_known_ones(name):
    reg = Registry("widget")
    reg.add("alpha", object())
    with pytest.raises(ValueError, match=rf"unknown widget {name!r}; known: alpha"):
        reg.get(name)


def test_the_library_registries():
    assert {"adamw", "adamp", "galore_adamw", "smmf"} <= set(list_optimizers())
    assert get_optimizer_spec("GaLore_AdamW").name == "galore_adamw"
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'; known: adamp, adamw"):
        get_optimizer_spec("adamx")
    assert {"nm", "sltrain", "lost"} <= set(list_reparams())
    with pytest.raises(ValueError, match="unknown reparameterization 'sparse'; known: "):
        get_reparam_spec("sparse")
