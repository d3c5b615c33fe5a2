"""The handler registry: user handlers of both kinds, and clear errors for misuse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memsave_dispatch import MemSaveMode
from memsave_dispatch.handlers import (
    DROP,
    Handler,
    RegistrationError,
    Saved,
    SavingPolicy,
    load_saved,
    register_handler,
    registered_ops,
    save_needed,
    unregister_handler,
)
from tests.support import compare_with_stock

aten = torch.ops.aten


def test_user_saving_policy_for_reflection_padding(handler_cleanup):
    """reflection_pad2d's backward reads its input only for the shape: drop it."""

    @register_handler(aten.reflection_pad2d.default)
    class ReflectionPad(SavingPolicy):
        @staticmethod
        def saved(args, outputs):
            return {"self": Saved(args[0], DROP)}

    handler_cleanup.append(aten.reflection_pad2d.default)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    stock, mode = compare_with_stock(lambda x: F.pad(x, (1, 2, 1, 2), mode="reflect"), {"x": x})
    assert stock.saved_bytes == x.numel() * 4
    assert mode.saved_bytes == 0
    assert mode.report["aten.reflection_pad2d.default"].encodings == {"dropped": 1}


def test_user_function_handler_replaces_the_formula(handler_cleanup):
    """A Handler with its own forward/backward: silu keeping its input, as stock does."""

    @register_handler(aten.silu.default)
    class Silu(Handler):
        family = "activation"

        @staticmethod
        def forward(ctx, input):
            save_needed(ctx, (input, True))
            return aten.silu.default(input)

        @staticmethod
        def backward(ctx, grad):
            (input,) = load_saved(ctx)
            return aten.silu_backward.default(grad, input)

        @staticmethod
        def stock_saved(args, outputs):
            return (args[0],)

    handler_cleanup.append(aten.silu.default)
    x = torch.randn(4, 5, requires_grad=True)
    stock, mode = compare_with_stock(lambda x: F.silu(x * 1), {"x": x})
    line = mode.report["aten.silu.default"]
    assert line.handled == 1 and line.family == "activation"
    assert line.stock_bytes == line.kept_bytes == x.numel() * 4
    with MemSaveMode():
        out = F.silu(x * 1)
    assert type(out.grad_fn).__name__ == "SiluFunctionBackward"


def test_duplicates_need_override_and_unregister_restores_stock(handler_cleanup):
    class KeepAll(SavingPolicy):
        @staticmethod
        def saved(args, outputs):
            return {}

    with pytest.raises(RegistrationError, match="already has the handler .*override=True"):
        register_handler(aten.relu.default)(KeepAll)
    original = unregister_handler(aten.relu.default)
    try:
        x = torch.randn(3, requires_grad=True)
        with MemSaveMode() as mode:
            F.relu(x)
        assert "aten.relu.default" not in {line.op for line in mode.report().ops}
        register_handler(aten.relu.default)(KeepAll)
        register_handler(aten.relu.default, override=True)(original)
    finally:
        if aten.relu.default not in registered_ops():
            register_handler(aten.relu.default)(original)
    assert registered_ops().count(aten.relu.default) == 1


@pytest.mark.parametrize(
    "target,message",
    [
        (aten.relu, "operator packet, not an overload.*torch.ops.aten.relu.default"),
        (F.relu, "aten operator overloads .*torch.ops.aten.relu.default"),
        ("aten::relu", "aten operator overloads"),
        (torch.ops.prims.add.default, "not an aten operator"),
    ],
)
def test_not_an_aten_overload(target, message):
    with pytest.raises(RegistrationError, match=message):

        @register_handler(target)
        class Anything(SavingPolicy):
            @staticmethod
            def saved(args, outputs):
                return {}


def test_handlers_missing_parts_or_with_wrong_signatures():
    with pytest.raises(RegistrationError, match="no backward"):

        @register_handler(aten.silu.default)
        class NoBackward(Handler):
            @staticmethod
            def forward(ctx, input):
                return input

    with pytest.raises(RegistrationError, match="forward has the wrong signature.*1 arguments"):

        @register_handler(aten.silu.default)
        class WrongForward(Handler):
            @staticmethod
            def forward(ctx, input, extra):
                return input

            @staticmethod
            def backward(ctx, grad):
                return grad

    with pytest.raises(RegistrationError, match="no saved"):

        @register_handler(aten.silu.default)
        class NoSaved(SavingPolicy):
            pass

    with pytest.raises(RegistrationError, match="subclass of memsave_dispatch.handlers.SavingPolicy"):
        register_handler(aten.silu.default)(object)

    with pytest.raises(RegistrationError, match="family is 3; give it a non-empty name"):

        @register_handler(aten.silu.default)
        class BadFamily(SavingPolicy):
            family = 3

            @staticmethod
            def saved(args, outputs):
                return {}

    with pytest.raises(RegistrationError, match="at least one"):
        register_handler()
    assert aten.silu.default not in registered_ops()


def test_unregistering_an_unknown_op():
    with pytest.raises(KeyError, match="no registered handler"):
        unregister_handler(aten.silu.default)


def test_unknown_decision_is_a_clear_error(handler_cleanup):
    @register_handler(aten.reflection_pad1d.default)
    class Confused(SavingPolicy):
        @staticmethod
        def saved(args, outputs):
            return {"self": Saved(args[0], "drop it")}

    handler_cleanup.append(aten.reflection_pad1d.default)
    x = torch.randn(2, 3, 6, requires_grad=True)
    with MemSaveMode(), pytest.raises(TypeError, match="unknown saving decision 'drop it'"):
        F.pad(x, (1, 1), mode="reflect")


def test_a_slot_the_node_does_not_have_is_a_clear_error_on_first_use(handler_cleanup):
    @register_handler(aten.reflection_pad1d.default)
    class WrongSlot(SavingPolicy):
        @staticmethod
        def saved(args, outputs):
            return {"input": Saved(args[0], DROP)}  # the node calls it "self"

    handler_cleanup.append(aten.reflection_pad1d.default)
    x = torch.randn(2, 3, 6, requires_grad=True)
    with MemSaveMode(), pytest.raises(AttributeError, match=r"names slot\(s\) \['input'\] that .*ReflectionPad1DBackward0 does not have; its saved slots are \['self'\]"):
        F.pad(x, (1, 1), mode="reflect")


def test_a_handler_for_one_mode_only(handler_cleanup):
    """MemSaveMode(handlers=...) adds (or replaces) handlers for that mode alone."""

    class ReflectionPad(SavingPolicy):
        family = "padding"

        @staticmethod
        def saved(args, outputs):
            return {"self": Saved(args[0], DROP)}

    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with MemSaveMode(handlers={aten.reflection_pad2d.default: ReflectionPad}) as own:
        out = F.pad(x, (1, 1, 1, 1), mode="reflect")
    assert own.report()["reflection_pad2d"].encodings == {"dropped": 1}
    assert MemSaveMode(include="padding", handlers={aten.reflection_pad2d.default: ReflectionPad}).ops == {
        aten.reflection_pad2d.default
    }
    with MemSaveMode() as plain:
        F.pad(x, (1, 1, 1, 1), mode="reflect")
    assert aten.reflection_pad2d.default not in registered_ops()
    assert "aten.reflection_pad2d.default" not in {line.op for line in plain.report().ops}
    out.sum().backward()
    with pytest.raises(RegistrationError, match="not an aten operator"):
        MemSaveMode(handlers={torch.ops.prims.add.default: ReflectionPad})
