"""The one way to attach behaviour to a model from outside: hooks on named modules.

In diffusers' habit (``diffusers.hooks``): a :class:`HookRegistry` is kept on each hooked
module; it replaces the module's ``forward`` once, by an instance attribute (the class is
never touched), and runs the registered :class:`ModelHook`\\ s as one chain, the first
registered outermost. For the hook at position k a call runs::

    args, kwargs = hook.pre_forward(module, *args, **kwargs)
    out = hook.new_forward(module, *args, **kwargs)   # default: hook.inner_forward(...), i.e.
                                                       # hook k+1, ..., then the module's forward
    return hook.post_forward(module, out)

A hook that overrides ``new_forward`` and does not call ``inner_forward`` replaces what
lies inside it (AudioCache returning a cached output, LiteFocus computing sparse attention).
Removing the last hook of a module restores its ``forward`` exactly (the instance
attribute is deleted, or the one that was there before is put back) and deletes the
registry, so a detached model carries no trace of its hooks. ``state_dict`` is never
touched. While hooks are attached they hold references to the model: remove them before
pickling or deep-copying it.

Modules are found by explicit dotted names (``"blocks.3.self_attn"``), never guessed from
attribute names; each tool registers under its own hook name, so several tools can hook the
same model, even the same module, and each detaches alone.

Public API::

    class ModelHook:                                  # subclass and override what you need
        stateful = False                              # True: reset_state() holds per-run state
        pre_forward(module, *args, **kwargs) -> (args, kwargs)
        new_forward(module, *args, **kwargs) -> output
        post_forward(module, output) -> output
        reset_state() -> None
        inner_forward(*args, **kwargs) -> output      # the rest of the chain (from new_forward)
        registry -> HookRegistry | None               # set while registered (one module at a time)

    HookRegistry.of(module) -> HookRegistry           # the module's registry, or a new one that is
                                                      # stored on the module with its first hook
        .register_hook(hook, name) -> hook            # ValueError if the name is taken
        .remove_hook(name) -> hook | None
        .get_hook(name) -> hook | None
        .hooks -> {name: hook} in chain order
        .reset_stateful_hooks(recurse=True)           # also the registries of module.modules()

    find_modules(model, names) -> list[nn.Module]     # LookupError names a missing module
    register_hooks(modules, hooks, name)              # hooks[i] on modules[i]: all, or none on error
    remove_hooks(modules, name)                       # a module without that hook is skipped
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from torch import nn

HOOK_ATTR = "_soundlake_hooks"


class ModelHook:
    """Behaviour attached to one module's forward (see module docstring)."""

    stateful = False
    registry: "HookRegistry | None" = None

    def pre_forward(self, module: nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        return args, kwargs

    def new_forward(self, module: nn.Module, *args, **kwargs) -> Any:
        return self.inner_forward(*args, **kwargs)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return output

    def reset_state(self) -> None:
        pass

    def inner_forward(self, *args, **kwargs) -> Any:
        """The hooks registered after this one, then the module's own forward."""
        reg = self.registry
        if reg is None:
            raise RuntimeError(f"{type(self).__name__} is not registered on a module")
        return reg._call(reg._position(self) + 1, args, kwargs)


class HookRegistry:
    """The ordered hooks of one module instance (see module docstring)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.hooks: dict[str, ModelHook] = {}
        self._chain: tuple[ModelHook, ...] = ()
        self._forward = None  # the forward the chain ends in, while installed
        self._had_instance_forward = False

    @classmethod
    def of(cls, module: nn.Module) -> "HookRegistry":
        reg = module.__dict__.get(HOOK_ATTR)
        return cls(module) if reg is None else reg

    def register_hook(self, hook: ModelHook, name: str) -> ModelHook:
        if name in self.hooks:
            raise ValueError(f"hook {name!r} already registered on {type(self.module).__name__}")
        if hook.registry is not None:
            raise ValueError(f"{type(hook).__name__} is already registered on a module")
        if not self.hooks:
            self._install()
        hook.registry = self
        self.hooks[name] = hook
        self._chain = tuple(self.hooks.values())
        return hook

    def remove_hook(self, name: str) -> ModelHook | None:
        hook = self.hooks.pop(name, None)
        if hook is None:
            return None
        hook.registry = None
        self._chain = tuple(self.hooks.values())
        if not self.hooks:
            self._uninstall()
        return hook

    def get_hook(self, name: str) -> ModelHook | None:
        return self.hooks.get(name)

    def reset_stateful_hooks(self, recurse: bool = True) -> None:
        modules = self.module.modules() if recurse else [self.module]
        for m in modules:
            reg = m.__dict__.get(HOOK_ATTR)
            for hook in reg.hooks.values() if reg is not None else ():
                if hook.stateful:
                    hook.reset_state()

    def forward(self, *args, **kwargs) -> Any:
        """What the module's ``forward`` is while hooks are registered."""
        return self._call(0, args, kwargs)

    def _call(self, index: int, args: tuple, kwargs: dict) -> Any:
        if index == len(self._chain):
            return self._forward(*args, **kwargs)
        hook = self._chain[index]
        args, kwargs = hook.pre_forward(self.module, *args, **kwargs)
        return hook.post_forward(self.module, hook.new_forward(self.module, *args, **kwargs))

    def _position(self, hook: ModelHook) -> int:
        return next(i for i, h in enumerate(self._chain) if h is hook)

    def _install(self) -> None:
        d = self.module.__dict__
        self._had_instance_forward = "forward" in d
        self._forward = self.module.forward  # bound method, or the instance forward already there
        d["forward"] = self.forward
        d[HOOK_ATTR] = self  # a plain attribute, never a submodule or state

    def _uninstall(self) -> None:
        d = self.module.__dict__
        if self._had_instance_forward:
            d["forward"] = self._forward
        else:
            d.pop("forward", None)
        d.pop(HOOK_ATTR, None)
        self._forward = None


def find_modules(model: nn.Module, names: Iterable[str]) -> list[nn.Module]:
    """The submodules at these explicit dotted names, in order."""
    out = []
    for name in names:
        try:
            out.append(model.get_submodule(name))
        except AttributeError as e:
            raise LookupError(f"model has no submodule {name!r} ({e})") from None
    return out


def register_hooks(modules: Sequence[nn.Module], hooks: Sequence[ModelHook], name: str) -> None:
    """``hooks[i]`` on ``modules[i]`` under ``name``; on an error none stays registered."""
    if len(modules) != len(hooks):
        raise ValueError(f"{len(modules)} modules but {len(hooks)} hooks")
    done = []
    try:
        for module, hook in zip(modules, hooks):
            HookRegistry.of(module).register_hook(hook, name)
            done.append(module)
    except BaseException:
        remove_hooks(done, name)
        raise


def remove_hooks(modules: Iterable[nn.Module], name: str) -> None:
    for module in modules:
        HookRegistry.of(module).remove_hook(name)
