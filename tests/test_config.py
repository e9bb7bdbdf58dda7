"""MoEConfig: every field validated on construction, errors naming the field and the value."""

from __future__ import annotations

import dataclasses
import math

import pytest

import moe_replay as mr

BASE = {"num_experts": 8, "top_k": 2, "hidden_size": 16, "intermediate_size": 32}


def make(**overrides: object) -> mr.MoEConfig:
    return mr.MoEConfig(**{**BASE, **overrides})


def test_defaults_match_design() -> None:
    cfg = make()
    assert cfg.scoring == "softmax"
    assert cfg.norm_topk_prob is True
    assert cfg.n_group is None and cfg.topk_group is None
    assert cfg.score_bias is False
    assert cfg.routed_scaling_factor == 1.0
    assert cfg.experts_per_group == 8


def test_deepseek_like_config_is_accepted() -> None:
    cfg = make(
        num_experts=16,
        top_k=4,
        scoring="sigmoid",
        n_group=4,
        topk_group=2,
        score_bias=True,
        routed_scaling_factor=2.5,
    )
    assert cfg.experts_per_group == 4


def test_frozen_and_keyword_only() -> None:
    cfg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        mr.MoEConfig(8, 2, 16, 32)  # type: ignore[misc]


def test_top_k_equal_to_num_experts_is_allowed() -> None:
    assert make(top_k=8).top_k == 8


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_experts": 0}, r"num_experts must be >= 1, got 0"),
        ({"top_k": 0}, r"top_k must be >= 1, got 0"),
        ({"hidden_size": -4}, r"hidden_size must be >= 1, got -4"),
        ({"intermediate_size": 0}, r"intermediate_size must be >= 1, got 0"),
        ({"top_k": 9}, r"top_k must be <= num_experts \(8\), got 9"),
        ({"scoring": "relu"}, r"scoring must be one of .*got 'relu'"),
        ({"routed_scaling_factor": 0.0}, r"routed_scaling_factor must be finite and > 0, got 0.0"),
        ({"routed_scaling_factor": -1.5}, r"routed_scaling_factor .* got -1.5"),
        ({"routed_scaling_factor": math.inf}, r"routed_scaling_factor .* got inf"),
        ({"routed_scaling_factor": math.nan}, r"routed_scaling_factor .* got nan"),
        ({"n_group": 2}, r"n_group and topk_group .* n_group=2, topk_group=None"),  # one without the other
        ({"topk_group": 1}, r"n_group and topk_group .* n_group=None, topk_group=1"),
        ({"n_group": 3, "topk_group": 1}, r"n_group must divide num_experts \(8\), got 3"),
        ({"n_group": 0, "topk_group": 1}, r"n_group must be >= 1, got 0"),
        ({"n_group": 4, "topk_group": 0}, r"topk_group must be >= 1, got 0"),
        ({"n_group": 4, "topk_group": 5}, r"topk_group must be <= n_group \(4\), got 5"),
        # 1 group of 2 experts selectable, but top_k = 3
        ({"n_group": 4, "topk_group": 1, "top_k": 3}, r"topk_group=1 leaves 2 selectable experts.*top_k=3"),
    ],
)
def test_bad_values_raise_value_error_naming_field(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make(**overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_experts": 8.0}, r"num_experts must be an int, got float 8.0"),
        ({"top_k": True}, r"top_k must be an int, got bool True"),  # bool is an int subclass: rejected
        ({"hidden_size": "16"}, r"hidden_size must be an int, got str '16'"),
        ({"norm_topk_prob": 1}, r"norm_topk_prob must be a bool, got int 1"),
        ({"score_bias": None}, r"score_bias must be a bool, got NoneType None"),
        ({"routed_scaling_factor": "2"}, r"routed_scaling_factor must be a float, got '2'"),
        ({"n_group": 2.0, "topk_group": 1}, r"n_group must be an int, got float 2.0"),
    ],
)
def test_wrong_types_raise_type_error_naming_field(overrides: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        make(**overrides)
