"""The hook mechanism (soundlake.generation.inference.hooks) on plain torch modules.

AudioCache and LiteFocus attached through it, alone and together, are tested in
test_cached_inference.py.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from soundlake.generation.inference.hooks import (
    HOOK_ATTR,
    HookRegistry,
    ModelHook,
    find_modules,
    register_hooks,
    remove_hooks,
)


class Trace(ModelHook):
    """pre_forward scales the input, post_forward adds a constant; both log their turn."""

    def __init__(self, tag: str, scale: float, add: float, log: list):
        self.tag, self.scale, self.add, self.log = tag, scale, add, log

    def pre_forward(self, module, x):
        self.log.append(f"{self.tag}.pre")
        return (x * self.scale,), {}

    def post_forward(self, module, output):
        self.log.append(f"{self.tag}.post")
        return output + self.add


class Counter(ModelHook):
    stateful = True

    def __init__(self):
        self.calls = 0

    def post_forward(self, module, output):
        self.calls += 1
        return output

    def reset_state(self):
        self.calls = 0


def linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(3, 3)


def untouched(module: nn.Module) -> bool:
    return "forward" not in module.__dict__ and HOOK_ATTR not in module.__dict__ \
        and module.forward.__func__ is type(module).forward


def test_registry_chains_in_registration_order_and_removal_restores():
    lin, x = linear(), torch.randn(2, 3)
    ref = lin(x)
    log = []
    reg = HookRegistry.of(lin)
    a = reg.register_hook(Trace("a", 2.0, 1.0, log), "a")
    reg.register_hook(Trace("b", 3.0, 10.0, log), "b")
    assert list(reg.hooks) == ["a", "b"] and reg.get_hook("a") is a and reg.get_hook("c") is None
    # first registered is outermost: a.pre, b.pre, forward, b.post, a.post
    assert torch.equal(lin(x), type(lin).forward(lin, x * 2.0 * 3.0) + 10.0 + 1.0)
    assert log == ["a.pre", "b.pre", "b.post", "a.post"]
    assert reg.remove_hook("a") is a and a.registry is None
    log.clear()
    assert torch.equal(lin(x), type(lin).forward(lin, x * 3.0) + 10.0)  # b alone, as if a never was
    assert log == ["b.pre", "b.post"]
    assert HookRegistry.of(lin) is reg  # still stored: one hook left
    reg.remove_hook("b")
    assert reg.remove_hook("b") is None  # removing twice is harmless
    assert untouched(lin) and torch.equal(lin(x), ref)


def test_new_forward_replaces_the_inner_chain():
    lin, x = linear(), torch.randn(2, 3)
    log = []

    class Constant(ModelHook):
        def new_forward(self, module, x):
            return torch.zeros_like(x)

    class Twice(ModelHook):
        def new_forward(self, module, x):
            return self.inner_forward(x) + self.inner_forward(x)

    reg = HookRegistry.of(lin)
    reg.register_hook(Twice(), "twice")
    reg.register_hook(Trace("t", 1.0, 0.0, log), "trace")
    assert torch.equal(lin(x), 2 * type(lin).forward(lin, x))
    assert log == ["t.pre", "t.post"] * 2  # the inner chain ran twice
    reg.register_hook(Constant(), "const")  # innermost: replaces the module's own forward
    log.clear()
    assert torch.equal(lin(x), torch.zeros(2, 3)) and log == ["t.pre", "t.post"] * 2
    remove_hooks([lin], "twice")
    remove_hooks([lin], "trace")
    remove_hooks([lin], "const")
    assert untouched(lin)
    with pytest.raises(RuntimeError, match="not registered"):
        Twice().inner_forward(x)


def test_preexisting_instance_forward_is_restored():
    lin = linear()
    custom = lambda x: x * 0  # noqa: E731
    lin.forward = custom
    reg = HookRegistry.of(lin)
    reg.register_hook(Trace("a", 1.0, 1.0, []), "a")
    assert torch.equal(lin(torch.ones(1, 3)), torch.ones(1, 3))
    reg.remove_hook("a")
    assert lin.__dict__["forward"] is custom and HOOK_ATTR not in lin.__dict__


def test_names_and_instances_are_unique_and_register_hooks_is_atomic():
    a, b = linear(0), linear(1)
    hook = HookRegistry.of(a).register_hook(Counter(), "n")
    with pytest.raises(ValueError, match="already registered on Linear"):
        HookRegistry.of(a).register_hook(Counter(), "n")
    with pytest.raises(ValueError, match="already registered on a module"):
        HookRegistry.of(b).register_hook(hook, "other")
    # b gets its hook, a refuses (name taken): b is rolled back
    with pytest.raises(ValueError):
        register_hooks([b, a], [Counter(), Counter()], "n")
    assert untouched(b) and list(HookRegistry.of(a).hooks) == ["n"]
    with pytest.raises(ValueError, match="2 modules but 1 hooks"):
        register_hooks([a, b], [Counter()], "m")
    remove_hooks([a, b], "n")
    assert untouched(a) and untouched(b)


def test_lookups_leave_nothing_behind():
    lin = linear()
    assert HookRegistry.of(lin).get_hook("x") is None and HookRegistry.of(lin).remove_hook("x") is None
    assert untouched(lin)


def test_reset_stateful_hooks_recurses():
    model = nn.Sequential(linear(0), nn.Sequential(linear(1)))
    inner, outer = Counter(), Counter()
    HookRegistry.of(model[1][0]).register_hook(inner, "count")
    HookRegistry.of(model).register_hook(outer, "count")
    model(torch.randn(1, 3))
    assert inner.calls == outer.calls == 1
    HookRegistry.of(model).reset_stateful_hooks(recurse=False)
    assert (outer.calls, inner.calls) == (0, 1)
    HookRegistry.of(model).reset_stateful_hooks()
    assert inner.calls == 0
    remove_hooks([model, model[1][0]], "count")
    assert all(untouched(m) for m in model.modules())


def test_find_modules_by_explicit_name():
    model = nn.Sequential(linear(0), nn.Sequential(linear(1)))
    assert find_modules(model, ["1.0", "0"]) == [model[1][0], model[0]]
    with pytest.raises(LookupError, match="'1.3'"):
        find_modules(model, ["0", "1.3"])
    with pytest.raises(LookupError, match="'0.weight'"):  # a tensor is not a module
        find_modules(model, ["0.weight"])
