"""The one configuration object: declared switches, scoped overrides, no assignment."""

import pytest

import otlinop
import solvers
from solvers import Config


def test_one_object_for_both_packages():
    assert otlinop.config is solvers.config
    for name in ("check_finite", "half_tf32", "fma_max_d", "torch_block_bytes", "sinkhorn_graphs",
                 "stack_self_problems", "cg_fused", "cg_fused_max_n"):
        assert name in otlinop.config.describe()


def test_override_restores_on_exit_errors_included():
    config = otlinop.config
    before = (config.check_finite, config.cg_fused_max_n)
    with pytest.raises(RuntimeError, match="inside"):
        with config.override(check_finite=False, cg_fused_max_n=7) as c:
            assert c is config and not config.check_finite and config.cg_fused_max_n == 7
            raise RuntimeError("inside")
    assert (config.check_finite, config.cg_fused_max_n) == before


def test_nested_overrides_unwind_in_order():
    config = otlinop.config
    with config.override(check_finite=False):
        with config.override(check_finite=True):
            assert config.check_finite
        assert not config.check_finite
    assert config.check_finite


def test_misuse_is_refused_with_the_fix_named():
    config = otlinop.config
    with pytest.raises(AttributeError, match=r"with config.override\(check_finite=...\)"):
        config.check_finite = False
    with pytest.raises(AttributeError, match="no switch 'check_finit'.*check_finite"):
        with config.override(check_finit=False):
            pass
    with pytest.raises(AttributeError, match="no switch 'nope'"):
        config.nope
    for name, bad in (("check_finite", 0), ("check_finite", "yes"), ("cg_fused_max_n", True),
                      ("cg_fused_max_n", -1), ("cg_fused_max_n", 2.5)):
        with pytest.raises(TypeError, match=f"config.override: {name} takes"):
            with config.override(**{name: bad}):
                pass
    assert config.check_finite and config.cg_fused_max_n == 1 << 15


def test_declare_once():
    c = Config()
    c.declare("flag", True, "a flag", owner="here")
    c.declare("flag", True, "a flag", owner="here")          # a re-import: no-op
    with pytest.raises(ValueError, match="already declared by here"):
        c.declare("flag", False, "a flag", owner="there")
    with pytest.raises(TypeError, match="bool or a non-negative int"):
        c.declare("ratio", 0.5, "a float", owner="here")
    assert repr(c) == "Config(flag=True)" and "flag" in dir(c)


def test_state_is_every_switch_and_follows_overrides():
    config = otlinop.config
    """config.state(): (name, value) of every switch, sorted, hashable; an override changes it
    (what the loss's graph cache keys on)."""
    before = config.state()
    assert [name for name, _ in before] == sorted(config._switches) and hash(before) is not None
    with config.override(check_finite=not config.check_finite):
        during = config.state()
    assert during != before and config.state() == before
    assert dict(during)["check_finite"] is not dict(before)["check_finite"]
